"""Multi-task STS: all-MiniLM-L6-v2 on STS-B train and SICK train, one source per batch, selected
on the mean of STS-B dev and SICK trial (the recipe search is in benchmarks/README.md).

    python scripts/train.py --config configs/stsb_sick.py --workdir workdirs/stsb_sick
    python scripts/train.py --config configs/stsb_sick.py:smoke --workdir /tmp/smoke

Each source keeps its own loss: AnglE on its own score scale (STS-B 0-5, SICK 1-5), plus the
variants' correlation term. Variants (``:name=value,...``): ``pearson=W`` adds W x the
differentiable Pearson loss (arXiv:2508.11442) to both sources, ``rank=W`` the ranking-
consistency loss, ``ema=D`` keeps an EMA of the params with decay D (selected when it scores
higher), ``mode=round_robin`` alternates sources instead of sampling them by size, ``lr=X``,
``sick_ibn=W`` the weight of AnglE's in-batch term on SICK (0: CoSENT + angle only), ``sick_weight=W``
SICK's sampling weight (STS-B's is 5749, its size; 0 = train on STS-B alone).
"""

from configs import base

ANGLE = {"cosine_w": 1.0, "ibn_w": 1.0, "angle_w": 0.02}


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "pearson", "rank", "ema", "mode", "lr", "sick_ibn", "sick_weight"))
    c = base.base_config()
    c.objective.loss = "angle"
    c.objective.loss_kwargs = {**ANGLE, "label_range": (0.0, 5.0)}
    aux = {}
    if args.get("pearson"):
        aux["pearson"] = float(args["pearson"])
    if args.get("rank"):
        aux["rank_consistency"] = float(args["rank"])
    c.objective.aux_losses = aux
    c.objective.dropout = False
    c.optim.learning_rate = float(args.get("lr", 1e-5))
    c.optim.ema = float(args.get("ema", 0.0))
    c.data.buckets = (16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 256)
    # Weights = the sources' sizes: sampling visits every record about once an epoch.
    c.data.mixture = {
        "stsb": {"kind": "stsb", "train": str(base.DATA / "stsb" / "sts-train.csv"), "weight": 5749.0},
        "sick": {"kind": "sick", "train": str(base.DATA / "sick" / "SICK_train.txt"),
                 "weight": float(args.get("sick_weight", 4500.0)),
                 "objective": {"loss_kwargs": {**ANGLE, "ibn_w": float(args.get("sick_ibn", 1.0)),
                                               "label_range": (1.0, 5.0)}}},
    }
    if not c.data.mixture.sick.weight:  # sick_weight=0: STS-B alone, still evaluated and selected on both
        c.data.mixture = {"stsb": c.data.mixture.stsb.to_dict()}
    c.data.mixture_mode = args.get("mode", "sampled")
    c.evals = {
        "dev": {"type": "sts", "path": str(base.DATA / "stsb" / "sts-dev.csv"), "format": "stsb",
                "metrics": ("cosine",), "layers": (), "dims": ()},
        "sick_trial": {"type": "sts", "path": str(base.DATA / "sick" / "SICK_trial.txt"), "format": "sick",
                 "metrics": ("cosine",), "layers": (), "dims": ()},
    }
    c.select_metric = "dev/cosine_spearman+sick_trial/cosine_spearman"
    c.eval_every = 40  # 8 selections an epoch; each evaluates two dev sets (four with EMA)
    return base.maybe_smoke(c, args)
