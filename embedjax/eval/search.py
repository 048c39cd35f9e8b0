"""Exact top-k search with the corpus sharded over every device.

``sharded_topk`` splits the corpus rows over a mesh (default: every device of
``jax.devices()``). Each device runs ``embedjax.similarity.topk`` on its shard (chunked: no
device ever holds a full query x corpus score matrix), shifts its indices to global ones, and
the per-shard ``(Q, k)`` candidates are all-gathered and merged by one global ``top_k``.

Exactness: the corpus is zero-padded to a multiple of the device count; padded rows get
score -inf before the merge. Each shard keeps ``k + padding`` candidates (padding < devices),
so a zero row that outscores real ones on its shard can never push a needed row out. Ties
go to the lower global index (within a shard ``similarity.topk`` prefers the lower index,
and the gathered candidates are laid out shard by shard), so any device count gives the
same indices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from embedjax import similarity


def default_mesh() -> Mesh:
    """A 1-D ``("corpus",)`` mesh over every device of every host."""
    devices = jax.devices()
    return jax.make_mesh((len(devices),), ("corpus",), axis_types=(AxisType.Auto,), devices=devices)


@functools.lru_cache(maxsize=32)
def _search_fn(mesh: Mesh, n: int, per_shard: int, k: int, k_local: int, metric: str, chunk_size: int):
    axes = tuple(mesh.axis_names)

    def shard_topk(q, c):
        scores, idx = similarity.topk(q, c, k_local, metric=metric, chunk_size=chunk_size)
        idx = idx + jax.lax.axis_index(axes) * per_shard
        scores = jnp.where(idx < n, scores, -jnp.inf)  # zero padding never wins
        scores = jax.lax.all_gather(scores, axes, axis=1, tiled=True)  # (Q, devices * k_local), shard-major
        idx = jax.lax.all_gather(idx, axes, axis=1, tiled=True)
        top, pos = jax.lax.top_k(scores, k)  # ties: earlier position = lower global index
        return top, jnp.take_along_axis(idx, pos, axis=1)

    # check_vma=False: similarity.topk's scan starts from invariant constants and carries
    # per-shard (varying) values; the output is replicated by construction (after all_gather).
    return jax.jit(jax.shard_map(shard_topk, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(), P()),
                                 check_vma=False))


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Works on one host or many (every host holds the same full array).
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _local(x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_data(0))  # replicated: any local copy is the whole array


def sharded_topk(queries, corpus, k: int, *, mesh: Mesh | None = None, metric: str = "cosine",
                 chunk_size: int = 4096, query_chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` corpus rows for every query: ``(scores (Q, k) float32, indices (Q, k) int32)``, best first.

    Args:
      queries: ``(Q, D)`` float, or ``(Q, D/8)`` uint8 packed bits with ``metric="hamming"``.
      corpus: ``(N, D)`` (same kind); ``0 < k <= N``.
      mesh: the corpus rows are split over all of its devices (default ``default_mesh()``).
      metric: ``"cosine"``, ``"dot"``, ``"euclidean"``, ``"manhattan"`` or ``"hamming"``
        (``embedjax.similarity``; higher is more similar, so Hamming scores are -distance).
      chunk_size: corpus rows scored at once per device (peak memory O(Q * (k + chunk_size))).
      query_chunk_size: queries searched at once (the last chunk is padded, so one compile).

    Ties go to the lower corpus index, so the result is the same on any number of devices.
    """
    queries, corpus = np.asarray(queries), np.asarray(corpus)
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"need (Q, D) queries and (N, D) corpus, got {queries.shape} and {corpus.shape}")
    binary = metric == "hamming"
    if binary != (corpus.dtype == np.uint8) or binary != (queries.dtype == np.uint8):
        raise ValueError(f"metric 'hamming' takes packed uint8 bits on both sides and other metrics floats; "
                         f"got metric {metric!r} with {queries.dtype} queries and {corpus.dtype} corpus")
    if not binary:
        queries, corpus = queries.astype(np.float32), corpus.astype(np.float32)
    n = corpus.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= corpus size, got k={k}, N={n}")
    mesh = default_mesh() if mesh is None else mesh
    per_shard = math.ceil(n / mesh.size)
    padding = per_shard * mesh.size - n
    k_local = min(k + padding, per_shard)
    fn = _search_fn(mesh, n, per_shard, k, k_local, metric, min(chunk_size, per_shard))

    rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    replicated = NamedSharding(mesh, P())
    corpus_dev = _global(np.pad(corpus, ((0, padding), (0, 0))), rows)
    q_total = queries.shape[0]
    step = max(1, min(query_chunk_size, q_total))
    scores, indices = [], []
    for start in range(0, q_total, step):
        chunk = queries[start : start + step]
        padded = np.pad(chunk, ((0, step - len(chunk)), (0, 0)))
        s, i = fn(_global(padded, replicated), corpus_dev)
        scores.append(_local(s)[: len(chunk)])
        indices.append(_local(i)[: len(chunk)])
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return np.concatenate(scores).astype(np.float32), np.concatenate(indices).astype(np.int32)
