"""Matryoshka (MRL) fine-tune on STS-B: the AnglE objective on the first 384/256/128/64/32 dims.

    python scripts/train.py --config configs/stsb_matryoshka.py --workdir workdirs/stsb_mrl
    python scripts/train.py --config configs/stsb_matryoshka.py:smoke --workdir /tmp/smoke_mrl
"""

from configs import base, stsb_angle


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke",))
    c = stsb_angle.get_config(None)
    c.objective.matryoshka_dims = [384, 256, 128, 64, 32]
    c.objective.matryoshka_weights = [1.0, 1.0, 1.0, 1.0, 1.0]
    return base.maybe_smoke(c, args)
