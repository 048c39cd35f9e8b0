"""Correlation losses for STS: optimise the batch's correlation with the gold scores directly.

CoDiEmb (arXiv:2508.11442) trains STS with "order-aware objectives that directly optimise
correlation and ranking consistency". Its released training code (``PearsonCorrelationLoss``,
``RankKLDivergenceLoss``) combines them as ``2 * pearson + 5 * rank_kl (+ 0.5 * PRO)`` on the
cosine similarities of the pairs, temperature 0.05 (scale 20). Both are here as pure functions:

* ``pearson_loss``: 1 - Pearson r between the pair similarities and the labels (B,).
* ``rank_consistency_loss``: KL(softmax(ideal / t) || softmax(scale * sim)) over the batch, where
  ``ideal`` are the labels' ranks mapped to [0, 1] (CoDiEmb) or the min-max scaled labels.

Both are batch-level (every pair's term depends on the whole batch, like CoSENT): gradient
accumulation over micro-batches is NOT the large batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from embedjax import similarity as sim

LABEL_NORMALIZATIONS = ("rank", "minmax")


def _check_pairs(a, b, labels, name):
    """Shapes of a pair loss call: a, b (B, D), labels (B,)."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name}: a and b must both be (B, D) embeddings, got {a.shape} and {b.shape}")
    if jnp.shape(labels) != (a.shape[0],):
        raise ValueError(f"{name}: labels must have shape ({a.shape[0]},) (one gold score per pair), "
                         f"got {jnp.shape(labels)}")


def _scores(a, b, similarity):
    """Pair similarities (B,) in float32 (or wider), whatever the embedding dtype."""
    a, b = sim.as_float32(a), sim.as_float32(b)
    return sim.pairwise(a, b, similarity)


def pearson_r(x, y, *, eps=1e-12):
    """Pearson correlation of two (B,) vectors, population moments as CoDiEmb.

    ``r = mean(zx * zy)`` with ``z = (v - mean v) / sqrt(var v + eps)``. The ``eps`` keeps a
    constant vector finite (its z is 0, so r = 0) with a finite gradient (plain ``sqrt(var)``
    has an infinite derivative at var = 0); it changes r by ~eps / var otherwise.
    """
    def standardise(v):
        c = v - jnp.mean(v)
        return c * jax.lax.rsqrt(jnp.mean(c * c) + eps)

    return jnp.mean(standardise(x) * standardise(y))


def pearson_loss(a, b, labels, *, similarity="cosine", eps=1e-12):
    """``1 - pearson_r(sim(a_i, b_i), labels)`` over the batch: CoDiEmb's Pearson loss.

    Args:
      a, b: (B, D) embeddings of the two texts of each pair (any float dtype; computed in
        float32 or wider).
      labels: (B,) gold scores on any scale: r is invariant to ``labels -> c * labels + d``
        for c > 0 (up to ``eps``). Carries no gradient.
      similarity: a ``embedjax.similarity.pairwise`` metric (default "cosine", as CoDiEmb).
      eps: added to each variance (see ``pearson_r``).

    Returns:
      A scalar in [0, 2]: 0 when the similarities are an increasing affine function of the
      labels, 2 when a decreasing one. A batch with constant labels (or constant similarities)
      gives r = 0, loss 1 and a zero gradient; CoDiEmb returns a constant 0 there, which
      trains the same (no gradient either way).
    """
    _check_pairs(a, b, labels, "pearson_loss")
    s = _scores(a, b, similarity)
    y = jax.lax.stop_gradient(jnp.asarray(labels, s.dtype))
    return 1.0 - pearson_r(s, y, eps=eps)


def average_rank_scores(labels):
    """The labels' ranks mapped to [0, 1]: ``(B,) -> (B,)``, 1 for the highest, 0 for the lowest.

    ``score_i = (#{j: y_j < y_i} + (#{j: y_j == y_i} - 1) / 2) / (B - 1)``: the ascending 0-based
    rank with ties given their average rank (``scipy.stats.rankdata(method="average") - 1``),
    over B - 1. CoDiEmb's ``(n - 1 - rank_desc) / (n - 1)`` is the same number. O(B^2)
    comparisons, no sort: fine for a batch, jit-able. B = 1 gives 0.
    """
    y = labels
    below = jnp.sum(y[None, :] < y[:, None], axis=1)
    ties = jnp.sum(y[None, :] == y[:, None], axis=1)
    rank = below + (ties - 1) / 2.0
    return rank / max(y.shape[0] - 1, 1)


def minmax_scores(labels, eps=1e-12):
    """``(y - min y) / (max y - min y)``: (B,) in [0, 1]; a constant batch gives all zeros."""
    lo, hi = jnp.min(labels), jnp.max(labels)
    return (labels - lo) / jnp.maximum(hi - lo, eps)


def rank_consistency_loss(
    a,
    b,
    labels,
    *,
    scale=20.0,
    label_temperature=0.05,
    similarity="cosine",
    label_normalization="rank",
):
    """Listwise ranking consistency over the batch: CoDiEmb's rank KL (arXiv:2508.11442).

        L = (1 / B) * KL( softmax(u / label_temperature) || softmax(scale * sim(a, b)) )

    with the softmax over the B pairs of the batch and ``u`` the normalised labels:

    * ``label_normalization="rank"`` (default, CoDiEmb's ``RankKLDivergenceLoss``): the
      labels' average ranks mapped to [0, 1] (``average_rank_scores``): only the ORDER of
      the labels matters (any monotone rescaling gives the same loss), ties get equal
      target mass, and the target spacing is uniform, which aligns with Spearman's rho.
    * ``"minmax"``: ``(y - min) / (max - min)`` (``minmax_scores``): invariant to affine
      label rescaling (c > 0) only, keeps the label gaps.

    The 1 / B is CoDiEmb's: torch's ``kl_div(reduction="batchmean")`` on the 1-D batch list
    divides the KL by the list length. It is kept so CoDiEmb's loss weights (5 x this term)
    carry over; multiply by B for the plain KL. CoDiEmb uses temperature 0.05 on both sides
    (``scale=20 = 1 / 0.05``, ``label_temperature=0.05``), the defaults here.

    Args:
      a, b: (B, D) embeddings of the two texts of each pair (computed in float32 or wider).
      labels: (B,) gold scores on any scale (see the normalisations). Carry no gradient.
      scale: multiplies the pair similarities before the softmax (1 / student temperature).
      label_temperature: divides the normalised labels before the softmax; smaller puts
        more target mass on the top pairs.
      similarity: a ``embedjax.similarity.pairwise`` metric (default "cosine").
      label_normalization: "rank" or "minmax" (above).

    Returns:
      A scalar >= 0, zero iff softmax(scale * sim) equals the target distribution.
    """
    _check_pairs(a, b, labels, "rank_consistency_loss")
    if label_normalization not in LABEL_NORMALIZATIONS:
        raise ValueError(f"rank_consistency_loss: label_normalization must be one of "
                         f"{LABEL_NORMALIZATIONS}, got {label_normalization!r}")
    if not label_temperature > 0:
        raise ValueError(f"rank_consistency_loss: label_temperature must be > 0, got {label_temperature}")
    s = _scores(a, b, similarity)
    y = jax.lax.stop_gradient(jnp.asarray(labels, s.dtype))
    u = average_rank_scores(y) if label_normalization == "rank" else minmax_scores(y)
    log_target = jax.nn.log_softmax(u / label_temperature)
    log_pred = jax.nn.log_softmax(scale * s)
    kl = jnp.sum(jnp.exp(log_target) * (log_target - log_pred))
    return kl / s.shape[0]
