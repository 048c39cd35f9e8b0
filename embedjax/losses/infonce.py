"""InfoNCE / multiple-negatives ranking, with hard negatives, symmetry and duplicate masking;
multiple positives, qrels-aware and false-negative-aware masking, extra directions (GTE) and
hardness weighting.

L = CE(scale * s(a_i, [b_1..b_B, n_1..n_{Bk}]), target i)   (docs/losses.md, "InfoNCE")

Works on the GLOBAL batch: with the batch sharded over a mesh axis of type ``Auto`` the
similarity matrices are jnp matmuls and GSPMD gathers the candidates, so every anchor sees
the positives and negatives of every device. The targets are ``arange`` over the global
batch (positives come first in the candidate list), so the label layout cannot depend on
how the batch is split across devices.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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
    """The global batch, candidates in the documented order."""

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


class _Rows(NamedTuple):
    """The cross-entropy rows: one per real (query, positive slot), or one per query."""

    query: jax.Array  # (R,) the query of each row
    expand: Callable  # (B, ...) per-query array -> (R, ...)
    valid: jax.Array | None  # (R,) rows that count (None: all)
    targets: jax.Array | None  # (R, C) the target columns of one row per query (None: column r)
    all_positives: bool

    def is_target(self, batch):
        """(R, C): the row's target column(s) among the docs."""
        if self.targets is not None:
            return self.targets
        return jnp.arange(batch.docs.shape[0])[None, :] == jnp.arange(self.query.shape[0])[:, None]

    def own_docs(self, batch):
        """(R, C): the docs (slots and hard negatives) of the row's query."""
        return self.query[:, None] == batch.col_query[None, :]


def _rows(batch, all_positives):
    b, m = batch.b, batch.m
    if not all_positives:  # row r = slot r = (r // m, r % m); its target is doc column r
        expand = (lambda x: jnp.repeat(x, m, axis=0)) if m > 1 else (lambda x: x)
        return _Rows(jnp.arange(b * m) // m, expand, batch.slot_real, None, False)
    queries = jnp.arange(b)
    targets = (batch.col_query[None, :] == queries[:, None]) & batch.col_is_slot[None, :]
    valid = None
    if batch.slot_real is not None:
        valid = jnp.any(batch.slot_real.reshape(b, m), axis=1)
        # A query without a real positive keeps slot 0 as a (dropped) target: its row stays finite.
        slot0 = jnp.arange(batch.docs.shape[0])[None, :] == queries[:, None] * m
        targets = targets & (batch.col_real[None, :] | (slot0 & ~valid[:, None]))
    return _Rows(queries, lambda x: x, valid, targets, True)


# ---------------------------------------------------------------- blocks, masks, reduction


def _candidate_blocks(queries, slots, docs, directions, rows, metric):
    """The raw (unscaled) similarity blocks of every row, keyed by direction, each (R, n).

    Row r (query q, target slot d): query_to_doc s(q, docs), query_to_query s(q, queries),
    doc_to_query s(q_l, d) for every query l, doc_to_doc s(d, docs). The last two exist only
    with one row per slot, so their rows are ``slots`` as they are. All metrics are symmetric.
    """
    blocks = {Q2D: rows.expand(sim.matrix(queries, docs, metric))}
    if Q2Q in directions:
        blocks[Q2Q] = rows.expand(sim.matrix(queries, queries, metric))
    if D2Q in directions:
        blocks[D2Q] = sim.matrix(slots, queries, metric)
    if D2D in directions:
        blocks[D2D] = sim.matrix(slots, docs, metric)
    return blocks


def _id_hits(row_ids, row_valid, cand_ids, cand_known):
    """(R, N): candidate n's (known) id is one of row r's valid ids."""
    hits = (row_ids[:, :, None] == cand_ids[None, None, :]) & row_valid[:, :, None]
    return jnp.any(hits, axis=1) & cand_known[None, :]


def _block_masks(batch, rows, directions, rule, fn_margin, fn_relative, in_batch_negatives=True):
    """Boolean (R, n) drop mask (-inf) per block, or None where nothing is dropped.

    Never dropped: a row's target column(s) in query_to_doc, and s(q_i, d) in doc_to_query.
    ``rule``: the stop-gradient rule scores per block (None without a false-negative rule).
    """
    b, m = batch.b, batch.m
    fn = None
    if rule is not None:
        if rows.all_positives:  # the weakest real positive sets the bar
            t = jnp.min(jnp.where(rows.is_target(batch), rule[Q2D], jnp.inf), axis=1)
        else:
            t = jnp.take_along_axis(rule[Q2D], jnp.arange(rule[Q2D].shape[0])[:, None], axis=1)[:, 0]

        def fn(name):
            x = rule[name]
            drop = None if fn_margin is None else x > (t + fn_margin)[:, None]
            return _or(drop, None if fn_relative is None else x > (fn_relative * t)[:, None])

    own = None
    if batch.own_ids is not None:
        own = rows.expand(batch.own_ids), rows.expand(batch.own_valid)
    padding = None if batch.col_real is None else ~batch.col_real[None, :]
    masks = {}

    drop = padding
    if own is not None:
        drop = _or(drop, _id_hits(*own, batch.doc_ids, batch.doc_known))
    if m > 1 and not rows.all_positives:  # the query's other positives are not negatives of this row
        drop = _or(drop, rows.own_docs(batch) & batch.col_is_slot[None, :])
    if not in_batch_negatives:  # only the query's own documents compete (NV-Embed's second stage)
        drop = _or(drop, ~rows.own_docs(batch))
    if fn is not None:
        drop = _or(drop, fn(Q2D))
    masks[Q2D] = None if drop is None else drop & ~rows.is_target(batch)

    if Q2Q in directions:
        drop = rows.query[:, None] == jnp.arange(b)[None, :]  # q_i itself
        if own is not None and batch.anchor_ids is not None:
            drop = drop | _id_hits(*own, batch.anchor_ids, jnp.ones((b,), bool))
        masks[Q2Q] = _or(drop, None if fn is None else fn(Q2Q))

    if D2Q in directions:  # row r = slot r: q_l is no negative of d if it is q_i's text or d is relevant to it
        drop = None
        if batch.anchor_ids is not None:
            drop = batch.anchor_ids[rows.query][:, None] == batch.anchor_ids[None, :]
        if batch.own_ids is not None:
            slot_ids, slot_known = batch.doc_ids[: b * m], batch.doc_known[: b * m]
            drop = _or(drop, _id_hits(batch.own_ids, batch.own_valid, slot_ids, slot_known).T)
        drop = _or(drop, None if fn is None else fn(D2Q))
        masks[D2Q] = None if drop is None else drop & (rows.query[:, None] != jnp.arange(b)[None, :])

    if D2D in directions:
        drop = _or(rows.own_docs(batch), padding)  # every doc of query i (GTE / sentence-transformers)
        if own is not None:
            drop = drop | _id_hits(*own, batch.doc_ids, batch.doc_known)
        masks[D2D] = _or(drop, None if fn is None else fn(D2D))
    return masks


def _hardness_penalty(batch, rows, raw_qd, strength, mode):
    """LLaVE's alpha * stop_grad(s) on the query_to_doc logits of the negatives ``mode`` names."""
    own, slot = rows.own_docs(batch), batch.col_is_slot[None, :]
    applies = {
        "hard_negatives": own & ~slot,  # the query's own hard negatives only
        "in_batch_negatives": ~own,  # every doc of the other queries
        "all_negatives": ~(own & slot),  # everything but the query's positives
    }[mode]
    return jnp.where(applies, strength * jax.lax.stop_gradient(raw_qd), 0.0)


def _reduce(logits, masks, rows):
    """Joint softmax over every block; mean over the rows that count."""
    masked = [lg if masks.get(name) is None else jnp.where(masks[name], -jnp.inf, lg) for name, lg in logits.items()]
    joint = masked[0] if len(masked) == 1 else jnp.concatenate(masked, axis=1)
    if not rows.all_positives:  # query_to_doc comes first, so the target of row r is column r
        return cross_entropy_rows(joint, jnp.arange(joint.shape[0]), valid=rows.valid)
    log_pos = jax.nn.logsumexp(jnp.where(rows.targets, masked[0], -jnp.inf), axis=1)
    return _mean_rows(jax.nn.logsumexp(joint, axis=1) - log_pos, rows.valid)


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
    token_metric = not isinstance(similarity, str)  # a metric object (MaxSim, M3's heads): rows of any width
    batch = _layout(anchors, positives, negatives, positive_mask, anchor_ids, positive_ids, negative_ids,
                    relevant_ids, relevant_mask, doc_width=jnp.shape(positives)[-1] if token_metric else None)
    directions = _check_options(directions, symmetric, all_positives, batch.m, hardness, hardness_mode,
                                in_batch_negatives)
    if token_metric and (directions != (Q2D,) or symmetric or guide is not None):
        raise ValueError("a metric object (TokenMaxSim, HeadSum) scores a query against documents: only "
                         "directions=('query_to_doc',), symmetric=False and no guide")
    if teacher_similarity is not None and (directions != (Q2D,) or symmetric or (all_positives and batch.m > 1)):
        raise ValueError("teacher_similarity (soft targets) takes directions=('query_to_doc',), symmetric=False and "
                         "one target per row (all_positives=False)")
    if guide is not None and fn_margin is None and fn_relative is None:
        fn_margin = 0.0
    rows = _rows(batch, all_positives and batch.m > 1)  # one slot: "each" and "all" coincide

    raw = _candidate_blocks(batch.queries, batch.slots, batch.docs, directions, rows, similarity)
    rule = None
    if fn_margin is not None or fn_relative is not None:
        if guide is None:
            rule = {name: jax.lax.stop_gradient(s) for name, s in raw.items()}
        else:
            rule = _candidate_blocks(*_guide_layout(guide, batch), directions, rows, similarity)
    masks = _block_masks(batch, rows, directions, rule, fn_margin, fn_relative, in_batch_negatives)
    logits = {name: scale * s for name, s in raw.items()}
    if hardness:
        logits[Q2D] = logits[Q2D] + _hardness_penalty(batch, rows, raw[Q2D], hardness, hardness_mode)
    if teacher_similarity is not None:
        teacher = _candidate_blocks(batch.queries, batch.slots, batch.docs, directions, rows, teacher_similarity)[Q2D]
        t_scale = scale if teacher_scale is None else teacher_scale
        return _soft_reduce(logits[Q2D], t_scale * jax.lax.stop_gradient(teacher), masks.get(Q2D), rows.valid)
    loss = _reduce(logits, masks, rows)
    if not symmetric:
        return loss

    b, targets = batch.b, jnp.arange(batch.b)
    back_mask = None
    if anchor_ids is not None:
        a_ids = batch.anchor_ids
        back_rows = [a_ids] + ([batch.doc_ids[:b]] if positive_ids is not None else [])
        back_mask = duplicate_mask(back_rows, a_ids, jnp.ones((b,), bool), targets)
    back_logits = scale * sim.matrix(batch.slots, batch.queries, similarity)
    back = cross_entropy_rows(back_logits, targets, back_mask, valid=batch.slot_real)
    return 0.5 * (loss + back)


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
