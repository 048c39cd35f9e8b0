"""Fine-tune all-MiniLM-L6-v2 on SICK train (relatedness 1-5) with AnglE; select on SICK trial.

    python scripts/train.py --config configs/sick_angle.py --workdir workdirs/sick_angle

The SICK half of the default recipe (configs/stsb_angle.py is the STS-B half; scripts/merge.py
merges the two, see the Makefile's ``main``): trained alone, not mixed with STS-B, because SICK's
relatedness scores (a negated sentence is "related") pull STS-B dev down when both are trained
together (benchmarks/README.md, recipe search).
"""

from configs import base


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke",))
    c = base.base_config()
    c.data.kind = "sick"
    c.data.train = str(base.DATA / "sick" / "SICK_train.txt")
    c.objective.loss = "angle"
    c.objective.loss_kwargs = {"cosine_w": 1.0, "ibn_w": 1.0, "angle_w": 0.02, "label_range": (1.0, 5.0)}
    c.objective.dropout = False
    c.optim.learning_rate = 1e-5
    c.data.buckets = (16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 256)
    c.evals = {
        "dev": {"type": "sts", "path": str(base.DATA / "stsb" / "sts-dev.csv"), "format": "stsb",
                "metrics": ("cosine",), "layers": (), "dims": ()},
        "sick_trial": {"type": "sts", "path": str(base.DATA / "sick" / "SICK_trial.txt"), "format": "sick",
                       "metrics": ("cosine",), "layers": (), "dims": ()},
    }
    c.select_metric = "sick_trial/cosine_spearman"
    c.eval_every = 20
    return base.maybe_smoke(c, args)
