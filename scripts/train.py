"""Train an embedding model from a config; resume automatically from the workdir.

    python scripts/train.py --config configs/stsb_angle.py --workdir workdirs/stsb_angle
    python scripts/train.py --config configs/stsb_angle.py:smoke --workdir /tmp/w --config.optim.learning_rate=1e-5

At the end the best checkpoint by dev Spearman is exported to the workdir
(``embedjax.load_pretrained(workdir)`` and ``SentenceTransformer(workdir)`` load it)
and the dev evaluation before and after training is printed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from embedjax.train.loop import train_and_evaluate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/stsb_angle.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, exported model")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    del argv
    # embedjax's own messages at INFO; Orbax/absl internals only when something is wrong.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("embedjax").setLevel(logging.INFO)
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    before, after = summary["before"], summary["after"]
    key = "dev/cosine_spearman"
    print()
    if before is not None:
        print(f"dev Spearman before training: {before[key]:.2f}")
    print(f"dev Spearman after training:  {after[key]:.2f}  (best step {summary['best_step']} of {summary['steps']})")
    select = _CONFIG.value.get("select_metric", key)
    if select != key:  # e.g. the 2D grid mean: say what the checkpoint was chosen by
        start = "" if before is None else f"{before[select]:.2f} before, "
        print(f"{select} (selection metric): {start}{after[select]:.2f} after")
    print(f"model exported to {Path(_WORKDIR.value).absolute()}")


if __name__ == "__main__":
    app.run(main)
