"""Supervised SimCSE: InfoNCE with hard negatives from SICK (entailment = positive,
contradiction = hard negative); select on SICK trial relatedness.

    python scripts/train.py --config configs/sick_simcse_sup.py --workdir workdirs/sick_simcse
    python scripts/train.py --config configs/sick_simcse_sup.py:smoke --workdir /tmp/smoke_simcse
"""

from configs import base


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke",))
    c = base.base_config()
    c.data.kind = "sick_triplets"
    c.data.train = str(base.DATA / "sick" / "SICK_train.txt")
    c.evals.dev.path = str(base.DATA / "sick" / "SICK_trial.txt")
    c.evals.dev.format = "sick"
    c.objective.loss = "infonce"
    c.objective.loss_kwargs = {"scale": 20.0, "symmetric": False}
    c.batch_size = 32
    c.num_epochs = 3.0
    c.eval_every = 10
    c.checkpoint.every = 10
    return base.maybe_smoke(c, args)
