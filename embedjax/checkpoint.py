"""Orbax checkpoints of a run: the train state and the data position, saved in one step.

Two managers under the workdir:

* ``checkpoints/`` keeps the latest ``keep`` steps: ``state`` (params, optimizer, step, RNG)
  and ``data`` (each process's input-iterator position, one JSON file per process). This
  is what a run resumes from.
* ``best/`` keeps the ``keep_best`` best params by the dev metric (for export). A step whose
  selection metric is NaN or +-inf is never a candidate (NaN compares unordered, so Orbax
  could otherwise keep it as "best"): it is skipped with a warning.

Every step also holds ``integrity``: the run's config (``config=``) and a checksum of every
array it saved (``checksums``: the bits of each leaf, summed position-weighted on the device,
so any changed value is caught whatever the storage layout). A restore verifies them: a step
that fails to read (a truncated or corrupted file, an empty data position) or whose arrays no
longer match their checksums is reported by path, moved to ``damaged/`` in the workdir, and
the next newest step is tried; when none restores, ``CheckpointDamaged`` says what to do.

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
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from embedjax import distributed, paths

log = logging.getLogger(__name__)


class CheckpointDamaged(ValueError):
    """No checkpoint of a workdir restores and verifies."""


def checksums(tree) -> dict[str, int]:
    """``{leaf path: checksum}`` of every array in ``tree``: the leaf's bits as unsigned integers,
    each times its (flat) position mod 65521, plus one, summed modulo 2^32 on the device. Integer
    sums are exact in any order, so sharded and unsharded copies of a value agree, and one changed
    bit changes the sum."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        return {}
    sums = _leaf_checksums([x for _, x in leaves])
    return {jax.tree_util.keystr(path): int(np.asarray(s.addressable_data(0))) for (path, _), s in zip(leaves, sums)}


def _bits(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if x.dtype.itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise TypeError(f"no checksum for dtype {x.dtype}")


@jax.jit
def _leaf_checksums(leaves):
    out = []
    for x in leaves:
        bits = _bits(x).reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) % jnp.uint32(65521) + jnp.uint32(1)
        out.append(jnp.sum(bits * weights, dtype=jnp.uint32))
    return out


def _mismatch(saved: dict[str, int], restored: dict[str, int]) -> str | None:
    """What differs between saved and recomputed checksums (None: nothing)."""
    bad = [path for path in saved if restored.get(path) != saved[path]]
    if not bad and saved.keys() == restored.keys():
        return None
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return f"the values of {shown or 'its arrays'} do not match the checksums saved with them"


class Checkpointer:
    """Latest-N resumable checkpoints plus best-k params of one workdir, verified on restore.

    ``config``: the run's config (JSON-able dict) stored in every step, so a workdir remembers
    what trained it even without ``train_config.json`` (``saved_config``)."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, keep_best: int = 1, best_metric: str | None = None,
                 best_mode: str = "max", async_save: bool = True, config: dict | None = None):
        workdir = paths.path(workdir)  # absolute; or gs://...: Orbax writes either
        self.workdir = workdir
        self.config = config
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
        The step's ``integrity`` item holds the config and the state's checksums.
        """
        return self.latest.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    data=grain.checkpoint.CheckpointSave(item=_HostState(data_state)),
                                    integrity=ocp.args.JsonSave(self._integrity(state))),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
        """``(state, data_state, step)`` of ``step``, or by default of the newest step that
        restores and verifies (a damaged newer one is reported, moved aside and skipped).

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (from
        ``jax.eval_shape`` + the run's shardings): arrays come back placed that way.
        """
        def read(manager, s):
            restored = manager.restore(s, args=ocp.args.Composite(**self._restore_args(
                manager, s, state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(item=_HostState()))))
            if restored["data"].state is None or not isinstance(restored["data"].state, dict):
                raise ValueError("its data position (data/process_*.json) is empty")
            return restored["state"], restored

        state, restored, step = self._first_good(self.latest, read, step)
        return state, restored["data"].state, step

    def _integrity(self, tree) -> dict:
        return {"config": self.config, "checksums": checksums(tree)}

    @staticmethod
    def _restore_args(manager, step: int, **items) -> dict:
        """The restore arguments of ``items``, plus ``integrity`` when the step has it (checkpoints
        written before it existed have none)."""
        if (epath.Path(manager.directory) / str(step) / "integrity").exists():
            items["integrity"] = ocp.args.JsonRestore()
        return items

    def _first_good(self, manager, read, step: int | None):
        """``(value, restored items, step)`` of ``step`` or, by default, of the first of the
        manager's steps (newest first, or best first for ``best/``) that ``read(manager, step)``
        restores and whose arrays match their checksums. On several processes every one must
        succeed: a step any of them cannot read is skipped by all."""
        if step is not None:
            candidates = [step]
        else:
            candidates = self._candidates(manager)
        failures = []
        while candidates:
            s = candidates[0]
            try:
                value, restored = read(manager, s)
                problem = None
            except Exception as err:  # noqa: BLE001  (any failure to read is a damaged checkpoint)
                value, restored, problem = None, None, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            if not distributed.all_processes(problem is None):
                problem = problem or "another process could not read it"
            if problem is None and restored.get("integrity"):
                problem = _mismatch(restored["integrity"]["checksums"], checksums(value))
            if problem is None:
                return value, restored, s
            path = epath.Path(manager.directory) / str(s)
            failures.append(f"{path}: {problem}")
            log.warning("checkpoint %s does not restore: %s", path, problem)
            if step is not None:
                break
            self._move_aside(manager, s)
            candidates = self._candidates(manager)
        if not failures:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
        moved = "" if step is not None else f" (moved to {self.workdir / 'damaged'})"
        raise CheckpointDamaged(
            f"no checkpoint in {manager.directory} restores: " + "; ".join(failures) + f"{moved}. To train again "
            f"from the start, delete {self.workdir / 'checkpoints'} and {self.workdir / 'best'}, or use another "
            "--workdir.")

    def _candidates(self, manager) -> list[int]:
        """The steps to try in order: the newest first, or for ``best/`` the best."""
        if manager is self.best:
            return [] if manager.best_step() is None else [manager.best_step()]
        return sorted(manager.all_steps(), reverse=True)

    def _move_aside(self, manager, step: int) -> None:
        """Moves a damaged step out of its manager's directory into ``workdir/damaged/`` (process 0)."""
        source = epath.Path(manager.directory) / str(step)
        if jax.process_index() == 0:
            target = self.workdir / "damaged" / f"{epath.Path(manager.directory).name}-{step}-{int(time.time())}"
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            log.warning("moved the damaged checkpoint %s to %s", source, target)
        distributed.barrier(f"moved aside {manager.directory} {step}")
        manager.reload()

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
                                                                 metrics=ocp.args.JsonSave(metrics),
                                                                 integrity=ocp.args.JsonSave(self._integrity(params))),
                                   metrics={k: float(v) for k, v in metrics.items()}))

    def best_step(self) -> int | None:
        return None if self.best is None else self.best.best_step()

    def restore_best(self, abstract_params) -> tuple[Any, dict, int]:
        """``(params, metrics, step)`` of the best saved step that restores and verifies (a
        damaged one is reported, moved aside, and the next best is taken).

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

        def read(manager, s):
            restored = manager.restore(s, args=ocp.args.Composite(**self._restore_args(
                manager, s, params=ocp.args.StandardRestore(abstract_params), metrics=ocp.args.JsonRestore())))
            return restored["params"], restored

        params, restored, step = self._first_good(self.best, read, None)
        return params, restored["metrics"], step

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
