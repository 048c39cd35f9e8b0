"""Encode a text file (one text per line) into a .npy matrix of embeddings.

    python scripts/encode.py --input sentences.txt --output emb.npy [--model DIR_OR_HUB_ID] [--dim 128] [--num-layers 3]

(``--dims`` and ``--layers``, scripts/eval.py's spellings, are accepted too, with one value each.)

Row i of the output is line i + 1 of the input, whatever the file's suffix: a blank line is
embedded as the empty string, so the rows stay aligned with the lines. Bad input (undecodable
bytes, an empty file, a bad option) is one line on stderr and exit status 2 (--debug: traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import embedjax  # noqa: E402
from embedjax import cli, hf  # noqa: E402
from embedjax.data import read_sentences  # noqa: E402


def main(argv=None) -> np.ndarray:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, required=True,
                    help="UTF-8 text file, one text per line (read as plain text whatever its suffix)")
    ap.add_argument("--output", type=Path, required=True,
                    help=".npy file to write (float32, one row per line; .npy is appended when missing)")
    ap.add_argument("--model", default=hf.minilm_l6(), help="checkpoint directory or hub id")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dim", "--dims", dest="dim", type=int, default=None, help="Matryoshka truncation")
    ap.add_argument("--num-layers", "--layers", dest="num_layers", type=int, default=None,
                    help="use only the first k layers")
    ap.add_argument("--prompt", default=None, help="instruction prefixed to every text")
    ap.add_argument("--no-normalize", action="store_true",
                    help="raw embeddings (default: as the checkpoint says; unit norm with a Normalize module)")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)

    texts = read_sentences(args.input, format="txt", keep_blank=True)  # one row per line, blank ones too
    encoder = embedjax.load_pretrained(args.model)
    emb = encoder.encode(texts, batch_size=args.batch_size, dim=args.dim, num_layers=args.num_layers,
                         prompt=args.prompt, normalize=False if args.no_normalize else None, show_progress=True)
    output = args.output if args.output.suffix == ".npy" else args.output.with_name(args.output.name + ".npy")
    output.parent.mkdir(parents=True, exist_ok=True)
    np.save(output, emb)  # (np.save would append .npy itself: the path printed is the one written)
    print(f"{len(texts)} texts -> {output.resolve()} {emb.shape}")
    return emb


if __name__ == "__main__":
    cli.run(main)
