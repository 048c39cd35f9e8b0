"""Orbax checkpoints of a run: the train state and the data position, saved in one step.

Two managers under the workdir:

* ``checkpoints/`` keeps the latest ``keep`` steps: ``state`` (params, optimizer, step, RNG)
  and ``data`` (each process's input-iterator position, one JSON file per process). This
  is what a run resumes from.
* ``best/`` keeps the ``keep_best`` best params by the dev metric (for export). A step whose
  selection metric is NaN or +-inf is never a candidate (NaN compares unordered, so Orbax
  could otherwise keep it as "best"): it is skipped with a warning.

Saving is asynchronous; Orbax writes each step into a temporary directory and renames
it only once complete, so a process killed mid-save (even by SIGKILL) leaves the previous
steps intact and the next run resumes from the newest complete one. The workdir may be
remote (``gs://bucket/run``): Orbax reads and writes it through ``etils.epath`` and tensorstore.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from embedjax import paths

log = logging.getLogger(__name__)


class Checkpointer:
    """Latest-N resumable checkpoints plus best-k params of one workdir."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, keep_best: int = 1, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True):
        workdir = paths.path(workdir)  # absolute; or gs://...: Orbax writes either
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.skipped_best: list[tuple[int, float]] = []  # (step, value) offered with a non-finite metric
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                                 multiprocessing_options=_barriers("latest")),
        )
        self.best = None
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if best_metric:
            worst = -math.inf if best_mode == "max" else math.inf

            def best_fn(metrics):  # a non-finite value on disk (an older run) ranks last, never first
                value = float(metrics[best_metric])
                return value if math.isfinite(value) else worst

            self.best = ocp.CheckpointManager(
                workdir / "best",
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep_best,
                    best_fn=best_fn,
                    best_mode=best_mode,
                    enable_async_checkpointing=async_save,
                    create=True,
                    multiprocessing_options=_barriers("best"),
                ),
            )

    # ------------------------------------------------------------------ latest

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Saves the train state and this process's data position as one step (asynchronously).

        Every process calls it: the state is written shard by shard, and each process's
        ``data_state`` (its own input iterator's position) goes to its own file
        ``data/process_<i>-of-<n>.json``, so each host resumes its own shard of the data.
        """
        return self.latest.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=grain.checkpoint.CheckpointSave(item=_HostState(data_state))),
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
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    data=grain.checkpoint.CheckpointRestore(item=_HostState())),
        )
        return restored["state"], restored["data"].state, step

    # ------------------------------------------------------------------ best

    def save_best(self, step: int, params, metrics: dict[str, float]) -> bool:
        """Offers ``params`` at ``step`` with its dev ``metrics``; the best k are kept.

        Returns whether the step was saved as a candidate. A non-finite (NaN, +-inf) value
        of ``best_metric`` is never a candidate: the step is skipped with a warning (and
        listed in ``skipped_best``). A missing ``best_metric`` raises ``KeyError``.
        """
        if self.best is None:
            return False
        if self.best_metric not in metrics:
            raise KeyError(f"best_metric {self.best_metric!r} is not among the dev metrics {sorted(metrics)}")
        value = float(metrics[self.best_metric])
        if not math.isfinite(value):
            self.skipped_best.append((step, value))
            log.warning("step %d: %s is %s; not a best-checkpoint candidate", step, self.best_metric, value)
            return False
        return bool(self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                                 metrics=ocp.args.JsonSave(metrics)),
                                   metrics={k: float(v) for k, v in metrics.items()}))

    def best_step(self) -> int | None:
        return None if self.best is None else self.best.best_step()

    def restore_best(self, abstract_params) -> tuple[Any, dict, int]:
        """``(params, metrics, step)`` of the best saved step.

        Raises ``FileNotFoundError`` when there is none, saying when that is because every
        offered step had a non-finite ``best_metric``.
        """
        if self.best is None:
            raise FileNotFoundError("no best checkpoint: this Checkpointer has no best_metric")
        self.best.wait_until_finished()
        step = self.best_step()
        if step is None:
            if self.skipped_best:
                offered = ", ".join(f"step {s}: {v}" for s, v in self.skipped_best)
                raise FileNotFoundError(
                    f"no best checkpoint in {self.best.directory}: every offered step had a non-finite "
                    f"{self.best_metric} ({offered}); expected at least one finite value")
            raise FileNotFoundError(f"no best checkpoint in {self.best.directory} (no step was offered)")
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


def _barriers(name: str) -> ocp.options.MultiprocessingOptions:
    """Distinct barrier names per manager: on several processes, Orbax names its async-save
    barriers by step, so the latest and best managers saving the same step would collide
    ("Barrier _async_write_complete.4 is already ongoing")."""
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


class _HostState:
    """A JSON-able dict in the shape grain's per-process Orbax handler saves and restores
    (``get_state() -> bytes``, ``set_state(bytes)``): one file per process."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by the handler after a restore
        pass


def abstract_like(tree, shardings):
    """ShapeDtypeStructs of ``tree`` (arrays or structs) placed with ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
