"""``scripts/train.py`` as the tests run it: it SIGKILLs itself after step
``$EMBEDJAX_KILL_AT_STEP`` (0: never), fault injection through the loop's ``Callback`` seam (no
test code in the loop), and every process of a multi-process run writes the persistent
compilation cache. Same flags as scripts/train.py; used by the resume and multi-process tests."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import train  # noqa: E402  (scripts/train.py: defines the flags)
from absl import app  # noqa: E402

from embedjax import cli  # noqa: E402
from embedjax.train.callbacks import Callback  # noqa: E402

KILL_AT = int(os.environ.get("EMBEDJAX_KILL_AT_STEP", "0"))


def every_process_writes_the_compilation_cache():
    """JAX writes persistent-cache entries from process 0 only, and on CPU another process's keys
    differ from process 0's (they hash its view of the topology), so process 1 of every test run
    (a resumed one, the next test's) compiled everything again while process 0 waited for it at
    the first collective. Here each process writes its own entries: distinct keys, no contention."""
    from jax._src import compiler, distributed

    write = getattr(compiler, "_cache_write", None)
    if write is None or getattr(write, "every_process", False) or not hasattr(distributed, "global_state"):
        return  # a JAX that changed these private names: process 0 alone writes (slower, same results)

    def write_as_process_0(*args, **kw):
        state = distributed.global_state
        process_id, state.process_id = state.process_id, 0
        try:
            return write(*args, **kw)
        finally:
            state.process_id = process_id

    write_as_process_0.every_process = True
    compiler._cache_write = write_as_process_0


def kill(step, state, metrics):
    if KILL_AT and step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash


if __name__ == "__main__":
    every_process_writes_the_compilation_cache()
    app.run(lambda argv: cli.run(lambda a: train.main(a, callbacks=[Callback(every=1, fn=kill)]), argv))
