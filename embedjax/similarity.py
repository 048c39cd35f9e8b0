"""The one similarity core: losses and evaluation both call these functions.

Every function is a pure ``jnp`` function (jit-, grad- and vmap-friendly). Scores follow one
convention: **higher means more similar**, so distances come back negated
(``euclidean`` = -||a - b||_2, ``manhattan`` = -||a - b||_1).

* ``pairwise(a, b, metric)``: a_i vs b_i, ``(..., D), (..., D) -> (...)``.
* ``matrix(a, b, metric)``: every a vs every b, ``(N, D), (M, D) -> (N, M)``. Written with plain
  matmuls/einsums and no device logic, so when ``a`` and ``b`` are sharded over a mesh axis
  (``AxisType.Auto``) GSPMD inserts the all-gather: in-batch negatives span the global batch.
* ``angle_pairwise``: the AnglE angle similarity (docs/losses.md, "AnglE").
* ``hamming_pairwise`` / ``hamming_matrix`` (metric ``"hamming"``): negative Hamming distance of
  packed sign bits (uint8, 8 dimensions per byte; ``embedjax.eval.quantize.binary``), XOR +
  popcount over uint32 words (``packed_words``).
* ``topk`` / ``maxsim_topk``: chunked top-k over a large corpus, never materialising the (Q, N) score matrix.
* ``maxsim_pairwise`` / ``maxsim_matrix`` / ``maxsim_segments``: late interaction (ColBERT,
  arXiv:2004.12832): a query of token vectors scores a document by the sum over its tokens of
  the best dot product with any document token; padded (token masks) or packed (flat tokens
  with a text id each) rows. ``TokenMaxSim(dim)`` is MaxSim as a metric of ``matrix`` and
  ``pairwise`` (each text's token vectors flattened to one row), so every loss that takes a
  metric trains a ColBERT model unchanged.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

METRICS = ("cosine", "dot", "euclidean", "manhattan")
PAIRWISE_METRICS = METRICS + ("angle", "hamming")


def as_float32(x):
    """``x`` in at least float32 (bfloat16 embeddings become float32, float64 stays): similarity
    and loss math run in it whatever the compute dtype."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_norm(x, axis=-1, keepdims=False, eps=0.0):
    """sqrt(sum x^2) with a finite gradient at 0 (plain sqrt has an infinite one there)."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    if eps > 0:
        # max(||x||, eps) == sqrt(max(||x||^2, eps^2)); the max also guards the gradient.
        return jnp.sqrt(jnp.maximum(sq, eps * eps))
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def l2_normalize(x, axis=-1, eps=1e-12):
    """``x / max(||x||_2, eps)`` along ``axis`` (like ``torch.nn.functional.normalize``).

    A zero vector stays zero and has a finite gradient.
    """
    return x / _safe_norm(x, axis=axis, keepdims=True, eps=eps)


# ---------------------------------------------------------------- pairwise: a_i vs b_i


def cosine_pairwise(a, b, eps=1e-12):
    """Cosine similarity of a_i and b_i: ``(..., D), (..., D) -> (...)``."""
    return jnp.sum(l2_normalize(a, eps=eps) * l2_normalize(b, eps=eps), axis=-1)


def dot_pairwise(a, b):
    """Dot product of a_i and b_i."""
    return jnp.sum(a * b, axis=-1)


def euclidean_pairwise(a, b):
    """Negative Euclidean distance -||a_i - b_i||_2 (gradient 0, not NaN, at a_i == b_i)."""
    return -_safe_norm(a - b, axis=-1)


def manhattan_pairwise(a, b):
    """Negative Manhattan distance -||a_i - b_i||_1."""
    return -jnp.sum(jnp.abs(a - b), axis=-1)


def angle_pairwise(a, b, pooling="sum", eps=1e-12):
    """AnglE angle similarity of a_i and b_i (docs/losses.md, "AnglE"), in [0, 1] for 'sum'.

    Each (un-normalised) embedding of even size D is read as a complex vector of size D/2:
    real part = first D/2 dims, imaginary part = last D/2. For z = x + i y (text 1) and
    w = u + i v (text 2), per component k:

        Re_k = (x_k u_k + y_k v_k) / (|z| |w|),   Im_k = (y_k u_k - x_k v_k) / (|z| |w|)

    with |z| = sqrt(sum x^2 + y^2) the norm of the whole vector (this is z / w rescaled by
    |w|^2 / (|z||w|), as in angle-emb). The score is ``|sum_k Re_k + sum_k Im_k|`` for
    ``pooling='sum'``; ``pooling='mean'`` averages over the D concatenated (Re, Im) entries,
    i.e. divides the sum by D (angle-emb's ``torch.mean`` over ``concat(re, im)``).
    Multiply by the scale (angle_tau) in the loss, not here.
    """
    d = a.shape[-1]
    if d % 2:
        raise ValueError(f"angle similarity needs an even embedding size, got {d}")
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' or 'mean', got {pooling!r}")
    h = d // 2
    x, y = a[..., :h], a[..., h:]
    u, v = b[..., :h], b[..., h:]
    denom = _safe_norm(a, eps=eps) * _safe_norm(b, eps=eps)
    total = jnp.sum(x * u + y * v, axis=-1) + jnp.sum(y * u - x * v, axis=-1)
    score = total / denom
    if pooling == "mean":
        score = score / d
    return jnp.abs(score)


def packed_words(bits):
    """Packed sign bits ``(..., B)`` uint8 (``np.packbits`` layout) as ``(..., ceil(B / 4))`` uint32
    words (zero bytes appended when B is not a multiple of 4): the same bits, so XOR + popcount
    distances are unchanged, with a quarter of the operations (uint32 popcounts run ~20x faster
    than uint8 ones on XLA:CPU)."""
    bits = jnp.asarray(bits)
    if bits.dtype == jnp.uint32:
        return bits
    pad = -bits.shape[-1] % 4
    if pad:
        bits = jnp.pad(bits, [(0, 0)] * (bits.ndim - 1) + [(0, pad)])
    return jax.lax.bitcast_convert_type(bits.reshape(*bits.shape[:-1], -1, 4), jnp.uint32)


def _popcount_xor(a, b):
    return jax.lax.population_count(jnp.bitwise_xor(a, b)).astype(jnp.int32)


def hamming_pairwise(a, b):
    """Negative Hamming distance of packed bits a_i, b_i: ``(..., D/8) uint8 -> (...)`` int32
    (computed on ``packed_words``)."""
    return -jnp.sum(_popcount_xor(packed_words(a), packed_words(b)), axis=-1)


_PAIRWISE = {
    "cosine": cosine_pairwise,
    "dot": dot_pairwise,
    "euclidean": euclidean_pairwise,
    "manhattan": manhattan_pairwise,
    "angle": angle_pairwise,
    "hamming": hamming_pairwise,
}


def pairwise(a, b, metric="cosine"):
    """Similarity of a_i and b_i with ``metric`` in ``PAIRWISE_METRICS`` (or a ``TokenMaxSim``):
    ``(..., D) -> (...)``."""
    if not isinstance(metric, str):  # a metric object: TokenMaxSim, embedjax.m3.HeadSum
        return metric.pairwise(a, b)
    try:
        fn = _PAIRWISE[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose from {PAIRWISE_METRICS}") from None
    return fn(a, b)


# ---------------------------------------------------------------- matrix: all a vs all b


def dot_matrix(a, b):
    """All dot products: ``(N, D), (M, D) -> (N, M)``."""
    return jnp.einsum("nd,md->nm", a, b)


def cosine_matrix(a, b, eps=1e-12):
    """All cosine similarities: ``(N, D), (M, D) -> (N, M)``."""
    return dot_matrix(l2_normalize(a, eps=eps), l2_normalize(b, eps=eps))


def euclidean_matrix(a, b):
    """All negative Euclidean distances: ``(N, D), (M, D) -> (N, M)``.

    Uses ||a||^2 + ||b||^2 - 2 a.b (one matmul, O(NM) memory, like torch.cdist for large
    inputs); the squared distance is clamped at 0 against round-off. Expect ~1e-3 absolute
    error for near-identical float32 vectors; use ``euclidean_pairwise`` when that matters.
    """
    sq = (
        jnp.sum(a * a, axis=-1)[:, None]
        + jnp.sum(b * b, axis=-1)[None, :]
        - 2.0 * dot_matrix(a, b)
    )
    sq = jnp.maximum(sq, 0.0)
    positive = sq > 0
    return -jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def manhattan_matrix(a, b):
    """All negative Manhattan distances: ``(N, D), (M, D) -> (N, M)``.

    Written as a broadcast-and-reduce that XLA fuses (no (N, M, D) buffer in the forward
    pass); its gradient does hold an (N, M, D) buffer, so keep N, M modest when training.
    """
    return -jnp.sum(jnp.abs(a[:, None, :] - b[None, :, :]), axis=-1)


def hamming_matrix(a, b):
    """All negative Hamming distances of packed bits: ``(N, D/8), (M, D/8) uint8 -> (N, M)`` int32.

    A broadcast xor + popcount over uint32 words (``packed_words``) that XLA fuses (no (N, M, D/32)
    buffer)."""
    a, b = packed_words(a), packed_words(b)
    return -jnp.sum(_popcount_xor(a[:, None, :], b[None, :, :]), axis=-1)


_MATRIX = {
    "cosine": cosine_matrix,
    "dot": dot_matrix,
    "euclidean": euclidean_matrix,
    "manhattan": manhattan_matrix,
    "hamming": hamming_matrix,
}


def matrix(a, b, metric="cosine"):
    """All-pairs similarity with ``metric`` in ``METRICS`` or ``"hamming"`` (or a ``TokenMaxSim``):
    ``(N, D), (M, D) -> (N, M)``."""
    if not isinstance(metric, str):  # a metric object: TokenMaxSim, embedjax.m3.HeadSum
        return metric.matrix(a, b)
    try:
        fn = _MATRIX[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose from {tuple(_MATRIX)}") from None
    return fn(a, b)


# ---------------------------------------------------------------- late interaction (MaxSim)


def _masked_max(scores, d_mask, masked_as_zero: bool):
    """Max over the last axis (document tokens) of the kept ones; 0 where none is kept.
    ``masked_as_zero``: masked tokens score 0 instead of being left out (ColBERT's and PyLate's
    zeroed padding: a query token whose every real match is negative then gets 0)."""
    if d_mask is not None:
        scores = jnp.where(d_mask.astype(bool), scores, 0.0 if masked_as_zero else -jnp.inf)
    best = jnp.max(scores, axis=-1)
    return jnp.where(jnp.isfinite(best), best, 0.0)


def maxsim_pairwise(q, d, q_mask=None, d_mask=None, *, masked_as_zero: bool = False):
    """MaxSim of q_i and d_i: ``(..., Tq, D), (..., Td, D) -> (...)``, the sum over the kept query
    tokens (``q_mask`` (..., Tq), 1 = kept) of the best dot product with a kept document token
    (``d_mask`` (..., Td)). Normalise the token vectors first for ColBERT's cosine MaxSim."""
    best = _masked_max(jnp.einsum("...qh,...th->...qt", as_float32(q), as_float32(d)),
                       None if d_mask is None else d_mask[..., None, :], masked_as_zero)
    if q_mask is not None:
        best = best * q_mask.astype(best.dtype)
    return jnp.sum(best, axis=-1)


def maxsim_matrix(q, d, q_mask=None, d_mask=None, *, masked_as_zero: bool = False):
    """MaxSim of every query with every document: ``(N, Tq, D), (M, Td, D) -> (N, M)`` (masks
    ``(N, Tq)``, ``(M, Td)``). Holds an (N, M, Tq, Td) block: sized for a batch's in-batch
    negatives; search a corpus chunk by chunk with it, never as one block."""
    scores = jnp.einsum("nqh,mth->nmqt", as_float32(q), as_float32(d))
    best = _masked_max(scores, None if d_mask is None else d_mask[None, :, None, :], masked_as_zero)
    if q_mask is not None:
        best = best * q_mask[:, None, :].astype(best.dtype)
    return jnp.sum(best, axis=-1)


def maxsim_segments(q_tokens, q_ids, d_tokens, d_ids, num_queries: int, num_documents: int):
    """MaxSim of packed rows: flat token vectors ``q_tokens (Nq, D)``, ``d_tokens (Nd, D)`` with the
    index of their text (``q_ids`` (Nq,), ``d_ids`` (Nd,); an id outside [0, num) is padding) ->
    ``(num_queries, num_documents)``. Each text's tokens are its own, wherever they sit in the
    rows; the cost is one (Nq, Nd) token-score block."""
    scores = as_float32(q_tokens) @ as_float32(d_tokens).T  # (Nq, Nd)
    d_seg = jnp.where((d_ids >= 0) & (d_ids < num_documents), d_ids, num_documents)
    best = jax.ops.segment_max(scores.T, d_seg, num_segments=num_documents + 1)[:num_documents]  # (M, Nq)
    best = jnp.where(jnp.isfinite(best), best, 0.0)  # a document with no token
    q_seg = jnp.where((q_ids >= 0) & (q_ids < num_queries), q_ids, num_queries)
    return jax.ops.segment_sum(best.T, q_seg, num_segments=num_queries + 1)[:num_queries]


@dataclasses.dataclass(frozen=True)
class TokenMaxSim:
    """MaxSim as a metric of ``matrix`` / ``pairwise``: a text is its ``T`` token vectors of width
    ``dim`` flattened to one row ``(..., T * dim)``, the tokens that do not score zeroed. A zero
    document token scores 0 and a zero query token adds 0: PyLate's masked-as-zero padding
    (``maxsim_*(..., masked_as_zero=True)``). Queries and documents may hold different token
    counts. Not symmetric: ``a`` holds the queries. Hashable, so it can sit in a loss's static
    keyword arguments. ``query_mean``: divided by the query's non-zero tokens (BGE-M3's
    multi-vector score, a mean over query tokens instead of a sum)."""

    dim: int
    query_mean: bool = False

    def tokens(self, x):
        """``(..., T * dim) -> (..., T, dim)``."""
        if x.shape[-1] % self.dim:
            raise ValueError(f"TokenMaxSim(dim={self.dim}): a row of {x.shape[-1]} values is not whole tokens")
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.dim, self.dim)

    def flatten(self, tokens, score_mask=None):
        """``(..., T, dim)`` token vectors (their ``score_mask`` (..., T): 1 = scores) -> ``(..., T * dim)``."""
        if score_mask is not None:
            tokens = tokens * score_mask[..., None].astype(tokens.dtype)
        return tokens.reshape(*tokens.shape[:-2], tokens.shape[-2] * tokens.shape[-1])

    def _query_tokens(self, q):
        """``(..., 1)``-broadcastable count of a query's scoring (non-zero) tokens, at least 1."""
        return jnp.maximum(jnp.sum(jnp.any(q != 0, axis=-1), axis=-1), 1).astype(jnp.float32)

    def matrix(self, a, b):
        q = self.tokens(a)
        scores = maxsim_matrix(q, self.tokens(b))
        return scores / self._query_tokens(q)[:, None] if self.query_mean else scores

    def pairwise(self, a, b):
        q = self.tokens(a)
        scores = maxsim_pairwise(q, self.tokens(b))
        return scores / self._query_tokens(q) if self.query_mean else scores


# ---------------------------------------------------------------- chunked top-k


def topk(queries, corpus, k, *, metric="cosine", chunk_size=4096, num_valid=None):
    """Top-``k`` corpus entries for every query, scanning the corpus in chunks.

    ``queries (Q, D)``, ``corpus (N, D)`` -> ``(scores (Q, k), indices (Q, k))``, best first,
    ``indices`` into the corpus. A loop over chunks of ``chunk_size`` rows (the last one ends at N,
    overlapping the one before: the corpus is never padded or copied) keeps a running top-k merged
    with each chunk's scores by ``jax.lax.top_k`` (``chunked_topk``). Peak extra memory is
    O(Q * (k + chunk_size)), never the (Q, N) matrix. ``k`` may exceed ``chunk_size`` but not N.
    Ties go to the lower corpus index. ``num_valid`` (may be traced): only the first ``num_valid``
    rows are real, the rest score -inf (a shard's padding).
    """
    return chunked_topk(lambda chunk: matrix(queries, chunk, metric), corpus, queries.shape[0], k,
                        chunk_size=chunk_size, dtype=jnp.result_type(queries.dtype, corpus.dtype, jnp.float32),
                        num_valid=num_valid)


def maxsim_topk(queries, query_mask, documents, document_mask, k, *, chunk_size=256, masked_as_zero=False):
    """Top-``k`` documents for every query by MaxSim (``maxsim_matrix``), the corpus scanned in
    chunks of ``chunk_size`` documents as ``topk`` does: ``queries (Q, Tq, D)``, ``query_mask
    (Q, Tq)``, ``documents (N, Td, D)``, ``document_mask (N, Td)`` -> ``(scores (Q, k), indices
    (Q, k))``. Peak extra memory O(Q * chunk_size * Tq * Td), never a (Q, N, Tq, Td) block."""
    return chunked_topk(lambda chunk: maxsim_matrix(queries, chunk[0], query_mask, chunk[1],
                                                    masked_as_zero=masked_as_zero),
                        (documents, document_mask), queries.shape[0], k, chunk_size=chunk_size,
                        dtype=jnp.result_type(queries.dtype, documents.dtype, jnp.float32))


def block_size(chunk_size: int, k: int) -> int:
    """The block length of ``chunked_topk``'s two-stage selection for a chunk of ``chunk_size``
    rows and top ``k``: the power of two nearest sqrt(chunk_size / k) that divides the chunk (so
    blocks and candidates, chunk / b + k * b, are fewest), or 1 (one stage) when the chunk holds
    fewer than 4k blocks of at least 4 rows."""
    b = 1 << max(0, round(math.log2(max(chunk_size / k, 1)) / 2))
    while b > 1 and chunk_size % b:
        b //= 2
    return b if b >= 4 and chunk_size // b >= 4 * k else 1


def chunked_topk(score_chunk, corpus, num_queries: int, k: int, *, chunk_size: int, dtype=jnp.float32,
                 num_valid=None, block: int | None = None):
    """The chunked top-k scan behind ``topk`` and ``maxsim_topk``: ``corpus`` is an array or a tuple
    of arrays with the documents on axis 0, ``score_chunk(chunk) -> (num_queries, chunk rows)``;
    rows from ``num_valid`` on (default: none, N) score -inf.

    Each step selects with ``lax.top_k`` over the running best followed by the candidates (so the
    running best, lower indices, wins ties) and maps the winners' positions back to corpus indices
    arithmetically (no (Q, k + chunk) index matrix is built). XLA:CPU's top-k pays per element it
    scans, so a chunk is selected in two stages when it is long enough (``block``, default
    ``block_size(chunk, k)``): the chunk's blocks of ``block`` rows are ranked by their maximum
    together with the running best, only the (at most k) blocks that rank in that top k can hold a
    row of the new top k (every row above the k-th of those maxima is in one of them), and the final
    top-k scans the running best and those blocks' rows: chunk / block + k * block elements instead
    of chunk. Exact, ties included (a block's maximum stands for its first maximal row)."""
    leaves = corpus if isinstance(corpus, tuple) else (corpus,)
    n = leaves[0].shape[0]
    if not 0 < k <= n:
        raise ValueError(f"need 0 < k <= corpus size, got k={k}, N={n}")
    chunk_size = min(chunk_size, n)
    n_chunks = math.ceil(n / chunk_size)
    valid = n if num_valid is None else num_valid
    q = num_queries
    init = (jnp.full((q, k), -jnp.inf, dtype), jnp.full((q, k), -1, jnp.int32))
    b = block_size(chunk_size, k) if block is None else int(block)
    if b < 1 or chunk_size % b:
        raise ValueError(f"block {b} does not divide the chunk of {chunk_size} rows")
    g = chunk_size // b

    def step(i, carry):
        best_scores, best_idx = carry
        # Chunk i scores rows lo.. ; the last chunk ends at N (no padded copy of the corpus), so it
        # may overlap the one before: rows below lo were scored already, rows from `valid` on are
        # padding, and both score -inf (masked where they are read: no masked copy of the scores).
        lo = i * chunk_size
        start = jnp.minimum(lo, n - chunk_size)
        chunk = tuple(jax.lax.dynamic_slice_in_dim(x, start, chunk_size) for x in leaves)
        scores = score_chunk(chunk if isinstance(corpus, tuple) else chunk[0]).astype(dtype)  # (Q, chunk)
        live = lambda rows: (rows >= lo) & (rows < valid)  # noqa: E731  (global row numbers)
        offsets = jnp.arange(chunk_size if b == 1 else b, dtype=jnp.int32)
        if b == 1:  # candidates: the chunk's rows
            candidates, rows = jnp.where(live(start + offsets)[None, :], scores, -jnp.inf), None
        else:
            blocks = scores.reshape(q, g, b)
            first = start + jnp.arange(g, dtype=jnp.int32) * b  # each block's first row

            def edge(row):  # the block holding `row` (clipped into the chunk) and its live rows' maximum
                e = jnp.clip((row - start) // b, 0, g - 1)
                block_scores = jax.lax.dynamic_index_in_dim(blocks, e, axis=1, keepdims=False)  # (Q, b)
                return e, jnp.max(jnp.where(live(start + e * b + offsets), block_scores, -jnp.inf), axis=1)

            # Block maxima of the raw scores where the block is all live; the (at most two) blocks
            # holding the bounds lo and valid - 1 take the maximum of their live rows; others -inf.
            (e_lo, m_lo), (e_hi, m_hi) = edge(lo), edge(valid - 1)
            index = jnp.arange(g, dtype=jnp.int32)[None, :]
            block_max = jnp.where((first >= lo) & (first + b <= valid), blocks.max(axis=2),
                                  jnp.where(index == e_lo, m_lo[:, None],
                                            jnp.where(index == e_hi, m_hi[:, None], -jnp.inf)))
            # the blocks whose maximum ranks in the top k of (running best, block maxima)
            _, at = jax.lax.top_k(jnp.concatenate([best_scores, block_max], axis=1), k)
            chosen = jnp.sort(jnp.where(at >= k, at - k, g), axis=1)  # block index order; unused ones (g) last
            taken = jnp.take_along_axis(blocks, jnp.minimum(chosen, g - 1)[:, :, None], axis=1)
            rows = chosen[:, :, None] * b + offsets  # (Q, k, b), rows of the chunk
            keep = (chosen < g)[:, :, None] & live(start + rows)
            candidates, rows = jnp.where(keep, taken, -jnp.inf).reshape(q, k * b), rows.reshape(q, k * b)
        # Running best first, so on ties the earlier (lower) index wins; positions < k are the
        # running best's entries, the others candidates (chunk rows start + row).
        top_scores, pos = jax.lax.top_k(jnp.concatenate([best_scores, candidates], axis=1), k)
        kept = jnp.take_along_axis(best_idx, jnp.minimum(pos, k - 1), axis=1)
        row = pos - k if rows is None else jnp.take_along_axis(rows, jnp.maximum(pos - k, 0), axis=1)
        return top_scores, jnp.where(pos < k, kept, start + row)

    scores, indices = jax.lax.fori_loop(0, n_chunks, step, init)
    return scores, indices
