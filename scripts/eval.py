"""Evaluate an encoder on an STS file: Spearman / Pearson x100 per similarity metric.

    python scripts/eval.py                                    # all-MiniLM-L6-v2 on STS-B dev
    python scripts/eval.py --model DIR_OR_HUB_ID --data ../shared/data/sick/SICK_trial.txt --format sick
    python scripts/eval.py --dims 384 128 32 --layers 6 3 1  # Matryoshka / 2D grid

The default --data is $EMBEDJAX_DATA/stsb/sts-dev.csv, else ../shared/data/stsb/sts-dev.csv beside
the repository (as configs/base.py). Bad input (a malformed row, --dims outside 1..width,
--layers outside 1..num_layers) is one line on stderr and exit status 2, before any evaluation
(--debug: the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import embedjax  # noqa: E402
from embedjax import cli, hf  # noqa: E402
from embedjax.data import read_sick, read_stsb  # noqa: E402
from embedjax.eval import STSEvaluator  # noqa: E402
from configs.base import DATA  # noqa: E402  ($EMBEDJAX_DATA, else ../shared/data: one rule for configs and CLIs)

READERS = {"stsb": read_stsb, "sick": read_sick}


def default_data() -> Path:
    """STS-B dev under ``$EMBEDJAX_DATA``, else ``../shared/data`` beside the repository (configs/base.py)."""
    return DATA / "stsb" / "sts-dev.csv"


def check_range(flag: str, values, limit: int | None = None, why: str = "") -> None:
    """Raises ValueError (one line) unless every value is in 1..limit (>= 1 when limit is None)."""
    bad = [v for v in values or () if v < 1 or (limit is not None and v > limit)]
    if bad:
        expected = "positive integers" if limit is None else f"values in 1..{limit} ({why})"
        raise ValueError(f"{flag} {' '.join(map(str, bad))}: expected {expected}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=hf.minilm_l6(), help="checkpoint directory or hub id")
    ap.add_argument("--data", type=Path, default=None,
                    help="STS file (default: $EMBEDJAX_DATA/stsb/sts-dev.csv, else ../shared/data/stsb/sts-dev.csv)")
    ap.add_argument("--format", choices=sorted(READERS), default="stsb")
    ap.add_argument("--metrics", nargs="+", default=["cosine", "dot", "euclidean", "manhattan"])
    ap.add_argument("--dims", nargs="+", type=int, default=None, help="Matryoshka dims to report")
    ap.add_argument("--layers", nargs="+", type=int, default=None, help="layer counts to report")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)
    if args.data is None:
        args.data = default_data()
    for flag, values in (("--dims", args.dims), ("--layers", args.layers), ("--batch-size", [args.batch_size])):
        check_range(flag, values)  # before reading or loading anything

    pairs = READERS[args.format](args.data)
    encoder = embedjax.load_pretrained(args.model)
    check_range("--dims", args.dims, encoder.dim, f"the model's width is {encoder.dim}")
    check_range("--layers", args.layers, encoder.cfg.num_layers, f"the model has {encoder.cfg.num_layers} layers")
    evaluator = STSEvaluator(pairs, name=args.data.stem, metrics=args.metrics, dims=args.dims or (None,),
                             layers=args.layers or (None,), batch_size=args.batch_size)
    results = evaluator(encoder)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{args.model}  on  {args.data}  ({len(pairs)} pairs)")
        for key, value in results.items():
            print(f"  {key:<48} {value:6.2f}")
    return results


if __name__ == "__main__":
    cli.run(main)
