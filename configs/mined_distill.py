"""Distillation on mined hard negatives: MarginMSE (or listwise KL) towards the mining model's scores.

First mine (query, positive) pairs with a teacher, then train a student on the mined file:

    python scripts/mine.py --pairs pairs.tsv --model TEACHER --output workdirs/mined/train.jsonl \
        --num_negatives 4 --range_min 5 --range_max 50 --relative_margin 0.95
    python scripts/train.py --config configs/mined_distill.py --workdir workdirs/mined_distill \
        --config.data.train=workdirs/mined/train.jsonl

Each record holds the query, its positive, k negatives and the teacher's scores of all 1 + k
(``data.kind=distill``). Variants: ``:kl`` listwise KL over [positive, negatives] instead of
MarginMSE (arXiv:2010.02666), ``:infonce`` InfoNCE with the mined negatives (the teacher's scores
unused: ``data.kind=triplets``), ``:smoke``.
"""

from configs import base


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "kl", "infonce"))
    c = base.base_config()
    c.data.kind = "distill"
    c.data.train = "workdirs/mined/train.jsonl"
    c.data.format = "jsonl"
    if args.get("infonce"):
        c.data.kind = "triplets"
        c.objective.loss = "infonce"
        c.objective.loss_kwargs = {}
    elif args.get("kl"):
        c.objective.loss = "listwise_kl"
        c.objective.loss_kwargs = {"scale": 20.0, "teacher_temperature": 0.05}  # cosine teacher scores
    else:
        c.objective.loss = "margin_mse"
        c.objective.loss_kwargs = {"similarity": "cosine"}  # the mining model's scores are cosines
    c.optim.learning_rate = 2e-5
    c.objective.dropout = False
    return base.maybe_smoke(c, args)
