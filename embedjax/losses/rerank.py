"""Cross-encoder losses: pure functions of a model's logits for groups of candidates.

Every loss takes ``logits`` of shape (Q, C): query i's C candidates (a pair batch is Q = B,
C = 1), the candidates a ``mask`` (Q, C) marks as real (a group padded to C is False on the
padding), and per-candidate ``labels`` or a teacher's scores. Where a group has a positive, it
is column 0 (the layout of ``scripts/mine.py``'s records: the positive, then the negatives).

- ``binary_cross_entropy``: per pair, sigmoid cross-entropy with 0/1 (or soft) labels
  (sentence-transformers' CrossEncoder ``BinaryCrossEntropyLoss``);
- ``score_mse``: per pair, squared error of (optionally sigmoid) scores against graded labels
  (``MSELoss``);
- ``multiple_negatives_ce``: per group, softmax cross-entropy of the positive against the
  group's negatives (``MultipleNegativesRankingLoss``; FlagEmbedding's reranker loss);
- ``listnet``: per group, cross-entropy of the softmax of the scores against the softmax of the
  labels (ListNet, Cao et al. 2007; ``ListNetLoss``);
- ``lambda_loss``: per group, the LambdaLoss framework (Wang et al. 2018, CIKM) with its NDCG
  weighting schemes (``LambdaLoss``);
- ``margin_mse`` and ``listwise_kl``: distillation from a teacher's scores of the same groups
  (MarginMSE, arXiv:2010.02666; listwise KL, arXiv:2110.07367).

(docs/losses.md, "Cross-encoder losses".)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from embedjax import similarity as sim

ACTIVATIONS = ("identity", "sigmoid")
LAMBDA_WEIGHTINGS = ("none", "ndcg_loss1", "ndcg_loss2", "lambdarank", "ndcg_loss2pp")
_EPS = 1e-10


def _f32(x):
    return sim.as_float32(x)  # float32 or wider: float64 checks stay float64


def _mask(logits, mask):
    return jnp.ones(logits.shape, bool) if mask is None else jnp.asarray(mask, bool)


def _masked_mean(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _activate(logits, activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    return jax.nn.sigmoid(logits) if activation == "sigmoid" else logits


def _as_groups(name, logits, *others):
    logits = _f32(logits)
    if logits.ndim == 1:
        logits = logits[:, None]
    if logits.ndim != 2:
        raise ValueError(f"{name}: logits must be (Q,) or (Q, C), got {logits.shape}")
    out = []
    for other in others:
        if other is None:
            out.append(None)
            continue
        other = jnp.asarray(other)
        other = other.reshape(logits.shape) if other.size == logits.size else other
        if other.shape != logits.shape:
            raise ValueError(f"{name}: labels, teacher scores and mask must have the logits' shape {logits.shape}, "
                             f"got {other.shape}")
        out.append(other)
    return (logits, *out)


def binary_cross_entropy(logits, labels, *, mask=None, pos_weight: float | None = None):
    """Mean over real candidates of ``-[w y log sigma(s) + (1 - y) log(1 - sigma(s))]``.

    Args:
      logits: (Q,) or (Q, C) scores. labels: the same shape, in [0, 1].
      mask: real candidates (default all). pos_weight: ``w``, the positives' weight (torch's
        ``BCEWithLogitsLoss(pos_weight=)``; None: 1).
    """
    logits, labels, mask = _as_groups("binary_cross_entropy", logits, labels, mask)
    y = _f32(labels)
    w = 1.0 if pos_weight is None else float(pos_weight)
    # log sigma(s) = -softplus(-s), log(1 - sigma(s)) = -softplus(s): stable for any s
    loss = w * y * jax.nn.softplus(-logits) + (1.0 - y) * jax.nn.softplus(logits)
    return _masked_mean(loss, _mask(logits, mask))


def score_mse(logits, labels, *, mask=None, activation: str = "identity"):
    """Mean over real candidates of ``(act(s) - y)^2``; ``activation="sigmoid"`` for labels in [0, 1]."""
    logits, labels, mask = _as_groups("score_mse", logits, labels, mask)
    err = _activate(logits, activation) - _f32(labels)
    return _masked_mean(jnp.square(err), _mask(logits, mask))


def multiple_negatives_ce(logits, *, mask=None, scale: float = 1.0, activation: str = "identity"):
    """Mean over groups of ``-log softmax(scale * act(s_i))[0]``: the positive (column 0) against
    the group's real negatives.

    Defaults: FlagEmbedding's reranker loss (raw logits). sentence-transformers' CrossEncoder
    ``MultipleNegativesRankingLoss``: ``activation="sigmoid", scale=10``.
    """
    logits, mask = _as_groups("multiple_negatives_ce", logits, mask)
    mask = _mask(logits, mask)
    z = jnp.where(mask, scale * _activate(logits, activation), -jnp.inf)
    return jnp.mean(-jax.nn.log_softmax(z, axis=-1)[:, 0])


def listnet(logits, labels, *, mask=None):
    """Mean over groups of ``-sum_j softmax(y)_j log softmax(s)_j`` over the real candidates."""
    logits, labels, mask = _as_groups("listnet", logits, labels, mask)
    mask = _mask(logits, mask)
    target = jax.nn.softmax(jnp.where(mask, _f32(labels), -jnp.inf), axis=-1)
    log_pred = jax.nn.log_softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.mean(-jnp.sum(jnp.where(mask, target * log_pred, 0.0), axis=-1))


def _lambda_weights(weighting: str, gains, discounts, mu: float):
    """(Q, C, C) pair weights of the LambdaLoss schemes, candidates in predicted order."""
    c = gains.shape[-1]
    if weighting == "none":
        return jnp.ones(gains.shape + (c,), gains.dtype)
    if weighting == "ndcg_loss1":
        return jnp.broadcast_to((gains / discounts)[:, :, None], gains.shape + (c,))
    gain_gaps = jnp.abs(gains[:, :, None] - gains[:, None, :])
    lambdarank = jnp.abs(1.0 / discounts[:, :, None] - 1.0 / discounts[:, None, :]) * gain_gaps
    if weighting == "lambdarank":
        return lambdarank
    # NDCG-Loss2: delta_ij = |1 / D(|i - j|) - 1 / D(|i - j| + 1)| for i != j, ranks from 1
    gap = jnp.abs(jnp.arange(c)[:, None] - jnp.arange(c)[None, :])
    inverse = 1.0 / jnp.log2(2.0 + jnp.arange(c + 1, dtype=gains.dtype))  # 1 / D(rank), rank = 1..c+1
    delta = jnp.where(gap > 0, jnp.abs(inverse[jnp.maximum(gap - 1, 0)] - inverse[gap]), 0.0)
    ndcg_loss2 = delta[None] * gain_gaps
    return ndcg_loss2 if weighting == "ndcg_loss2" else mu * ndcg_loss2 + lambdarank


def lambda_loss(logits, labels, *, mask=None, weighting: str = "ndcg_loss2pp", k: int | None = None,
                sigma: float = 1.0, mu: float = 10.0):
    """LambdaLoss (Wang et al., "The LambdaLoss Framework for Ranking Metric Optimization", CIKM 2018),
    as sentence-transformers' CrossEncoder ``LambdaLoss`` computes it.

    Per group, candidates sorted by the model's scores (rank r = 1, 2, ...), gains
    ``G = (2^y - 1) / maxDCG@k`` and discounts ``D(r) = log2(1 + r)``; over the pairs (i, j) with
    y_i > y_j and i or j ranked within k, the mean of

        -w_ij log2 sigmoid(sigma (s_i - s_j))

    with ``w_ij`` from ``weighting``: ``none`` (1: RankNet), ``ndcg_loss1`` (G_i / D_i, and every
    pair of real candidates, not only y_i > y_j), ``ndcg_loss2`` (|1/D(|i-j|) - 1/D(|i-j|+1)|
    |G_i - G_j|), ``lambdarank`` (|1/D_i - 1/D_j| |G_i - G_j|) or ``ndcg_loss2pp`` (mu *
    ndcg_loss2 + lambdarank, the paper's best and the default). The weights depend on the sort
    and the labels only and carry no gradient.

    Args:
      logits, labels: (Q, C) scores and graded relevance (negative labels count as 0).
      mask: real candidates. k: the NDCG cutoff (None: every candidate). sigma: the sigmoid's slope.
    """
    if weighting not in LAMBDA_WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {LAMBDA_WEIGHTINGS}")
    logits, labels, mask = _as_groups("lambda_loss", logits, labels, mask)
    mask = _mask(logits, mask)
    c = logits.shape[1]
    k = c if k is None else min(int(k), c)
    # padding sorts last and never forms a pair
    order = jnp.argsort(jnp.where(mask, -logits, jnp.inf), axis=-1, stable=True)
    s = jnp.take_along_axis(logits, order, axis=-1)
    y = jnp.take_along_axis(jnp.where(mask, jnp.maximum(_f32(labels), 0.0), 0.0), order, axis=-1)
    real = jnp.take_along_axis(mask, order, axis=-1)
    discounts = jnp.log2(2.0 + jnp.arange(c, dtype=logits.dtype))[None, :]
    ideal = -jnp.sort(-y, axis=-1)
    max_dcg = jnp.maximum(jnp.sum(((2.0 ** ideal - 1.0) / discounts)[:, :k], axis=-1), _EPS)
    gains = (2.0 ** y - 1.0) / max_dcg[:, None]
    weights = jax.lax.stop_gradient(_lambda_weights(weighting, gains, discounts, mu))
    top = jnp.arange(c) < k
    pairs = real[:, :, None] & real[:, None, :] & (top[:, None] | top[None, :])
    if weighting != "ndcg_loss1":
        pairs = pairs & (y[:, :, None] > y[:, None, :])
    terms = weights * jax.nn.log_sigmoid(sigma * (s[:, :, None] - s[:, None, :])) / jnp.log(2.0)
    return -jnp.sum(jnp.where(pairs, terms, 0.0)) / jnp.maximum(jnp.sum(pairs), 1)


def margin_mse(logits, teacher, *, mask=None):
    """MarginMSE on groups: mean over real negatives j of ``((s_0 - s_j) - (t_0 - t_j))^2``."""
    logits, teacher, mask = _as_groups("margin_mse", logits, teacher, mask)
    if logits.shape[1] < 2:
        raise ValueError(f"margin_mse: needs a positive and at least one negative per group, got {logits.shape}")
    t = jax.lax.stop_gradient(_f32(teacher))
    err = (logits[:, :1] - logits[:, 1:]) - (t[:, :1] - t[:, 1:])
    return _masked_mean(jnp.square(err), _mask(logits, mask)[:, 1:])


def listwise_kl(logits, teacher, *, mask=None, scale: float = 1.0, teacher_temperature: float = 1.0,
                normalize_scores: bool = False):
    """Mean over groups of ``KL(softmax(t / teacher_temperature) || softmax(scale * s))`` over the
    real candidates; a teacher score of -inf also excludes a candidate (zero target mass).
    ``normalize_scores``: each group's real scores min-max normalised first, ``(s - min) / (max -
    min + 1e-8)`` (PyLate's ``Distillation``)."""
    logits, teacher, mask = _as_groups("listwise_kl", logits, teacher, mask)
    if not teacher_temperature > 0:
        raise ValueError(f"listwise_kl: teacher_temperature must be > 0, got {teacher_temperature}")
    mask = _mask(logits, mask)
    if normalize_scores:
        low = jnp.min(jnp.where(mask, logits, jnp.inf), axis=-1, keepdims=True)
        high = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1, keepdims=True)
        logits = (logits - low) / (high - low + 1e-8)
    t = jax.lax.stop_gradient(_f32(teacher))
    log_target = jax.nn.log_softmax(jnp.where(mask, t / teacher_temperature, -jnp.inf), axis=-1)
    log_pred = jax.nn.log_softmax(jnp.where(mask, scale * logits, -jnp.inf), axis=-1)
    target = jnp.exp(log_target)
    # 0 * log 0 = 0: an excluded candidate contributes nothing, not NaN
    terms = jnp.where(target > 0, target * (log_target - log_pred), 0.0)
    return jnp.mean(jnp.sum(terms, axis=-1))
