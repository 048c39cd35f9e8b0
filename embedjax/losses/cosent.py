"""CoSENT: a pairwise ranking loss over the scored pairs of a batch.

L = log(1 + sum_{(i, j): y_i < y_j} exp(s_i - s_j)),   s_i = scale * cos(a_i, b_i)

(docs/losses.md, "CoSENT"; identical to angle-emb's ``cosine_loss`` and sentence-transformers'
``CoSENTLoss``.) Only the ORDER of the labels matters, so any label scale works.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from embedjax import similarity as sim


def ranking_loss(scores, labels):
    """``log(1 + sum_{y_i < y_j} exp(s_i - s_j))`` for already-scaled scores ``(B,)``.

    Written as a logsumexp over [0] and the masked differences (pairs with equal labels,
    and i == j, contribute nothing). Shared by CoSENT and the AnglE angle term.
    """
    scores = sim.as_float32(scores)
    diff = scores[:, None] - scores[None, :]
    keep = labels[:, None] < labels[None, :]
    diff = jnp.where(keep, diff, -jnp.inf).reshape(-1)
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), diff.dtype), diff]))


def cosent(a, b, labels, *, scale=20.0, similarity="cosine"):
    """CoSENT loss of pairs (a_i, b_i) with gold scores ``labels`` (B,).

    Args:
      a, b: (B, D) embeddings of the two texts of each pair.
      labels: (B,) gold similarity; any monotone scale (0..5, 0..1, 0/1). Ties are ignored.
      scale: lambda = 1 / temperature, 20 as in CoSENT / angle-emb / sentence-transformers.
      similarity: a ``embedjax.similarity.pairwise`` metric (default "cosine").
    """
    a, b = sim.as_float32(a), sim.as_float32(b)
    return ranking_loss(scale * sim.pairwise(a, b, similarity), labels)
