"""InfoNCE / multiple-negatives ranking, with hard negatives, symmetry and duplicate masking;
multiple positives, qrels-aware and false-negative-aware masking, extra directions (GTE) and
hardness weighting.

L = CE(scale * s(a_i, [b_1..b_B, n_1..n_{Bk}]), target i)   (docs/losses.md, "InfoNCE")

Works on the GLOBAL batch: with the batch sharded over a mesh axis of type ``Auto`` the
similarity matrices are jnp matmuls and GSPMD gathers the candidates, so every anchor sees
the positives and negatives of every device. The targets are ``arange`` over the global
batch (positives come first in the candidate list), so the label layout cannot depend on
how the batch is split across devices. ``embedjax.losses.ring`` computes the same loss without the
gather, one device's candidates at a time, through the same column blocks and masks.
"""
from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from embedjax import similarity as sim

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = ("in_batch_negatives", "hard_negatives", "all_negatives")
Q2D, Q2Q, D2Q, D2D = DIRECTIONS


def duplicate_mask(row_ids, cand_ids, cand_known, target_cols):
    """Boolean (R, C) mask of candidates to drop: same id as one of the row's texts.

    ``row_ids``: list of (R,) id arrays (the row's own texts, e.g. anchor and positive);
    ``cand_ids`` (C,) with ``cand_known`` (C,) saying which candidate ids are real;
    ``target_cols`` (R,): the column that is the row's target, never masked.
    """
    r = target_cols.shape[0]
    mask = jnp.zeros((r, cand_ids.shape[0]), bool)
    for ids in row_ids:
        mask = mask | (ids[:, None] == cand_ids[None, :])
    mask = mask & cand_known[None, :]
    is_target = jnp.arange(cand_ids.shape[0])[None, :] == target_cols[:, None]
    return mask & ~is_target


def cross_entropy_rows(logits, targets, mask=None, valid=None):
    """Mean over rows of -log softmax(logits_r)[targets_r]; ``mask`` entries set to -inf.

    ``valid`` (R,) bool: only those rows count (the mean is over them; 0 if there are none).
    """
    if mask is not None:
        logits = jnp.where(mask, -jnp.inf, logits)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    return _mean_rows(jax.nn.logsumexp(logits, axis=1) - target_logit, valid)


def _mean_rows(per_row, valid):
    if valid is None:
        return jnp.mean(per_row)
    # where, not a product: a dropped row's value never reaches the sum or its gradient.
    return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _or(a, b):
    return b if a is None else a if b is None else a | b


def _ids_or_unknown(ids, shape, name="ids"):
    if ids is None:
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool)
    return _reshaped(ids, shape, name), jnp.ones(shape, bool)


def _reshaped(x, shape, name):
    x = jnp.asarray(x)
    if x.size != shape[0] * (shape[1] if len(shape) > 1 else 1):
        raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    return jnp.reshape(x, shape)


def _bool_mask(x, shape, name):
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {x.shape}")
    return x.astype(bool)


# ---------------------------------------------------------------- layout of the global batch


class _Batch(NamedTuple):
    """The batch (global, or one device's shard under the ring), candidates in the documented order."""

    b: int  # queries
    m: int  # positive slots per query
    k: int  # hard negatives per query
    queries: jax.Array  # (B, D)
    slots: jax.Array  # (B*m, D) positive slots, row-major: slot (i, j) is index i*m + j
    docs: jax.Array  # (C, D), C = B*m + B*k: all positive slots, then all negatives
    doc_ids: jax.Array  # (C,)
    doc_known: jax.Array  # (C,) which doc ids were given
    slot_real: jax.Array | None  # (B*m,) positive_mask flattened (None: all real)
    anchor_ids: jax.Array | None  # (B,)
    own_ids: jax.Array | None  # (B, K): anchor id, positive ids, relevant ids of query i
    own_valid: jax.Array | None  # (B, K)

    @property
    def col_query(self):  # (C,) the query each doc belongs to
        return jnp.concatenate([jnp.arange(self.b * self.m) // self.m, jnp.arange(self.b * self.k) // max(self.k, 1)])

    @property
    def col_real(self):  # (C,) real docs (None: all): the padding slots are not
        if self.slot_real is None:
            return None
        return jnp.concatenate([self.slot_real, jnp.ones((self.docs.shape[0] - self.slot_real.shape[0],), bool)])

    @property
    def col_is_slot(self):  # (C,) positive slot (True) or hard negative
        return jnp.arange(self.docs.shape[0]) < self.b * self.m


def _embeddings(x, b, width, name):
    """``x`` as (B, n, width): (B, width) means n = 1."""
    x = sim.as_float32(x)
    if x.ndim == 2:
        x = x[:, None, :]
    if x.ndim != 3 or x.shape[0] != b or x.shape[2] != width:
        raise ValueError(f"{name}: expected (B, {width}) or (B, n, {width}) with B = {b}, got shape {x.shape}")
    return x


def _layout(anchors, positives, negatives, positive_mask, anchor_ids, positive_ids, negative_ids,
            relevant_ids, relevant_mask, doc_width=None):
    anchors = sim.as_float32(anchors)
    if anchors.ndim != 2:
        raise ValueError(f"anchors: expected (B, D), got shape {anchors.shape}")
    b, d = anchors.shape
    d = d if doc_width is None else doc_width  # a token metric: documents hold their own token count
    pos = _embeddings(positives, b, d, "positives")
    m = pos.shape[1]
    slots = pos.reshape(b * m, d)
    pmask = _bool_mask(positive_mask, (b, m), "positive_mask")
    doc_ids, doc_known = _ids_or_unknown(positive_ids, (b * m,), "positive_ids")
    docs, k = slots, 0
    if negatives is not None:
        negs = _embeddings(negatives, b, d, "negatives")
        k = negs.shape[1]
        docs = jnp.concatenate([slots, negs.reshape(b * k, d)], axis=0)
        neg_ids, neg_known = _ids_or_unknown(negative_ids, (b * k,), "negative_ids")
        doc_ids = jnp.concatenate([doc_ids, neg_ids])
        doc_known = jnp.concatenate([doc_known, neg_known])

    # Every id that must never be a negative of query i: its own text, its positives, its qrels.
    own, valid = [], []
    if anchor_ids is not None:
        own.append(_reshaped(anchor_ids, (b, 1), "anchor_ids"))
        valid.append(jnp.ones((b, 1), bool))
    if positive_ids is not None:
        own.append(doc_ids[: b * m].reshape(b, m))
        valid.append(jnp.ones((b, m), bool) if pmask is None else pmask)
    if relevant_ids is not None:
        rel = jnp.asarray(relevant_ids)
        if rel.ndim != 2 or rel.shape[0] != b:
            raise ValueError(f"relevant_ids: expected (B, P) with B = {b}, got shape {rel.shape}")
        rmask = _bool_mask(relevant_mask, rel.shape, "relevant_mask")
        own.append(rel)
        valid.append(jnp.ones(rel.shape, bool) if rmask is None else rmask)
    elif relevant_mask is not None:
        raise ValueError("relevant_mask needs relevant_ids")
    return _Batch(
        b, m, k, anchors, slots, docs, doc_ids, doc_known,
        slot_real=None if pmask is None else pmask.reshape(b * m),
        anchor_ids=None if anchor_ids is None else own[0][:, 0],
        own_ids=jnp.concatenate(own, axis=1) if own else None,
        own_valid=jnp.concatenate(valid, axis=1) if own else None,
    )


# ---------------------------------------------------------------- candidates as column blocks
#
# The loss is a softmax per row over columns. Columns come in blocks: the gathered loss has one
# block (the whole global batch); the ring loss (``embedjax.losses.ring``) visits one device's
# shard at a time. A block carries everything a mask needs about its columns (ids, the query
# each column belongs to, its index in the documented global order), so the masks below are the
# same code in both.


class _Docs(NamedTuple):
    """A block of candidate documents: positive slots and hard negatives."""

    vecs: jax.Array  # (C, D)
    guide: jax.Array | None  # (C, D') the guide model's vectors of the same documents
    ids: jax.Array  # (C,)
    known: jax.Array  # (C,)
    query: jax.Array  # (C,) global index of the query each document belongs to
    is_slot: jax.Array  # (C,)
    real: jax.Array | None  # (C,) the padding slots are not (None: all real)
    index: jax.Array  # (C,) global column index: all B*m slots, then all B*k negatives


class _Queries(NamedTuple):
    """A block of candidate queries (query_to_query, doc_to_query and the symmetric direction)."""

    vecs: jax.Array  # (b, D)
    guide: jax.Array | None
    index: jax.Array  # (b,) global query index
    anchor_ids: jax.Array | None  # (b,)
    own_ids: jax.Array | None  # (b, K)
    own_valid: jax.Array | None


def _columns(batch, guide=None, shard=0, shards=1):
    """``(_Docs, _Queries)`` of ``batch``, the ``shard``-th of ``shards`` equal shards of the global
    batch (the gathered loss: the whole batch, shard 0 of 1). ``guide``: ``_guide_layout``'s vectors."""
    b, m, k = batch.b, batch.m, batch.k
    index = jnp.concatenate([shard * b * m + jnp.arange(b * m), shards * b * m + shard * b * k + jnp.arange(b * k)])
    docs = _Docs(batch.docs, None if guide is None else guide[2], batch.doc_ids, batch.doc_known,
                 shard * b + batch.col_query, batch.col_is_slot, batch.col_real, index)
    queries = _Queries(batch.queries, None if guide is None else guide[0], shard * b + jnp.arange(b),
                       batch.anchor_ids, batch.own_ids, batch.own_valid)
    return docs, queries


class _Rows(NamedTuple):
    """The cross-entropy rows (this batch's or shard's): one per real (query, positive slot), or one per query."""

    query: jax.Array  # (R,) global index of the row's query
    expand: Callable  # (b, ...) per-query array -> (R, ...)
    valid: jax.Array | None  # (R,) rows that count (None: all)
    target: jax.Array | None  # (R,) global column of the row's target (one row per slot), None: all_positives
    all_positives: bool
    m: int
    queries: jax.Array  # (b, D) the rows' queries (expanded by ``expand``)
    slots: jax.Array  # (b*m, D) the rows' positive slots (doc directions: one row per slot)
    guide_queries: jax.Array | None
    guide_slots: jax.Array | None
    anchor: jax.Array | None  # (R,) the anchor id of the row's query
    own_ids: jax.Array | None  # (R, K) the ids that are never a negative of the row's query
    own_valid: jax.Array | None
    slot_ids: jax.Array  # (b*m,) the slots' ids, and which are known
    slot_known: jax.Array

    def is_target(self, docs):
        """(R, C): the row's target column(s) in a block of documents."""
        if not self.all_positives:
            return docs.index[None, :] == self.target[:, None]
        targets = (docs.query[None, :] == self.query[:, None]) & docs.is_slot[None, :]
        if docs.real is None:
            return targets
        # A query without a real positive keeps slot 0 as a (dropped) target: its row stays finite.
        slot0 = (docs.index[None, :] == self.query[:, None] * self.m) & ~self.valid[:, None]
        return targets & (docs.real[None, :] | slot0)

    def own_docs(self, docs):
        """(R, C): the docs (slots and hard negatives) of the row's query."""
        return self.query[:, None] == docs.query[None, :]


def _rows(batch, all_positives, guide=None, shard=0):
    b, m = batch.b, batch.m
    own = dict(queries=batch.queries, slots=batch.slots, guide_queries=None if guide is None else guide[0],
               guide_slots=None if guide is None else guide[1], slot_ids=batch.doc_ids[: b * m],
               slot_known=batch.doc_known[: b * m])
    if not all_positives:  # row r = slot r = (r // m, r % m); its target is that slot's column
        expand = (lambda x: jnp.repeat(x, m, axis=0)) if m > 1 else (lambda x: x)
        query, valid, target = jnp.arange(b * m) // m, batch.slot_real, shard * b * m + jnp.arange(b * m)
    else:
        expand, query, target = (lambda x: x), jnp.arange(b), None
        valid = None if batch.slot_real is None else jnp.any(batch.slot_real.reshape(b, m), axis=1)
    pick = lambda x: None if x is None else expand(x)  # noqa: E731
    return _Rows(shard * b + query, expand, valid, target, all_positives, m, anchor=pick(batch.anchor_ids),
                 own_ids=pick(batch.own_ids), own_valid=pick(batch.own_valid), **own)


# ---------------------------------------------------------------- blocks, masks, reduction


def _candidate_blocks(rows, docs, queries, directions, metric, use_guide=False):
    """The raw (unscaled) similarity blocks of the rows against a block of columns, keyed by
    direction, each (R, n): the student's, or with ``use_guide`` the guide model's.

    Row r (query q, target slot d): query_to_doc s(q, docs), query_to_query s(q, queries),
    doc_to_query s(q_l, d) for every query l, doc_to_doc s(d, docs). The last two exist only
    with one row per slot, so their rows are the slots as they are. All metrics are symmetric.
    """
    row_q, row_d = (rows.guide_queries, rows.guide_slots) if use_guide else (rows.queries, rows.slots)
    col_d = docs.guide if use_guide else docs.vecs
    col_q = None if queries is None else queries.guide if use_guide else queries.vecs  # None: no query columns needed
    blocks = {Q2D: rows.expand(sim.matrix(row_q, col_d, metric))}
    if Q2Q in directions:
        blocks[Q2Q] = rows.expand(sim.matrix(row_q, col_q, metric))
    if D2Q in directions:
        blocks[D2Q] = sim.matrix(row_d, col_q, metric)
    if D2D in directions:
        blocks[D2D] = sim.matrix(row_d, col_d, metric)
    return blocks


def _id_hits(row_ids, row_valid, cand_ids, cand_known):
    """(R, N): candidate n's (known) id is one of row r's valid ids."""
    hits = (row_ids[:, :, None] == cand_ids[None, None, :]) & row_valid[:, :, None]
    return jnp.any(hits, axis=1) & cand_known[None, :]


def _threshold(rows, docs, rule_q2d):
    """(R,) the false-negative rule's bar: the rule score of the row's target (``all_positives``: the
    weakest real positive). ``docs`` must hold every target column (the row's own shard does)."""
    return jnp.min(jnp.where(rows.is_target(docs), rule_q2d, jnp.inf), axis=1)


def _block_masks(rows, docs, queries, directions, rule, bar, fn_margin, fn_relative, in_batch_negatives=True):
    """Boolean (R, n) drop mask (-inf) per block, or None where nothing is dropped.

    Never dropped: a row's target column(s) in query_to_doc, and s(q_i, d) in doc_to_query.
    ``rule``: the stop-gradient rule scores per block and ``bar`` (``_threshold``) (None without a
    false-negative rule).
    """
    fn = None
    if rule is not None:

        def fn(name):
            x = rule[name]
            drop = None if fn_margin is None else x > (bar + fn_margin)[:, None]
            return _or(drop, None if fn_relative is None else x > (fn_relative * bar)[:, None])

    own = None if rows.own_ids is None else (rows.own_ids, rows.own_valid)
    padding = None if docs.real is None else ~docs.real[None, :]
    own_docs = rows.own_docs(docs)
    masks = {}

    drop = padding
    if own is not None:
        drop = _or(drop, _id_hits(*own, docs.ids, docs.known))
    if rows.m > 1 and not rows.all_positives:  # the query's other positives are not negatives of this row
        drop = _or(drop, own_docs & docs.is_slot[None, :])
    if not in_batch_negatives:  # only the query's own documents compete (NV-Embed's second stage)
        drop = _or(drop, ~own_docs)
    if fn is not None:
        drop = _or(drop, fn(Q2D))
    masks[Q2D] = None if drop is None else drop & ~rows.is_target(docs)

    if Q2Q in directions:
        drop = rows.query[:, None] == queries.index[None, :]  # q_i itself
        if own is not None and queries.anchor_ids is not None:
            drop = drop | _id_hits(*own, queries.anchor_ids, jnp.ones(queries.anchor_ids.shape, bool))
        masks[Q2Q] = _or(drop, None if fn is None else fn(Q2Q))

    if D2Q in directions:  # row r = slot r: q_l is no negative of d if it is q_i's text or d is relevant to it
        drop = None
        if queries.anchor_ids is not None:
            drop = rows.anchor[:, None] == queries.anchor_ids[None, :]
        if queries.own_ids is not None:
            drop = _or(drop, _id_hits(queries.own_ids, queries.own_valid, rows.slot_ids, rows.slot_known).T)
        drop = _or(drop, None if fn is None else fn(D2Q))
        masks[D2Q] = None if drop is None else drop & (rows.query[:, None] != queries.index[None, :])

    if D2D in directions:
        drop = _or(own_docs, padding)  # every doc of query i (GTE / sentence-transformers)
        if own is not None:
            drop = drop | _id_hits(*own, docs.ids, docs.known)
        masks[D2D] = _or(drop, None if fn is None else fn(D2D))
    return masks


def _hardness_penalty(rows, docs, raw_qd, strength, mode):
    """LLaVE's alpha * stop_grad(s) on the query_to_doc logits of the negatives ``mode`` names."""
    own, slot = rows.own_docs(docs), docs.is_slot[None, :]
    applies = {
        "hard_negatives": own & ~slot,  # the query's own hard negatives only
        "in_batch_negatives": ~own,  # every doc of the other queries
        "all_negatives": ~(own & slot),  # everything but the query's positives
    }[mode]
    return jnp.where(applies, strength * jax.lax.stop_gradient(raw_qd), 0.0)


class _Options(NamedTuple):
    """The static options one block's logits need."""

    directions: tuple
    similarity: Any
    scale: float
    fn_margin: float | None
    fn_relative: float | None
    hardness: float
    hardness_mode: str
    in_batch_negatives: bool

    @property
    def has_rule(self):
        return self.fn_margin is not None or self.fn_relative is not None


def _rule_blocks(rows, docs, queries, opts, raw):
    """The false-negative rule's scores of a block (None without a rule): the guide's, or the student's own."""
    if not opts.has_rule:
        return None
    if rows.guide_queries is not None:
        return _candidate_blocks(rows, docs, queries, opts.directions, opts.similarity, use_guide=True)
    return {name: jax.lax.stop_gradient(s) for name, s in raw.items()}


def _block_logits(rows, docs, queries, opts, bar=None):
    """``(masked logits per direction, the rule's bar)`` of the rows against one block of columns;
    masked entries are -inf. ``bar``: the rule's (``_threshold``, None without a rule); None computes
    it from this block, which must then hold every target (the row's own shard)."""
    raw = _candidate_blocks(rows, docs, queries, opts.directions, opts.similarity)
    rule = _rule_blocks(rows, docs, queries, opts, raw)
    if rule is not None and bar is None:
        bar = _threshold(rows, docs, rule[Q2D])
    masks = _block_masks(rows, docs, queries, opts.directions, rule, bar, opts.fn_margin, opts.fn_relative,
                         opts.in_batch_negatives)
    logits = {name: opts.scale * s for name, s in raw.items()}
    if opts.hardness:
        logits[Q2D] = logits[Q2D] + _hardness_penalty(rows, docs, raw[Q2D], opts.hardness, opts.hardness_mode)
    masked = {name: lg if masks.get(name) is None else jnp.where(masks[name], -jnp.inf, lg)
              for name, lg in logits.items()}
    return masked, bar


def _target_logsumexp(rows, docs, q2d_logits):
    """(R,) log-sum-exp of the row's target logit(s); ``docs`` holds every target (the own shard)."""
    return jax.nn.logsumexp(jnp.where(rows.is_target(docs), q2d_logits, -jnp.inf), axis=1)


def _joint(masked):
    """One (R, n) block of the joint softmax from the per-direction blocks, in the documented order."""
    blocks = [masked[name] for name in DIRECTIONS if name in masked]
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def _back_block(rows, queries, scale, similarity, positive_ids_given):
    """The symmetric direction (one positive per query): slot r against a block of queries, its own
    query the target; queries with the slot's anchor id (or positive id) are dropped (not the target)."""
    logits = scale * sim.matrix(rows.slots, queries.vecs, similarity)
    if queries.anchor_ids is None:
        return logits
    ids = [rows.anchor] + ([rows.slot_ids] if positive_ids_given else [])
    drop = functools.reduce(jnp.logical_or, [i[:, None] == queries.anchor_ids[None, :] for i in ids])
    return jnp.where(drop & (queries.index[None, :] != rows.query[:, None]), -jnp.inf, logits)


def _soft_reduce(student, teacher, mask, valid):
    """Mean over rows of ``-sum_c p_c log softmax(student)_c``, ``p = softmax(teacher)`` over the
    same unmasked candidates (self-knowledge distillation, BGE-M3 arXiv:2402.03216)."""
    if mask is not None:
        student, teacher = jnp.where(mask, -jnp.inf, student), jnp.where(mask, -jnp.inf, teacher)
    target = jax.nn.softmax(teacher, axis=1)
    log_p = jax.nn.log_softmax(student, axis=1)
    return _mean_rows(-jnp.sum(jnp.where(target > 0, target * log_p, 0.0), axis=1), valid)


def _check_options(directions, symmetric, all_positives, m, hardness, hardness_mode, in_batch_negatives=True):
    directions = (directions,) if isinstance(directions, str) else tuple(directions)
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"unknown directions {sorted(unknown)}; choose from {DIRECTIONS}")
    if Q2D not in directions or len(set(directions)) != len(directions):
        raise ValueError(f"directions must hold 'query_to_doc' (it holds the positive) once each, got {directions}")
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"unknown hardness_mode {hardness_mode!r}; choose from {HARDNESS_MODES}")
    if hardness < 0:
        raise ValueError(f"hardness must be >= 0, got {hardness}")
    if symmetric and (len(directions) > 1 or m > 1):
        raise ValueError("symmetric=True takes one positive per anchor and no extra directions; "
                         "use directions=('query_to_doc', 'doc_to_query') for a joint two-way loss")
    if not in_batch_negatives and (len(directions) > 1 or symmetric):
        raise ValueError("in_batch_negatives=False keeps each query's own documents only; the extra directions "
                         "and symmetric=True are in-batch comparisons")
    if all_positives and m > 1 and set(directions) - {Q2D, Q2Q}:
        raise ValueError("all_positives=True with several positives allows only 'query_to_doc' and "
                         "'query_to_query' (doc directions need one target document per row)")
    return tuple(d for d in DIRECTIONS if d in directions)  # the documented block order


def _guide_layout(guide, batch):
    if not isinstance(guide, (tuple, list)) or len(guide) not in (2, 3):
        raise ValueError("guide must be a tuple (guide_anchors, guide_positives, guide_negatives_or_None)")
    ga, gp, gn = (tuple(guide) + (None,))[:3]
    ga = sim.as_float32(ga)
    if ga.ndim != 2 or ga.shape[0] != batch.b:
        raise ValueError(f"guide anchors: expected (B, D') with B = {batch.b}, got shape {ga.shape}")
    w = ga.shape[1]
    gp = _embeddings(gp, batch.b, w, "guide positives")
    if gp.shape[1] != batch.m:
        raise ValueError(f"guide positives: {gp.shape[1]} slots per query, the student has {batch.m}")
    slots, docs = gp.reshape(-1, w), gp.reshape(-1, w)
    if (gn is None) != (batch.k == 0):
        raise ValueError("guide negatives must be given exactly when negatives are")
    if gn is not None:
        gn = _embeddings(gn, batch.b, w, "guide negatives")
        if gn.shape[1] != batch.k:
            raise ValueError(f"guide negatives: {gn.shape[1]} per query, the student has {batch.k}")
        docs = jnp.concatenate([slots, gn.reshape(-1, w)], axis=0)
    return tuple(jax.lax.stop_gradient(x) for x in (ga, slots, docs))  # a frozen model


# ---------------------------------------------------------------- the loss


def infonce(
    anchors,
    positives,
    negatives=None,
    *,
    scale=20.0,
    symmetric=False,
    similarity="cosine",
    anchor_ids=None,
    positive_ids=None,
    negative_ids=None,
    positive_mask=None,
    relevant_ids=None,
    relevant_mask=None,
    all_positives=False,
    directions=("query_to_doc",),
    fn_margin=None,
    fn_relative=None,
    guide=None,
    hardness=0.0,
    hardness_mode="all_negatives",
    in_batch_negatives=True,
    teacher_similarity=None,
    teacher_scale=None,
):
    """InfoNCE / MultipleNegativesRankingLoss over the (global) batch.

    Candidates (docs) are ``C = [b_11..b_1m, b_21, ..., b_Bm, n_11..n_1k, n_21, ..., n_Bk]``.
    With every option off (the defaults) the loss is
    ``(1/B) sum_i [logsumexp_c(scale * s(a_i, C_c)) - scale * s(a_i, b_i)]``.

    Args:
      anchors: (B, D) query embeddings a_i.
      positives: (B, D), or (B, m, D): m positive slots per query (slot (i, j) = b_ij).
      negatives: optional hard negatives, (B, k, D) (k per anchor) or (B, D) (k = 1).
        Every anchor scores against ALL positives and ALL B*k negatives of the batch.
      scale: 1 / temperature; 20 = temperature 0.05 (SimCSE, sentence-transformers).
      symmetric: if True, average the a->[b; n] loss with the b->a loss (b_i against all
        anchors, target i; negatives are not used in that direction), like
        sentence-transformers' MultipleNegativesSymmetricRankingLoss. Only with m = 1 and
        ``directions=("query_to_doc",)``; the b->a half masks by ``anchor_ids`` only.
      similarity: metric of ``embedjax.similarity.matrix`` ("cosine", "dot", "euclidean",
        "manhattan"); also the metric of the false-negative rule (guide included). A
        ``similarity.TokenMaxSim`` trains ColBERT: the rows are flattened token vectors, the
        documents' token count may differ from the queries', query_to_doc only.
      anchor_ids, positive_ids: optional (B,) int ids of the texts (e.g. a hash); positive_ids
        (B, m) with m slots. negative_ids: optional (B, k) (or (B,)) ids. Identical texts in a
        batch must not act as each other's negatives: for row i, every candidate whose id equals
        the id of row i's anchor or of one of its positives is masked to -inf, except the
        target column. Missing ids count as "unique" (never masked). In the symmetric
        direction the candidates are anchors, so only ``anchor_ids`` can mask there.
      positive_mask: optional (B, m) bool, the real slots. A padding slot is nowhere: never a
        candidate, never a target, never a row.
      relevant_ids, relevant_mask: optional (B, P) ids of every document judged relevant to
        query i (qrels) and which of them are real (None: all). A candidate whose id is in row
        i's relevant set is masked to -inf in row i (except the target). Id 0 is an id like any.
      all_positives: False ("each"): one cross-entropy row per real slot (i, j), target b_ij,
        the other slots of query i masked in that row; the mean over those rows, as if every
        (query, positive) pair were its own example. True: one row per query with a real
        positive (the multi-positive contrastive loss of CoDiEmb, arXiv:2508.11442):
        ``loss_i = logsumexp(unmasked candidates) - logsumexp(scale * s(a_i, real b_ij))``.
      directions: blocks of ONE joint softmax denominator (GTE, arXiv:2308.03281; as
        sentence-transformers' ``MultipleNegativesRankingLoss(directions, partition_mode=
        "joint")``). Row (q_i, target d = b_ij):
          query_to_doc   s(q_i, every doc)                        (always; holds the target)
          query_to_query s(q_i, q_l), l != i
          doc_to_query   s(q_l, d), every l (l = i too, as sentence-transformers)
          doc_to_doc     s(d, every doc) without the docs (slots and negatives) of query i
        Id masks in the extra blocks: a query or doc whose id is q_i's, a positive's of i or in
        i's relevant set is dropped from query_to_query / doc_to_doc; in doc_to_query q_l
        (l != i) is dropped if it has q_i's id or d's id is q_l's own, a positive's or relevant
        to q_l. With ``all_positives`` and m > 1 only query_to_doc and query_to_query.
      fn_margin, fn_relative: false-negative rule (NV-Retriever arXiv:2407.15831, Qwen3-Embedding
        ``s > s_pos + 0.1``, GISTEmbed arXiv:2402.16829): a non-target entry of any block whose
        rule score r exceeds ``r_pos + fn_margin`` or ``fn_relative * r_pos`` is masked (either
        rule, or both). ``r_pos``: the rule score of the row's target (``all_positives``: the
        lowest among the query's real positives). Rule scores: the student's own unscaled
        similarities under stop_gradient, or the guide's.
      guide: ``(guide_anchors, guide_positives, guide_negatives_or_None)`` of a frozen guide
        model (the student's shapes, any width D'): the rule reads the guide's similarity of
        the same entry (GISTEmbed). A tuple, so Matryoshka slicing leaves it at full width.
        Without a rule, ``guide`` means ``fn_margin=0.0`` (GISTEmbed's absolute margin 0).
      hardness, hardness_mode: LLaVE (arXiv:2503.04812) hardness weighting: adds
        ``hardness * stop_gradient(s)`` (not scaled) to the query_to_doc logits of the negatives
        named by the mode: "in_batch_negatives" (docs of other queries), "hard_negatives" (the
        query's own hard negatives), "all_negatives" (everything but the query's positives),
        as sentence-transformers' ``hardness_mode`` / ``hardness_strength``. 0 = off.
      in_batch_negatives: False: a query's candidates are only its own documents (its positive
        slots and its hard negatives), no other query's (NV-Embed's second stage,
        arXiv:2405.17428, trains non-retrieval tasks so); only with query_to_doc alone.
      teacher_similarity, teacher_scale: soft targets instead of the one-hot positive: each row's
        target distribution is ``softmax(teacher_scale * t(a_i, C))`` over the same unmasked
        candidates, ``t`` another metric of the same rows (no gradient; ``teacher_scale``
        defaults to ``scale``), and the loss ``-sum_c p_c log softmax(logits)_c`` (BGE-M3's
        self-knowledge distillation, arXiv:2402.03216: the heads' ensemble teaches each head).
        query_to_doc only, one target per row.

    All options are static Python values; masks come from ids and stop-gradient scores only.

    Returns:
      scalar mean cross-entropy.
    """
    batch, guide, opts, all_positives = _prepare(
        anchors, positives, negatives, scale=scale, symmetric=symmetric, similarity=similarity,
        anchor_ids=anchor_ids, positive_ids=positive_ids, negative_ids=negative_ids, positive_mask=positive_mask,
        relevant_ids=relevant_ids, relevant_mask=relevant_mask, all_positives=all_positives, directions=directions,
        fn_margin=fn_margin, fn_relative=fn_relative, guide=guide, hardness=hardness, hardness_mode=hardness_mode,
        in_batch_negatives=in_batch_negatives, soft_targets=teacher_similarity is not None)
    rows = _rows(batch, all_positives, guide)
    docs, queries = _columns(batch, guide)
    masked, _ = _block_logits(rows, docs, queries, opts)
    if teacher_similarity is not None:
        teacher = _candidate_blocks(rows, docs, queries, opts.directions, teacher_similarity)[Q2D]
        t_scale = scale if teacher_scale is None else teacher_scale
        mask = jnp.isneginf(masked[Q2D])
        return _soft_reduce(masked[Q2D], t_scale * jax.lax.stop_gradient(teacher), mask, rows.valid)
    per_row = jax.nn.logsumexp(_joint(masked), axis=1) - _target_logsumexp(rows, docs, masked[Q2D])
    loss = _mean_rows(per_row, rows.valid)
    if not symmetric:
        return loss
    back = _back_block(rows, queries, scale, similarity, positive_ids is not None)
    return 0.5 * (loss + cross_entropy_rows(back, jnp.arange(batch.b), valid=batch.slot_real))


def _prepare(anchors, positives, negatives, *, scale, symmetric, similarity, anchor_ids, positive_ids, negative_ids,
             positive_mask, relevant_ids, relevant_mask, all_positives, directions, fn_margin, fn_relative, guide,
             hardness, hardness_mode, in_batch_negatives, soft_targets):
    """``infonce``'s arguments checked and laid out: ``(batch, guide vectors or None, _Options,
    all_positives)`` (the ring loss lays out each device's shard with it)."""
    token_metric = not isinstance(similarity, str)  # a metric object (MaxSim, M3's heads): rows of any width
    batch = _layout(anchors, positives, negatives, positive_mask, anchor_ids, positive_ids, negative_ids,
                    relevant_ids, relevant_mask, doc_width=jnp.shape(positives)[-1] if token_metric else None)
    directions = _check_options(directions, symmetric, all_positives, batch.m, hardness, hardness_mode,
                                in_batch_negatives)
    if token_metric and (directions != (Q2D,) or symmetric or guide is not None):
        raise ValueError("a metric object (TokenMaxSim, HeadSum) scores a query against documents: only "
                         "directions=('query_to_doc',), symmetric=False and no guide")
    if soft_targets and (directions != (Q2D,) or symmetric or (all_positives and batch.m > 1)):
        raise ValueError("teacher_similarity (soft targets) takes directions=('query_to_doc',), symmetric=False and "
                         "one target per row (all_positives=False)")
    if guide is not None and fn_margin is None and fn_relative is None:
        fn_margin = 0.0
    guide = None if guide is None else _guide_layout(guide, batch)
    opts = _Options(directions, similarity, scale, fn_margin, fn_relative, hardness, hardness_mode, in_batch_negatives)
    return batch, guide, opts, all_positives and batch.m > 1  # one slot: "each" and "all" coincide


def simcse_unsupervised(view1, view2, *, scale=20.0, ids=None, symmetric=False):
    """Unsupervised SimCSE: the same B texts embedded twice with two dropout masks.

    ``view1``/``view2`` (B, D) come from two forward passes with different dropout keys;
    row i of ``view2`` is the positive of row i of ``view1``, all other rows are negatives.
    Temperature 0.05 (scale 20) as in the paper. Pass ``ids`` (B,) to stop repeated texts
    in the batch from being each other's negatives.
    """
    return infonce(view1, view2, scale=scale, symmetric=symmetric, anchor_ids=ids, positive_ids=ids)


def simcse_supervised(
    premise,
    entailment,
    contradiction,
    *,
    scale=20.0,
    premise_ids=None,
    entailment_ids=None,
    contradiction_ids=None,
):
    """Supervised SimCSE on NLI triplets: entailment = positive, contradiction = hard negative.

    Each premise scores against all B entailments and all B contradictions of the batch
    (``infonce`` with k = 1 hard negative), scale 20 (temperature 0.05).
    """
    return infonce(
        premise,
        entailment,
        contradiction,
        scale=scale,
        anchor_ids=premise_ids,
        positive_ids=entailment_ids,
        negative_ids=contradiction_ids,
    )
