"""Augmented SBERT silver data: sample new pairs of the training sentences, label them with a cross-encoder.

    python scripts/augment.py --pairs $EMBEDJAX_DATA/stsb/sts-train.csv --cross_encoder workdirs/stsb_ce/export \
        --output workdirs/silver/stsb_silver.tsv [--model all-MiniLM-L6-v2] [--top_k 3] [--random_pairs 3] \
        [--scale 5] [--seed 0] [--include_gold]

--pairs: gold scored pairs (``--format`` stsb | sick | scored, inferred from the name: a name with
'sick' is SICK, a .tsv / .csv / .jsonl other than STS-B's files is ``scored``); their sentences
are paired anew (embedjax/augment.py: each with its --top_k nearest by --model, plus
--random_pairs random partners), the gold pairs left out, and every new pair labelled by
--cross_encoder times --scale. Output: a tsv of text_a, text_b, score (``data.kind="scored"``), the
gold pairs first with --include_gold. Bad input is one line on stderr and exit status 2 (--debug:
the traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from embedjax import cli, hf  # noqa: E402

_PAIRS = flags.DEFINE_string("pairs", None, "gold scored pairs whose sentences are paired anew")
_FORMAT = flags.DEFINE_string("format", None, "stsb | sick | scored (default: inferred from the file name)")
_CROSS = flags.DEFINE_string("cross_encoder", None, "the cross-encoder that labels the new pairs")
_MODEL = flags.DEFINE_string("model", None, "the bi-encoder that finds each sentence's nearest ones "
                                            "(default: all-MiniLM-L6-v2)")
_OUTPUT = flags.DEFINE_string("output", None, "tsv file to write")
_TOP_K = flags.DEFINE_integer("top_k", 3, "nearest sentences paired with each sentence")
_RANDOM = flags.DEFINE_integer("random_pairs", 3, "random partners per sentence")
_SCALE = flags.DEFINE_float("scale", 5.0, "multiplies the cross-encoder's scores (5: STS-B's 0-5 from a sigmoid)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random pairs")
_GOLD = flags.DEFINE_bool("include_gold", False, "write the gold pairs too, first")
_BATCH = flags.DEFINE_integer("batch_size", 64, "pairs (and sentences) per forward pass")
_DEBUG = flags.DEFINE_bool("debug", False, "on an error, show the full traceback instead of one line")
flags.mark_flags_as_required(["pairs", "cross_encoder", "output"])

READERS = ("stsb", "sick", "scored")


def read_gold(path: str, fmt: str | None):
    from embedjax.data import read_scored_pairs, read_sick, read_stsb

    name = Path(path).name.lower()
    fmt = fmt or ("sick" if "sick" in name else "stsb" if name.startswith("sts-") else "scored")
    if fmt not in READERS:
        raise ValueError(f"--format must be one of {READERS}, got {fmt!r}")
    return {"stsb": read_stsb, "sick": read_sick, "scored": read_scored_pairs}[fmt](path)


def _cell(text: str) -> str:
    """A text as one tsv cell: tabs and line breaks become spaces (the readers split on tabs, no quoting)."""
    return " ".join(text.replace("\t", " ").splitlines())


def main(argv) -> dict:
    """Samples, labels, writes --output and prints a summary; returns the counts."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]} (all options are --flags)")
    absl_logging.set_verbosity(absl_logging.WARNING)
    if _TOP_K.value < 0 or _RANDOM.value < 0 or _BATCH.value < 1:
        raise ValueError("--top_k and --random_pairs must be >= 0 and --batch_size >= 1")
    gold = read_gold(_PAIRS.value, _FORMAT.value)  # bad files fail before any model loads
    import embedjax
    from embedjax.augment import label_pairs, sample_pairs

    cross_encoder = embedjax.load_cross_encoder(_CROSS.value)
    encoder = embedjax.load_pretrained(_MODEL.value or hf.minilm_l6())
    sentences = [t for p in gold for t in (p.text_a, p.text_b)]
    pairs = sample_pairs(sentences, encoder, top_k=_TOP_K.value, random_pairs=_RANDOM.value, seed=_SEED.value,
                         exclude=[(p.text_a, p.text_b) for p in gold], batch_size=_BATCH.value)
    silver = label_pairs(pairs, cross_encoder, scale=_SCALE.value, batch_size=_BATCH.value)
    out = Path(_OUTPUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for p in (list(gold) if _GOLD.value else []) + silver:
            f.write(f"{_cell(p.text_a)}\t{_cell(p.text_b)}\t{p.score:.6g}\n")
    tmp.replace(out)  # atomic: a crash never leaves half a file
    counts = {"gold": len(gold), "silver": len(silver), "lines": len(silver) + (len(gold) if _GOLD.value else 0)}
    print(f"{counts['gold']} gold pairs, {len(set(sentences))} sentences: {counts['silver']} silver pairs labelled "
          f"({counts['lines']} lines -> {out})")
    return counts


def _absl_main(argv) -> None:
    cli.run(main, argv, debug=_DEBUG.value)  # returns None: absl exits with main's return value


if __name__ == "__main__":
    app.run(_absl_main)
