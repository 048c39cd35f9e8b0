"""Cosine-similarity regression: sentence-transformers' ``CosineSimilarityLoss``.

L = mean_i (cos(a_i, b_i) - y_i)^2,   y_i = (label_i - lo) / (hi - lo)

The gold score is scaled to [0, 1] by ``label_range = (lo, hi)`` (STS-B: ``(0, 5)``), so
the cosine of a pair is regressed onto its normalised score. Each pair's term depends on
that pair alone: no in-batch interaction (unlike InfoNCE, CoSENT or AnglE), so the loss of
a batch is the mean of its examples' losses and gradient accumulation over micro-batches
is exactly the large batch.

``quadruplet`` (C-STS) compares cosines too: a sentence pair under its two conditions.
"""
from __future__ import annotations

import jax.numpy as jnp

from embedjax import similarity as sim
from embedjax.losses.angle import check_label_range


def cosine_mse(a, b, labels, *, label_range=(0.0, 1.0)):
    """Mean squared error between ``cos(a_i, b_i)`` and the label scaled to [0, 1].

    Args:
      a, b: (B, D) embeddings of the two texts of each pair.
      labels: (B,) gold scores on the dataset's scale.
      label_range: (lo, hi) of that scale: ``lo`` maps to 0, ``hi`` to 1 (a static pair of
        floats; hi > lo). ``(0, 1)``, the default, is sentence-transformers' convention of
        labels already in [0, 1].
    """
    lo, hi = check_label_range(label_range)
    a, b = sim.as_float32(a), sim.as_float32(b)
    y = (jnp.asarray(labels, a.dtype) - lo) / (hi - lo)
    return jnp.mean(jnp.square(sim.cosine_pairwise(a, b) - y))


def quadruplet(a, b, n, *, margin=1.0):
    """The C-STS quadruplet loss over a sentence pair's two conditions (arXiv:2305.15093's
    "triplet" objective; the re-annotation paper's pairwise objective): the pair should be closer
    under the condition scored higher than under the one scored lower.

        L = mean_i max(0, margin + d(a_i, b_i) - d(n_i0, n_i1)),   d(x, y) = 1 - cos(x, y)

    Args:
      a, b: (B, D) the two sentences under the higher-scored condition.
      n: (B, 2, D) the same two sentences under the lower-scored condition.
      margin: the distance gap asked for (cosine distances lie in [0, 2]).
    """
    a, b, n = sim.as_float32(a), sim.as_float32(b), sim.as_float32(n)
    if n.ndim != a.ndim + 1 or n.shape[-2] != 2:
        raise ValueError(f"quadruplet takes the lower-scored pair as n of shape (B, 2, D), got {n.shape}")
    closer = (1.0 - sim.cosine_pairwise(a, b)) - (1.0 - sim.cosine_pairwise(n[..., 0, :], n[..., 1, :]))
    return jnp.mean(jnp.maximum(margin + closer, 0.0))
