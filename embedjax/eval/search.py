"""Exact top-k search with the corpus sharded over every device.

``sharded_topk`` splits the corpus rows over a mesh (default: every device of
``jax.devices()``). Each device runs ``embedjax.similarity.topk`` on its shard (chunked: no
device ever holds a full query x corpus score matrix), shifts its indices to global ones, and
the per-shard ``(Q, k)`` candidates are all-gathered and merged by one global ``top_k``.

Exactness: the corpus is zero-padded to a multiple of the device count (no copy on one device);
padded rows score -inf inside each shard's scan (``similarity.topk``'s ``num_valid``), so they
never push a real row out of a shard's ``k`` candidates, and again before the merge. Ties
go to the lower global index (within a shard ``similarity.topk`` prefers the lower index,
and the gathered candidates are laid out shard by shard), so any device count gives the
same indices.

``sharded_maxsim_topk`` does the same for ColBERT's late interaction: each text is a set of token
vectors, each device scans its documents' tokens in chunks by MaxSim (``similarity.maxsim_topk``),
and the shards' candidates merge the same way.

``binary_rescored_topk`` shortlists by Hamming distance of the packed sign bits (``sharded_topk``
with ``metric="hamming"``) and re-ranks the shortlist by the exact float metric.
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


def _merge_shards(scores, idx, *, axes, n: int, per_shard: int, k: int):
    """Inside ``shard_map``: a shard's local top-k made global (indices shifted, padding rows at
    -inf), gathered from every shard and merged into the global top-``k`` (replicated)."""
    idx = idx + jax.lax.axis_index(axes) * per_shard
    scores = jnp.where(idx < n, scores, -jnp.inf)  # zero padding never wins
    scores = jax.lax.all_gather(scores, axes, axis=1, tiled=True)  # (Q, devices * k_local), shard-major
    idx = jax.lax.all_gather(idx, axes, axis=1, tiled=True)
    top, pos = jax.lax.top_k(scores, k)  # ties: earlier position = lower global index
    return top, jnp.take_along_axis(idx, pos, axis=1)


@functools.lru_cache(maxsize=32)
def _search_fn(mesh: Mesh, n: int, per_shard: int, k: int, k_local: int, metric: str, chunk_size: int):
    axes = tuple(mesh.axis_names)

    def shard_topk(q, c):
        # the shard's rows from `valid` on are padding: -inf inside the scan, so k_local = k suffices
        valid = jnp.clip(n - jax.lax.axis_index(axes) * per_shard, 0, per_shard)
        scores, idx = similarity.topk(q, c, k_local, metric=metric, chunk_size=chunk_size, num_valid=valid)
        return _merge_shards(scores, idx, axes=axes, n=n, per_shard=per_shard, k=k)

    # check_vma=False: similarity.topk's scan starts from invariant constants and carries
    # per-shard (varying) values; the output is replicated by construction (after all_gather).
    return jax.jit(jax.shard_map(shard_topk, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(), P()),
                                 check_vma=False))


@functools.lru_cache(maxsize=32)
def _maxsim_search_fn(mesh: Mesh, n: int, per_shard: int, k: int, k_local: int, chunk_size: int,
                      masked_as_zero: bool):
    axes = tuple(mesh.axis_names)

    def shard_topk(q, q_mask, docs, d_mask):
        scores, idx = similarity.maxsim_topk(q, q_mask, docs, d_mask, k_local, chunk_size=chunk_size,
                                             masked_as_zero=masked_as_zero)
        return _merge_shards(scores, idx, axes=axes, n=n, per_shard=per_shard, k=k)

    return jax.jit(jax.shard_map(shard_topk, mesh=mesh, in_specs=(P(), P(), P(axes), P(axes)),
                                 out_specs=(P(), P()), check_vma=False))


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Works on one host or many (every host holds the same full array).
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _padded_aligned(x: np.ndarray, rows: int) -> np.ndarray:
    """``x`` with ``rows`` zero rows appended, in a 64-byte aligned C-contiguous buffer: the CPU
    client then places it (and its row shards) without a copy. ``x`` itself when it already is one
    and no rows are added; otherwise one copy here (numpy's own arrays are 16-byte aligned, and a
    device_put of those copies at about half this speed)."""
    if not rows and x.flags.c_contiguous and x.ctypes.data % 64 == 0:
        return x
    shape = (x.shape[0] + rows, *x.shape[1:])
    nbytes = math.prod(shape) * x.dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    out = raw[offset : offset + nbytes].view(x.dtype).reshape(shape)
    out[: x.shape[0]] = x
    out[x.shape[0]:] = 0
    return out


def _local(x: jax.Array) -> np.ndarray:
    return np.asarray(x.addressable_data(0))  # replicated: any local copy is the whole array


def sharded_topk(queries, corpus, k: int, *, mesh: Mesh | None = None, metric: str = "cosine",
                 chunk_size: int = 16384, query_chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` corpus rows for every query: ``(scores (Q, k) float32, indices (Q, k) int32)``, best first.

    Args:
      queries: ``(Q, D)`` float, or ``(Q, D/8)`` uint8 packed bits with ``metric="hamming"``.
      corpus: ``(N, D)`` (same kind); ``0 < k <= N``.
      mesh: the corpus rows are split over all of its devices (default ``default_mesh()``).
      metric: ``"cosine"``, ``"dot"``, ``"euclidean"``, ``"manhattan"`` or ``"hamming"``
        (``embedjax.similarity``; higher is more similar, so Hamming scores are -distance).
      chunk_size: at most this many corpus rows scored at once per device (peak memory
        O(Q * (k + chunk_size)): 67 MB per device for 1,024 queries); each device's rows are cut
        into equal chunks, each selected in two stages (``similarity.chunked_topk``'s blocks).
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
    if not binary:  # no copy when they already are float32
        queries, corpus = queries.astype(np.float32, copy=False), corpus.astype(np.float32, copy=False)
    n = corpus.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= corpus size, got k={k}, N={n}")
    mesh = default_mesh() if mesh is None else mesh
    per_shard = math.ceil(n / mesh.size)
    padding = per_shard * mesh.size - n
    # the shard's rows in near-equal chunks of at most chunk_size, a multiple of 16 rows when that
    # fits (whole blocks for the two-stage selection; the last chunk overlaps the one before)
    n_chunks = math.ceil(per_shard / max(chunk_size, 1))
    chunk = min(-(-math.ceil(per_shard / n_chunks) // 16) * 16, max(chunk_size, 1), per_shard)
    fn = _search_fn(mesh, n, per_shard, k, min(k, per_shard), metric, chunk)

    return _by_query_chunks(fn, (queries,), (corpus,), padding, mesh, k, query_chunk_size)


# Queries rescored at once: bounds the (chunk, candidates, D) gathered floats, and keeps them in
# cache (rescoring 1,000 queries' 400 / 1,000 candidates among 100k on a 2-core CPU: 0.34 / 0.71 s in
# chunks of 64 queries, 0.22 / 0.36 s in chunks of 16).
RESCORE_QUERY_CHUNK = 16
_unit_rows = jax.jit(similarity.l2_normalize)


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def _rescore(queries, corpus, candidates, *, k: int, metric: str):
    """``(q, D)`` queries, each against its own candidate rows ``candidates (q, C)`` of ``corpus``:
    the best ``k`` by ``similarity.matrix`` (the exact search's scores), ties to the lower index."""
    candidates = jnp.sort(candidates, axis=1)  # index order: top_k's ties go to the lower index
    scores = jax.vmap(lambda x, rows: similarity.matrix(x[None], corpus[rows], metric)[0])(queries, candidates)
    top, at = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(candidates, at, axis=1)


def binary_rescored_topk(queries, corpus, k: int, *, rescore_multiplier: int = 4, metric: str = "cosine",
                         corpus_bits=None, mesh: Mesh | None = None, chunk_size: int = 16384,
                         query_chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by a packed-binary first stage and exact float rescoring: ``(scores (Q, k) float32,
    indices (Q, k) int32)``, best first.

    Queries and corpus are binarised (sign bits, ``np.packbits`` layout: sentence-transformers'
    ``quantize_embeddings(precision="ubinary")``, ``embedjax.eval.quantize.binary``), the
    ``k * rescore_multiplier`` nearest documents by Hamming distance (XOR + popcount,
    ``sharded_topk(metric="hamming")``) are shortlisted, and the shortlist is re-ranked by the exact
    float ``metric`` (``similarity.matrix``) on ``queries`` and ``corpus``; ties go to the lower corpus
    index, so with a shortlist that holds the true top ``k`` the result is ``sharded_topk``'s. As
    sentence-transformers' ``semantic_search_faiss`` / ``semantic_search_usearch`` with
    ``rescore=True``, except that the shortlist is rescored with the float documents, not their
    unpacked bits. ``rescore_multiplier=0``: no rescoring, the Hamming ranking (scores: -distance).

    Args:
      queries, corpus: ``(Q, D)`` and ``(N, D)`` float embeddings; ``0 < k <= N``.
      corpus_bits: the corpus's packed bits when already computed (``quantize.binary(corpus)``).
      mesh, chunk_size, query_chunk_size: the first stage's, as ``sharded_topk``'s; its chunks hold
        at least 32 x the shortlist rows (XLA's top-k costs grow with k: a long shortlist pays it
        on fewer, longer chunks, 1.45x faster for 400 candidates among 100k on CPU).
    """
    from embedjax.eval import quantize

    queries = np.asarray(queries, np.float32)
    corpus = np.asarray(corpus, np.float32)
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"need (Q, D) queries and (N, D) corpus, got {queries.shape} and {corpus.shape}")
    if metric not in similarity.METRICS:
        raise ValueError(f"metric must be one of {similarity.METRICS}, got {metric!r}")
    if rescore_multiplier < 0:
        raise ValueError(f"rescore_multiplier must be >= 0, got {rescore_multiplier}")
    n = corpus.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= corpus size, got k={k}, N={n}")
    bits = quantize.binary(corpus) if corpus_bits is None else np.asarray(corpus_bits, np.uint8)
    if bits.shape != (n, -(-corpus.shape[1] // 8)):
        raise ValueError(f"corpus_bits {bits.shape} are not the packed bits of a {corpus.shape} corpus")
    shortlist = min(k * rescore_multiplier, n) if rescore_multiplier else k
    hamming, candidates = sharded_topk(quantize.binary(queries), bits, shortlist, metric="hamming", mesh=mesh,
                                       chunk_size=max(chunk_size, 32 * shortlist), query_chunk_size=query_chunk_size)
    if not rescore_multiplier or not len(queries):
        return (hamming, candidates) if not rescore_multiplier else (hamming[:, :k], candidates[:, :k])
    corpus_dev = jax.device_put(_padded_aligned(corpus, 0))
    if metric == "cosine":  # normalised once here, not once per gathered candidate row
        queries, corpus_dev, metric = np.asarray(_unit_rows(queries)), _unit_rows(corpus_dev), "dot"
    step = min(RESCORE_QUERY_CHUNK, len(queries))
    pending = []
    for start in range(0, len(queries), step):
        q, idx = queries[start : start + step], candidates[start : start + step]
        fill = step - len(q)  # the last chunk padded: one compile
        pending.append((len(q), _rescore(np.pad(q, ((0, fill), (0, 0))), corpus_dev, np.pad(idx, ((0, fill), (0, 0))),
                                         k=k, metric=metric)))
    scores = np.concatenate([np.asarray(s)[:rows] for rows, (s, _) in pending]).astype(np.float32)
    indices = np.concatenate([np.asarray(i)[:rows] for rows, (_, i) in pending]).astype(np.int32)
    return scores, indices


def _by_query_chunks(fn, queries: tuple, corpus: tuple, padding: int, mesh: Mesh, k: int, query_chunk_size: int):
    """``fn(*query arrays, *corpus arrays)`` over the queries ``query_chunk_size`` at a time (the
    last chunk padded: one compile), the corpus arrays zero-padded by ``padding`` rows and split
    over the mesh once; ``(scores (Q, k) float32, indices (Q, k) int32)``."""
    rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    replicated = NamedSharding(mesh, P())
    pad_rows = lambda x, n: np.pad(x, ((0, n),) + ((0, 0),) * (x.ndim - 1)) if n else x  # noqa: E731
    corpus_dev = [_global(_padded_aligned(x, padding), rows) for x in corpus]
    q_total = queries[0].shape[0]
    step = max(1, min(query_chunk_size, q_total))
    scores, indices = [], []
    for start in range(0, q_total, step):
        chunk = [x[start : start + step] for x in queries]
        s, i = fn(*[_global(pad_rows(x, step - len(x)), replicated) for x in chunk], *corpus_dev)
        scores.append(_local(s)[: len(chunk[0])])
        indices.append(_local(i)[: len(chunk[0])])
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
    return np.concatenate(scores).astype(np.float32), np.concatenate(indices).astype(np.int32)


def pad_tokens(vectors) -> tuple[np.ndarray, np.ndarray]:
    """Texts' token vectors (a list of (n_i, D) arrays, or an (N, T, D) array with no padding) as
    ``(tokens (N, T, D) float32, mask (N, T) int32)``, zero-padded to the longest."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 3:
        return vectors.astype(np.float32), np.ones(vectors.shape[:2], np.int32)
    vectors = [np.asarray(v, np.float32) for v in vectors]
    if not vectors or any(v.ndim != 2 or v.shape[1] != vectors[0].shape[1] for v in vectors):
        raise ValueError("need a non-empty list of (tokens, D) arrays of one width D")
    width = max(1, max(len(v) for v in vectors))
    tokens = np.zeros((len(vectors), width, vectors[0].shape[1]), np.float32)
    mask = np.zeros((len(vectors), width), np.int32)
    for i, v in enumerate(vectors):
        tokens[i, : len(v)], mask[i, : len(v)] = v, 1
    return tokens, mask


def sharded_maxsim_topk(queries, documents, k: int, *, mesh: Mesh | None = None, chunk_size: int = 64,
                        query_chunk_size: int = 64, masked_as_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents for every query by ColBERT's MaxSim, the corpus's token vectors split over
    every device of ``mesh``: ``(scores (Q, k) float32, indices (Q, k) int32)``, best first.

    ``queries`` / ``documents``: each text's token vectors (lists of (n_i, D) arrays, as
    ``ColbertEncoder.encode_*`` returns them, or (N, T, D) arrays); documents are zero-padded to the
    longest with a mask, so padding never scores (``masked_as_zero``: it scores 0, PyLate's
    padded scoring). Each device scans its documents ``chunk_size`` at a time against
    ``query_chunk_size`` queries: its peak is one (queries, chunk, Tq, Td) block, never a
    queries x corpus x tokens one. Ties go to the lower corpus index on any device count.
    """
    q_tokens, q_mask = pad_tokens(queries)
    d_tokens, d_mask = pad_tokens(documents)
    if q_tokens.shape[2] != d_tokens.shape[2]:
        raise ValueError(f"queries have {q_tokens.shape[2]}-wide token vectors, documents {d_tokens.shape[2]}")
    n = d_tokens.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= corpus size, got k={k}, N={n}")
    mesh = default_mesh() if mesh is None else mesh
    per_shard = math.ceil(n / mesh.size)
    padding = per_shard * mesh.size - n
    k_local = min(k + padding, per_shard)
    fn = _maxsim_search_fn(mesh, n, per_shard, k, k_local, min(chunk_size, per_shard), masked_as_zero)
    return _by_query_chunks(fn, (q_tokens, q_mask), (d_tokens, d_mask), padding, mesh, k, query_chunk_size)
