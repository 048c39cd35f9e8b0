"""Fine-tune all-MiniLM-L6-v2 on STS-B train with CoSENT; select on STS-B dev.

    python scripts/train.py --config configs/stsb_cosent.py --workdir workdirs/stsb_cosent
    python scripts/train.py --config configs/stsb_cosent.py:smoke --workdir /tmp/smoke_cosent
"""

from configs import base


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke",))
    c = base.base_config()
    c.objective.loss = "cosent"
    c.objective.loss_kwargs = {"scale": 20.0}
    return base.maybe_smoke(c, args)
