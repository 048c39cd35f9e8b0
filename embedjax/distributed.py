"""Several hosts, one program: ``jax.distributed`` start-up and what the hosts must agree on.

A multi-host run is N copies of the same script (one per host, each driving its local
devices) that JAX joins into one global device mesh. Three things make that correct:

* ``initialize``: join the processes, or fail loudly. A pod whose coordinator is
  configured but unreachable must not quietly run as N independent jobs writing one workdir.
* ``global_batch``: each host builds its slice of the global batch from its own texts, so
  padded lengths and packed row counts differ per host, and packed text indices count from
  0 on every host. Before the slices become one ``jax.Array``
  (``jax.make_array_from_process_local_data`` needs equal shapes) the hosts agree on the
  largest shape (one tiny allgather a step) and offset their text indices, so the loss sees
  exactly the global batch a single process would build.
* ``to_host`` / ``barrier``: a full host copy of arrays sharded over every host (export,
  evaluation), and a rendezvous (export on host 0, then everyone reads it).

On one process every function here is the identity or a no-op.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from embedjax.data.batch import Batch

log = logging.getLogger(__name__)

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
_NO_CLUSTER = "coordinator_address should be defined"  # jax's message when nothing is configured or detected


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins this process to a multi-host run; returns True if it is one.

    * ``coordinator_address`` given (or ``$JAX_COORDINATOR_ADDRESS`` set): a configured
      multi-process run; ``jax.distributed.initialize`` must succeed or its error is raised.
    * nothing given: ``jax.distributed.initialize()`` auto-detects TPU pods, SLURM, Open MPI
      and other clusters JAX knows; an error from a detected cluster is raised too. Only
      "no cluster here" means a single-process run.

    On CPU, collectives between processes use gloo (set before initialising).
    """
    configured = coordinator_address or os.environ.get(COORDINATOR_ENV)
    if configured and _cpu_only():
        _use_gloo()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as err:
        if configured or _NO_CLUSTER not in str(err):
            raise
        log.debug("single-process run (%s)", err)
        return False
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def _cpu_only() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    return platforms.split(",")[0].strip() == "cpu"


def _use_gloo() -> None:
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # newer jax: gloo is the default / option removed
        pass


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def allgather(x: np.ndarray) -> np.ndarray:
    """``(process_count, *x.shape)``: ``x`` of every process (host numpy in, host numpy out)."""
    if not is_multiprocess():
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def all_processes(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (each passes its own; one small allgather)."""
    return bool(allgather(np.asarray(bool(ok), np.int32)).all())


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier of this ``name``."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """Full numpy copies of (possibly sharded over several hosts) arrays, on every host."""
    if not is_multiprocess():
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# ---------------------------------------------------------------------------- batches


def agree_batch(batch: Batch, target: np.ndarray, *, pad_token_id: int, process_index: int) -> Batch:
    """This host's slice of the global batch, padded to the agreed ``target`` sizes
    (``Batch.shape_signature`` maxed over hosts) and with packed text indices made global.

    Padding is inert: padded tokens have mask 0 / segment 0 and padded rows hold no text.
    Packed text i of host h becomes global text ``h * texts_per_host + i`` (every host packs
    the same number of texts: its rows times the packed sides).
    """
    batch = batch.padded_to(target, pad_token_id)
    return batch.with_text_offset(process_index * batch.packed_texts)


def global_batch(batch: Batch, *, pad_token_id: int) -> Batch:
    """``agree_batch`` with the sizes agreed across every process (one small allgather);
    the batch unchanged on a single process."""
    if not is_multiprocess():
        return batch
    target = allgather(batch.shape_signature()).max(axis=0)
    return agree_batch(batch, target, pad_token_id=pad_token_id, process_index=jax.process_index())


__all__ = ["agree_batch", "all_processes", "allgather", "barrier", "global_batch", "initialize", "is_multiprocess", "to_host"]

