"""InfoNCE / multiple-negatives ranking, with hard negatives, symmetry and duplicate masking.

L = CE(scale * s(a_i, [b_1..b_B, n_1..n_{Bk}]), target i)   (docs/losses.md, "InfoNCE")

Works on the GLOBAL batch: with the batch sharded over a mesh axis of type ``Auto`` the
similarity matrix is one jnp matmul and GSPMD gathers the candidates, so every anchor sees
the positives and negatives of every device. The targets are ``arange(B)`` over the global
batch (positives come first in the candidate list), so the label layout cannot depend on
how the batch is split across devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from embedjax import similarity as sim


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


def cross_entropy_rows(logits, targets, mask=None):
    """Mean over rows of -log softmax(logits_r)[targets_r]; ``mask`` entries set to -inf."""
    if mask is not None:
        logits = jnp.where(mask, -jnp.inf, logits)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - target_logit)


def _ids_or_unknown(ids, shape):
    if ids is None:
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool)
    return jnp.reshape(ids, shape), jnp.ones(shape, bool)


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
):
    """InfoNCE / MultipleNegativesRankingLoss over the (global) batch.

    Args:
      anchors: (B, D) embeddings a_i.
      positives: (B, D) embeddings b_i; b_i is the positive of a_i.
      negatives: optional hard negatives, (B, k, D) (k per anchor) or (B, D) (k = 1).
        Every anchor scores against ALL positives and ALL B*k negatives of the batch;
        the candidate order is [b_1..b_B, n_{1,1}..n_{1,k}, n_{2,1}, ...], target i.
      scale: 1 / temperature; 20 = temperature 0.05 (SimCSE, sentence-transformers).
      symmetric: if True, average the a->[b; n] loss with the b->a loss (b_i against all
        anchors, target i; negatives are not used in that direction), like
        sentence-transformers' MultipleNegativesSymmetricRankingLoss.
      similarity: metric of ``embedjax.similarity.matrix`` ("cosine", "dot", "euclidean",
        "manhattan").
      anchor_ids, positive_ids: optional (B,) int ids of the texts (e.g. a hash);
      negative_ids: optional (B, k) (or (B,)) ids. Identical texts in a batch must not act
        as each other's negatives: for row i, every candidate whose id equals the id of
        row i's positive or row i's anchor is masked to -inf, except the target column.
        Missing ids count as "unique" (never masked). In the symmetric direction the
        candidates are anchors, so only ``anchor_ids`` can mask there.

    Returns:
      scalar mean cross-entropy.
    """
    anchors, positives = sim.as_float32(anchors), sim.as_float32(positives)
    b, d = anchors.shape
    targets = jnp.arange(b)
    cands = positives
    cand_ids, cand_known = _ids_or_unknown(positive_ids, (b,))
    if negatives is not None:
        negatives = sim.as_float32(negatives).reshape(b, -1, d)
        k = negatives.shape[1]
        cands = jnp.concatenate([positives, negatives.reshape(b * k, d)], axis=0)
        neg_ids, neg_known = _ids_or_unknown(negative_ids, (b * k,))
        cand_ids = jnp.concatenate([cand_ids, neg_ids])
        cand_known = jnp.concatenate([cand_known, neg_known])

    row_ids = [jnp.reshape(x, (b,)) for x in (positive_ids, anchor_ids) if x is not None]
    mask = duplicate_mask(row_ids, cand_ids, cand_known, targets) if row_ids else None
    logits = scale * sim.matrix(anchors, cands, similarity)
    loss = cross_entropy_rows(logits, targets, mask)
    if not symmetric:
        return loss

    back_mask = None
    if anchor_ids is not None:
        a_ids = jnp.reshape(anchor_ids, (b,))
        back_rows = [a_ids] + ([jnp.reshape(positive_ids, (b,))] if positive_ids is not None else [])
        back_mask = duplicate_mask(back_rows, a_ids, jnp.ones((b,), bool), targets)
    back = cross_entropy_rows(scale * sim.matrix(positives, anchors, similarity), targets, back_mask)
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
