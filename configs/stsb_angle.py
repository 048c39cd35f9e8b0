"""Fine-tune all-MiniLM-L6-v2 on STS-B train with AnglE; select on STS-B dev.

    python scripts/train.py --config configs/stsb_angle.py --workdir workdirs/stsb_angle
    python scripts/train.py --config configs/stsb_angle.py:smoke --workdir /tmp/smoke
"""

from configs import base


def get_config(arg: str | None = None):
    args = base.parse_arg(arg)
    c = base.base_config()
    c.objective.loss = "angle"
    c.objective.loss_kwargs = {"cosine_w": 1.0, "ibn_w": 1.0, "angle_w": 0.02, "label_range": (0.0, 5.0)}
    c.optim.learning_rate = 2e-5
    c.num_epochs = 1.0
    if "smoke" in args:
        base.smoke(c)
    return c
