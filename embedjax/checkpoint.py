"""Orbax checkpoints of a run: the train state and the data position, saved in one step.

Two managers under the workdir:

* ``checkpoints/`` keeps the latest ``keep`` steps: ``state`` (params, optimizer, step, RNG)
  and ``data`` (the input iterator's JSON state). This is what a run resumes from.
* ``best/`` keeps the ``keep_best`` best params by the dev metric (for export).

Saving is asynchronous; Orbax writes each step into a temporary directory and renames
it only once complete, so a process killed mid-save (even by SIGKILL) leaves the previous
steps intact and the next run resumes from the newest complete one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Latest-N resumable checkpoints plus best-k params of one workdir."""

    def __init__(self, workdir: str | Path, *, keep: int = 2, keep_best: int = 1, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True):
        workdir = Path(workdir).absolute()
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
        )
        self.best = None
        if best_metric:
            self.best = ocp.CheckpointManager(
                workdir / "best",
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep_best,
                    best_fn=lambda metrics: metrics[best_metric],
                    best_mode=best_mode,
                    enable_async_checkpointing=async_save,
                    create=True,
                ),
            )

    # ------------------------------------------------------------------ latest

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Saves the train state and the data position as one step (asynchronously)."""
        return self.latest.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
        """``(state, data_state, step)`` of ``step`` (default: the latest complete one).

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (from
        ``jax.eval_shape`` + the run's shardings): arrays come back placed that way.
        """
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.latest.directory}")
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"], step

    # ------------------------------------------------------------------ best

    def save_best(self, step: int, params, metrics: dict[str, float]) -> None:
        """Offers ``params`` at ``step`` with its dev ``metrics``; the best k are kept."""
        if self.best is None:
            return
        self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                     metrics=ocp.args.JsonSave(metrics)),
                       metrics={k: float(v) for k, v in metrics.items()})

    def best_step(self) -> int | None:
        return None if self.best is None else self.best.best_step()

    def restore_best(self, abstract_params) -> tuple[Any, dict, int]:
        """``(params, metrics, step)`` of the best saved step."""
        step = self.best_step()
        if step is None:
            raise FileNotFoundError("no best checkpoint saved")
        restored = self.best.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                                                   metrics=ocp.args.JsonRestore()))
        return restored["params"], restored["metrics"], step

    # ------------------------------------------------------------------ lifecycle

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self.latest.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        if self.best is not None:
            self.best.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of ``tree`` (arrays or structs) placed with ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
