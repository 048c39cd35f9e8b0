"""Train an embedding model from a config; resume automatically from the workdir.

    python scripts/train.py --config configs/stsb_angle.py --workdir workdirs/stsb_angle
    python scripts/train.py --config configs/stsb_angle.py:smoke --workdir /tmp/w --config.optim.learning_rate=1e-5

Several hosts (one process per host; on TPU pods, SLURM and Open MPI the three flags are
detected automatically):

    python scripts/train.py --config ... --workdir ... \
        --coordinator_address=10.0.0.1:1234 --num_processes=4 --process_id=$RANK

Every host reads and writes the workdir, so on several hosts it is shared storage, e.g.
``--workdir gs://bucket/run`` (``etils.epath``; needs ``gcsfs``). ``scripts/run_tpu.sh``
creates a TPU VM slice and launches this on all its workers.

At the end the best checkpoint by the selection metric is exported to the workdir
(``embedjax.load_pretrained(workdir)`` and ``SentenceTransformer(workdir)`` load it) and the
dev evaluation before and after training is printed. Rerunning a finished workdir reports
its result; rerunning with a config that changes the run is refused unless
``--allow_config_change``. Bad input is one line on stderr and exit status 2 (``--debug``
shows the traceback).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from embedjax import cli, distributed  # noqa: E402
from embedjax.train import config as train_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/stsb_angle.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, exported model; local or "
                                "gs://bucket/path (a multi-host run's must be one every host reads)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for a multi-process run (default: $JAX_COORDINATOR_"
                                   "ADDRESS, or auto-detected on TPU pods / SLURM / Open MPI; else one process)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "resume a workdir whose config.json differs in what changes the run")
_DEBUG = flags.DEFINE_bool("debug", False, "on an error, show the full traceback instead of one line")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv, callbacks=()) -> None:
    """The run the flags describe; ``callbacks`` (``embedjax.train.callbacks.Callback``) go to the loop."""
    del argv
    # embedjax's own messages at INFO; Orbax/absl internals only when something is wrong.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("embedjax").setLevel(logging.INFO)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from embedjax.train.loop import train_and_evaluate  # after initialize: it may touch devices

    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, callbacks=callbacks,
                                 allow_config_change=_ALLOW_CHANGE.value)
    report(summary, _CONFIG.value.select_metric, _WORKDIR.value)


def report(summary: dict, select: str, workdir: str) -> None:
    """Prints each STS evaluator's Spearman (``<name>/cosine_spearman``) and the selection metric
    before and after training (process 0 only)."""
    import jax

    from embedjax import paths

    if jax.process_index() != 0:
        return
    before, after = summary["before"], summary["after"]
    print()
    if summary.get("finished_before"):
        print(f"{workdir} already holds a finished run (delete it, or use another --workdir, to train again)")
    best = f"(best step {summary['best_step']} of {summary['steps']})"
    stsb = [k for k in after if k.endswith("/cosine_spearman") and "+" not in k]
    width = max((len(k.split("/")[0]) for k in stsb), default=0)
    for key in stsb:
        name = key.split("/")[0].ljust(width)
        if before is not None:
            print(f"{name} Spearman before training: {before[key]:.2f}")
        print(f"{name} Spearman after training:  {after[key]:.2f}  {best}")
    if select not in stsb:  # e.g. a mean of dev sets, the 2D grid mean or a retrieval metric
        start = "" if before is None else f"{before[select]:.4g} before, "
        print(f"{select} (selection metric): {start}{after[select]:.4g} after  {best}")
    print(f"model exported to {paths.path(workdir)}")  # local: absolute; or gs://...


def check_config_overrides(argv: list[str]) -> None:
    """A mistyped ``--config.key`` fails here, in one line naming the closest keys, before
    absl's flag parsing (whose message for it is a multi-line traceback)."""
    keys = train_config.override_keys_from_argv(argv)
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    if not keys or spec is None:
        return
    path, _, variant = spec.partition(":")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config: no config file {path}")
    module_spec = importlib.util.spec_from_file_location("embedjax_cli_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    train_config.check_override_keys(module.get_config(variant or None), keys)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing under the CLI contract: a bad flag value, a config-variant typo or a
    config file that fails to load is one ``error:`` line and exit status 2, not absl's
    multi-line FATAL message (status 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        raise ValueError(" ".join(str(err).split())) from err


if __name__ == "__main__":
    cli.run(check_config_overrides, sys.argv[1:], strip_debug=True)
    app.run(lambda argv: cli.run(main, argv, debug=_DEBUG.value), flags_parser=lambda argv: cli.run(parse_flags, argv))
