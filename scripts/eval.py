"""Evaluate an encoder on an STS file: Spearman / Pearson x100 per similarity metric.

    python scripts/eval.py                                    # all-MiniLM-L6-v2 on STS-B dev
    python scripts/eval.py --model DIR_OR_HUB_ID --data ../shared/data/sick/SICK_trial.txt --format sick
    python scripts/eval.py --dims 384 128 32 --layers 6 3 1  # Matryoshka / 2D grid
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import embedjax  # noqa: E402
from embedjax import hf  # noqa: E402
from embedjax.data import read_sick, read_stsb  # noqa: E402
from embedjax.eval import STSEvaluator  # noqa: E402

READERS = {"stsb": read_stsb, "sick": read_sick}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=hf.minilm_l6(), help="checkpoint directory or hub id")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "stsb" / "sts-dev.csv")
    ap.add_argument("--format", choices=sorted(READERS), default="stsb")
    ap.add_argument("--metrics", nargs="+", default=["cosine", "dot", "euclidean", "manhattan"])
    ap.add_argument("--dims", nargs="+", type=int, default=None, help="Matryoshka dims to report")
    ap.add_argument("--layers", nargs="+", type=int, default=None, help="layer counts to report")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)

    encoder = embedjax.load_pretrained(args.model)
    pairs = READERS[args.format](args.data)
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
    main()
