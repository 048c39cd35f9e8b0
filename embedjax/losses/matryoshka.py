"""Matryoshka representation learning (MRL): one loss over nested prefixes of the embedding.

L = sum_d w_d * loss_fn(e[..., :d], ...)   (docs/losses.md, "Matryoshka")

The encoder runs once; each dim only slices. The inner losses normalise (cosine) as they
always do, so slicing then normalising is exactly "normalise(e[:, :d])".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_embedding(x, size):
    """The rule every wrapper here uses to find the embedding arguments of a loss call.

    An argument is an embedding iff it is a floating-point array with ndim >= 2 whose last
    axis has the embedding size (that of the first argument). Labels (B,) and integer ids
    never qualify; hard negatives (B, k, D) do.
    """
    return (
        isinstance(x, (jax.Array, np.ndarray))
        and x.ndim >= 2
        and jnp.issubdtype(x.dtype, jnp.floating)
        and x.shape[-1] == size
    )


def map_embeddings(fn, args, kwargs, size):
    """Apply ``fn`` to every embedding argument (``is_embedding``) of a loss call."""
    args = tuple(fn(x) if is_embedding(x, size) else x for x in args)
    kwargs = {k: fn(v) if is_embedding(v, size) else v for k, v in kwargs.items()}
    return args, kwargs


def matryoshka(loss_fn, dims, weights=None, *, n_dims_per_step=None):
    """Wrap ``loss_fn(emb, ..., **kw)`` into a Matryoshka loss over ``dims``.

    Args:
      loss_fn: any loss taking embeddings first (``infonce``, ``cosent``, ``angle_loss``,
        ``functools.partial`` of them, ...). Every embedding argument (positional or
        keyword, see ``is_embedding``) is sliced to its first d components.
      dims: the prefix sizes, e.g. (768, 512, 256, 128, 64); each <= the embedding size.
      weights: one weight per dim (default all 1.0, as sentence-transformers).
      n_dims_per_step: if set, each call computes only n dims drawn uniformly without
        replacement from ``dims`` with the ``key`` passed to the returned function; the loss
        is the weighted sum over the drawn dims (not rescaled, as sentence-transformers).
        Deterministic given the key; only the drawn dims' losses are evaluated
        (``lax.switch``), which is the point of sampling.

    Returns:
      ``loss(*args, key=None, **kwargs) -> scalar`` with the signature of ``loss_fn`` plus
      ``key`` (required iff ``n_dims_per_step`` is set).

    Differences from sentence-transformers' ``MatryoshkaLoss`` (same value and gradient
    otherwise, tests/test_losses_vs_st.py): it L2-normalises each truncated prefix before the
    inner loss; we only slice. That changes nothing for inner losses whose similarity is
    cosine (``cosent``, ``infonce``, ``angle_loss``: all defaults) or AnglE's angle (invariant
    to each vector's scale); an inner loss with ``similarity="dot"``, ``"euclidean"`` or
    ``"manhattan"`` sees the raw prefix here and a unit vector there. Dims are drawn with
    ``jax.random`` from ``key`` (theirs: Python's ``random.sample`` over the dims sorted
    largest first; the same draw gives the same loss); "every dim" is ``None`` (their -1).
    """
    dims = tuple(int(d) for d in dims)
    weights = (1.0,) * len(dims) if weights is None else tuple(float(w) for w in weights)
    if len(weights) != len(dims):
        raise ValueError(f"{len(dims)} dims but {len(weights)} weights")
    if n_dims_per_step is not None and not 0 < n_dims_per_step <= len(dims):
        raise ValueError(f"n_dims_per_step must be in 1..{len(dims)}, got {n_dims_per_step}")

    def term(i, args, kwargs, size):
        d = dims[i]
        if d > size:
            raise ValueError(f"matryoshka dim {d} exceeds the embedding size {size}")
        a, kw = map_embeddings(lambda x: x[..., :d], args, kwargs, size)
        return weights[i] * loss_fn(*a, **kw)

    def loss(*args, key=None, **kwargs):
        size = args[0].shape[-1]
        if n_dims_per_step is None:
            return sum(term(i, args, kwargs, size) for i in range(len(dims)))
        if key is None:
            raise ValueError("n_dims_per_step is set: pass key=jax.random.key(...)")
        picks = sample_dims(key, len(dims), n_dims_per_step)
        branches = [lambda i=i: term(i, args, kwargs, size) for i in range(len(dims))]
        return sum(jax.lax.switch(picks[s], branches) for s in range(n_dims_per_step))

    return loss


def sample_dims(key, n_dims, n):
    """Indices of the ``n`` dims drawn (uniform, without replacement) from ``n_dims``."""
    return jax.random.choice(key, n_dims, (n,), replace=False)
