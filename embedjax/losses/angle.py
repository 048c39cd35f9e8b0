"""AnglE: cosine (CoSENT) + in-batch negatives + angle terms (docs/losses.md, "AnglE").

total = cosine_w * L_cos + ibn_w * L_ibn + angle_w * L_angle

* L_cos: CoSENT over scale * cos(a_i, b_i).
* L_angle: the same CoSENT ranking over angle_tau * angle(a_i, b_i)
  (``embedjax.similarity.angle_pairwise``).
* L_ibn: softmax over all 2B embeddings of the batch (self masked); the target of each row is
  its partner, weighted by whether (or how much) the pair counts as positive; summed and
  divided by 2B (angle-emb's mean over all rows, non-positive rows contributing 0).

Which scored pairs are in-batch positives (``ibn_rule``): angle-emb uses ``int(label) >= 1``,
which silently drops every fractional label below 1 (0.8 -> 0; on a 0..1 scale that is every
pair but the exact 1.0s). We normalise labels to [0, 1] with the caller's ``label_range``
and use, by default, ``ibn_rule="threshold"``: positive iff the normalised label >=
``ibn_threshold`` = 0.5. 0.5 is the midpoint of the scale (2.5 on STS-B's 0..5, between
"share some details" and "roughly equivalent"); for binary 0/1 labels it gives exactly
angle-emb's targets. ``ibn_rule="soft"`` weights each pair's cross-entropy by its normalised
label instead (0.8 counts 0.8), and ``ibn_rule="angle_emb"`` reproduces ``int(label) >= 1``
on the raw labels for parity runs (not its index-times-label target matrix, which for integer
labels > 1 can also mark unrelated columns as targets).

Weights are static Python floats (configuration); a term with weight 0 is not computed.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from embedjax import similarity as sim
from embedjax.losses.cosent import ranking_loss
from embedjax.losses.infonce import duplicate_mask, infonce

# angle-emb 0.6.x defaults (pair format). All taus 20.
ANGLE_V06 = dict(cosine_w=0.0, ibn_w=1.0, angle_w=0.02)
# angle-emb 0.6.x defaults for the query/positive/negative format (adds cln_w).
ANGLE_V06_TRIPLET = dict(cosine_w=0.0, ibn_w=1.0, cln_w=1.0, angle_w=0.02)
# angle-emb 0.3.x defaults (w1, w2, w3).
ANGLE_V03 = dict(cosine_w=1.0, ibn_w=1.0, angle_w=1.0)
# angle-emb README fit() example on STS-B (lr 2e-5, 5 epochs, batch 32).
ANGLE_README_STSB = dict(cosine_w=1.0, ibn_w=1.0, angle_w=0.02)
# AnglE BERT-base NLI recipe (lr 5e-5, maxlen 128, cls pooling).
ANGLE_NLI_BERT = dict(cosine_w=0.0, ibn_w=30.0, angle_w=1.0)

IBN_RULES = ("threshold", "soft", "angle_emb")


def check_label_range(label_range) -> tuple[float, float]:
    """``label_range`` as ``(lo, hi)`` floats; raises ``ValueError`` unless both are finite and hi > lo.

    (hi == lo would divide by zero and hi < lo would invert which pairs count as positive,
    silently, so both are configuration errors.) Whether the range covers the data's scores
    is checked where the data is known (at config time).
    """
    try:
        if isinstance(label_range, (str, bytes)):
            raise TypeError
        lo, hi = label_range
        if any(isinstance(v, (str, bytes, bool)) for v in (lo, hi)):
            raise TypeError
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"label_range must be a pair (lo, hi) of numbers, got {label_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise ValueError(f"label_range must be (lo, hi) with finite lo, hi and hi > lo (the scale of the labels, e.g. "
                         f"(0, 5) for STS-B), got {label_range!r}")
    return lo, hi


def ibn_pair_weights(labels, *, label_range=(0.0, 1.0), ibn_rule="threshold", ibn_threshold=0.5):
    """(B,) weight of each scored pair as an in-batch positive (see the module docstring).

    threshold: 1[(y - lo) / (hi - lo) >= ibn_threshold];  soft: clip((y - lo) / (hi - lo), 0, 1);
    angle_emb: 1[trunc(y) >= 1] on the raw labels (angle-emb's int() rule).
    ``label_range`` is validated by ``check_label_range`` (for every rule).
    """
    lo, hi = check_label_range(label_range)
    labels = sim.as_float32(jnp.asarray(labels))
    if ibn_rule == "angle_emb":
        return (jnp.trunc(labels) >= 1).astype(labels.dtype)
    y = (labels - lo) / (hi - lo)
    if ibn_rule == "threshold":
        return (y >= ibn_threshold).astype(labels.dtype)
    if ibn_rule == "soft":
        return jnp.clip(y, 0.0, 1.0)
    raise ValueError(f"ibn_rule must be one of {IBN_RULES}, got {ibn_rule!r}")


def in_batch_pair_loss(a, b, weights, *, scale=20.0, a_ids=None, b_ids=None):
    """AnglE's in-batch negative loss for scored pairs.

    The 2B embeddings [a; b] are cosine-scored against each other (scale ``scale``, self
    masked); row r's target is its partner (a_i <-> b_i). Loss = sum_r w_pair(r) * CE_r / 2B.
    With ``a_ids``/``b_ids`` (B,) text ids, candidates identical to the row's own text or to
    its partner (other than the partner column) are masked, so duplicates are not negatives.
    """
    a, b = sim.as_float32(a), sim.as_float32(b)
    n = a.shape[0]
    z = jnp.concatenate([a, b], axis=0)
    partner = jnp.concatenate([jnp.arange(n) + n, jnp.arange(n)])
    mask = jnp.eye(2 * n, dtype=bool)
    if a_ids is not None and b_ids is not None:
        ids = jnp.concatenate([jnp.reshape(a_ids, (n,)), jnp.reshape(b_ids, (n,))])
        mask = mask | duplicate_mask([ids, ids[partner]], ids, jnp.ones((2 * n,), bool), partner)
    logits = jnp.where(mask, -jnp.inf, scale * sim.cosine_matrix(z, z))
    row_w = jnp.concatenate([weights, weights]).astype(logits.dtype)
    target_logit = jnp.take_along_axis(logits, partner[:, None], axis=1)[:, 0]
    ce = jax.nn.logsumexp(logits, axis=1) - target_logit
    return jnp.sum(row_w * ce) / (2 * n)


def angle_loss(
    a,
    b,
    labels,
    *,
    cosine_w=0.0,
    ibn_w=1.0,
    angle_w=0.02,
    cosine_tau=20.0,
    ibn_tau=20.0,
    angle_tau=20.0,
    angle_pooling="sum",
    label_range=(0.0, 1.0),
    ibn_rule="threshold",
    ibn_threshold=0.5,
    a_ids=None,
    b_ids=None,
    return_parts=False,
):
    """AnglE loss for scored pairs (a_i, b_i, y_i). Defaults: angle-emb 0.6 (``ANGLE_V06``).

    Args:
      a, b: (B, D) embeddings (D even for the angle term).
      labels: (B,) gold scores. Only their order matters for the cosine and angle terms;
        the in-batch term reads them through ``label_range``/``ibn_rule``/``ibn_threshold``
        (module docstring). Pass ``label_range=(0, 5)`` for raw STS-B scores; a range with
        hi <= lo raises ``ValueError`` (``check_label_range``), whatever the weights.
      cosine_w, ibn_w, angle_w: term weights (Python floats; presets ``ANGLE_V06``,
        ``ANGLE_V03``, ``ANGLE_README_STSB``, ``ANGLE_NLI_BERT``).
      cosine_tau, ibn_tau, angle_tau: scales of the three terms, 20 each.
      angle_pooling: "sum" (default) or "mean" (see ``similarity.angle_pairwise``).
      a_ids, b_ids: optional (B,) text ids to mask duplicates in the in-batch term.
      return_parts: also return a dict of the unweighted active terms.
    """
    check_label_range(label_range)
    a, b = sim.as_float32(a), sim.as_float32(b)
    parts = {}
    if cosine_w:
        parts["cosine"] = ranking_loss(cosine_tau * sim.cosine_pairwise(a, b), labels)
    if ibn_w:
        w = ibn_pair_weights(
            labels, label_range=label_range, ibn_rule=ibn_rule, ibn_threshold=ibn_threshold
        )
        parts["ibn"] = in_batch_pair_loss(a, b, w, scale=ibn_tau, a_ids=a_ids, b_ids=b_ids)
    if angle_w:
        parts["angle"] = ranking_loss(angle_tau * sim.angle_pairwise(a, b, angle_pooling), labels)
    weights = {"cosine": cosine_w, "ibn": ibn_w, "angle": angle_w}
    total = sum((weights[k] * v for k, v in parts.items()), jnp.zeros((), a.dtype))
    return (total, parts) if return_parts else total


def angle_triplet_loss(
    queries,
    positives,
    negatives,
    *,
    cosine_w=0.0,
    ibn_w=1.0,
    cln_w=1.0,
    angle_w=0.02,
    cosine_tau=20.0,
    ibn_tau=20.0,
    angle_tau=20.0,
    angle_pooling="sum",
    query_ids=None,
    positive_ids=None,
    negative_ids=None,
    return_parts=False,
):
    """AnglE loss for (query, positive, negative) triplets. Defaults: ``ANGLE_V06_TRIPLET``.

    total = (ibn_w * CE(q, [p]) + cln_w * CE(q, [p; n])) / 2
            + cosine_w * CoSENT(pairs) + angle_w * angle-CoSENT(pairs)

    CE(q, [p]) is in-batch InfoNCE (``infonce`` at scale ``ibn_tau``), CE(q, [p; n]) the same
    with the batch's negatives added as candidates; "pairs" are (q_i, p_i) labelled 1 and
    (q_i, n_i) labelled 0, as angle-emb builds them. ``queries``, ``positives``,
    ``negatives``: (B, D); the ids (B,) mask duplicate texts in the InfoNCE terms.
    """
    q, p, n = sim.as_float32(queries), sim.as_float32(positives), sim.as_float32(negatives)
    ids = dict(anchor_ids=query_ids, positive_ids=positive_ids)
    parts = {}
    if ibn_w:
        parts["ibn"] = infonce(q, p, scale=ibn_tau, **ids)
    if cln_w:
        parts["cln"] = infonce(q, p, n, scale=ibn_tau, negative_ids=negative_ids, **ids)
    pair_a = jnp.concatenate([q, q], axis=0)
    pair_b = jnp.concatenate([p, n], axis=0)
    pair_y = jnp.concatenate([jnp.ones(q.shape[0]), jnp.zeros(q.shape[0])])
    if cosine_w:
        parts["cosine"] = ranking_loss(cosine_tau * sim.cosine_pairwise(pair_a, pair_b), pair_y)
    if angle_w:
        parts["angle"] = ranking_loss(
            angle_tau * sim.angle_pairwise(pair_a, pair_b, angle_pooling), pair_y
        )
    total = jnp.zeros((), q.dtype)
    if ibn_w or cln_w:
        total = total + (ibn_w * parts.get("ibn", 0.0) + cln_w * parts.get("cln", 0.0)) / 2
    total = total + cosine_w * parts.get("cosine", 0.0) + angle_w * parts.get("angle", 0.0)
    return (total, parts) if return_parts else total
