"""Augmented SBERT (arXiv:2010.08240) on STS-B: the default fine-tune (configs/stsb_anchored.py) on the
gold pairs plus silver pairs that a cross-encoder labelled; selected on STS-B dev, SICK trial beside it.

The silver file comes first (the gold pairs first in it, then new pairs of the same sentences:
each sentence with its nearest by all-MiniLM-L6-v2, labelled by the cross-encoder of
configs/stsb_cross_encoder.py on the 0-5 scale). Semantic-search sampling only: random partners
(``--random_pairs``) were the paper's weakest strategy and would double the run (1.7x the gold
steps as it is):

    python scripts/train.py --config configs/stsb_cross_encoder.py --workdir workdirs/stsb_cross_encoder
    python scripts/augment.py --pairs $EMBEDJAX_DATA/stsb/sts-train.csv --cross_encoder workdirs/stsb_cross_encoder \
        --output workdirs/augsbert/stsb_silver.tsv --top_k 1 --random_pairs 0 --include_gold
    python scripts/train.py --config configs/stsb_augsbert.py --workdir workdirs/stsb_augsbert

Variants: ``:silver=PATH`` (another silver file), ``:smoke``.
"""

from pathlib import Path

from configs import base, stsb_anchored

SILVER = Path(__file__).resolve().parents[1] / "workdirs" / "augsbert" / "stsb_silver.tsv"


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("silver", "smoke"))
    c = stsb_anchored.get_config(None)
    c.data.kind = "scored"
    c.data.train = str(args.get("silver", SILVER))
    c.data.score_range = (0.0, 5.0)
    c.eval_every = 50  # ~4x the gold data: an evaluation every 50 steps keeps ~13 of them
    return base.maybe_smoke(c, args)
