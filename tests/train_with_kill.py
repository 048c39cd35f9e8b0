"""``scripts/train.py`` that SIGKILLs itself after step ``$EMBEDJAX_KILL_AT_STEP``: fault
injection through the loop's ``Callback`` seam (no test code in the loop). Same flags as
scripts/train.py; used by the resume tests."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import train  # noqa: E402  (scripts/train.py: defines the flags)
from absl import app  # noqa: E402

from embedjax import cli  # noqa: E402
from embedjax.train.callbacks import Callback  # noqa: E402

KILL_AT = int(os.environ["EMBEDJAX_KILL_AT_STEP"])


def kill(step, state, metrics):
    if step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash


if __name__ == "__main__":
    app.run(lambda argv: cli.run(lambda a: train.main(a, callbacks=[Callback(every=1, fn=kill)]), argv))
