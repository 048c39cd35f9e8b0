"""Distil a static token table (model2vec-style: no transformer at encode time) from a checkpoint.

    python scripts/distill_static.py --output workdirs/minilm_static --dim 256          # all-MiniLM-L6-v2
    python scripts/distill_static.py --model DIR_OR_HUB_ID --output DIR --dim 128 --trim-to corpus.txt
    # then:  embedjax.load_pretrained(DIR), model2vec.StaticModel.from_pretrained(DIR) or SentenceTransformer(DIR)

Each vocabulary token goes through the model once ([CLS] token [SEP], mean of the last layer), then
PCA to --dim and SIF / Zipf weighting (``embedjax.static.distill``, equal to ``model2vec.distill``).
--trim-to keeps only the tokens a one-text-a-line file uses. The directory is written in model2vec's
layout with the sentence-transformers modules. Bad input is one line on stderr and exit status 2
(--debug: the traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embedjax  # noqa: E402
from embedjax import cli, hf, static  # noqa: E402
from embedjax.data import read_sentences  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=hf.minilm_l6(), help="checkpoint directory or hub id (default all-MiniLM-L6-v2)")
    ap.add_argument("--output", type=Path, required=True, help="directory to write")
    ap.add_argument("--dim", type=int, default=256, help="PCA components kept (<= the model's width)")
    ap.add_argument("--no-pca", action="store_true", help="keep the model's width, no PCA (--dim is then unused)")
    ap.add_argument("--sif-coefficient", type=float, default=1e-4, help="SIF weighting's a in (0, 1)")
    ap.add_argument("--no-sif", action="store_true", help="no Zipf / SIF weighting")
    ap.add_argument("--token-remove-pattern", default=static.DEFAULT_REMOVE_PATTERN,
                    help="regex of tokens to drop (re.match; default BERT's [unused*]); '' keeps every token")
    ap.add_argument("--trim-to", type=Path, default=None,
                    help="a UTF-8 text file, one text per line: keep only the tokens it uses")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per text when the table encodes")
    ap.add_argument("--batch-size", type=int, default=1024, help="tokens per forward pass")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)

    encoder = embedjax.load_pretrained(args.model)
    pattern = args.token_remove_pattern or None
    keep = None
    if args.trim_to is not None:
        keep = static.used_tokens(encoder, read_sentences(args.trim_to, format="txt"), token_remove_pattern=pattern)
    t0 = time.perf_counter()
    model = static.distill(encoder, dim=None if args.no_pca else args.dim,
                           sif_coefficient=None if args.no_sif else args.sif_coefficient, token_remove_pattern=pattern,
                           keep_tokens=keep, max_length=args.max_length, batch_size=args.batch_size, show_progress=True)
    seconds = time.perf_counter() - t0
    out = embedjax.save_pretrained(model, args.output)
    print(f"distilled {args.model} -> {out}: {model.cfg.vocab_size} tokens x {model.dim} in {seconds:.1f} s")
    return out


if __name__ == "__main__":
    cli.run(main)
