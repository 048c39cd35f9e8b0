"""GradCache: exact large-batch contrastive gradients in memory bounded by the chunk size.

A contrastive loss couples every example of the batch (in-batch negatives), so the batch
cannot simply be split into accumulated micro-batches. GradCache (Gao et al., 2021) splits
the ENCODER instead:

1. embed every chunk without keeping activations;
2. take the loss and d loss / d embeddings on the full batch of embeddings (cheap: B x D);
3. re-embed each chunk and back-propagate its slice of the cached embedding gradient,
   summing the parameter gradients over chunks.

In JAX the three steps are what reverse-mode autodiff does to ``loss_fn(lax.map(
jax.checkpoint(embed_chunk), chunks))``: the checkpointed forward keeps only each chunk's
inputs (step 1), the loss's backward gives the embedding cotangents (step 2), and the
transposed scan re-runs each chunk's forward and its VJP one chunk at a time, carrying the
parameter-gradient sum (step 3). So the implementation is that one line, and it stays
differentiable: it composes with any loss of embeddings (Matryoshka, 2D Matryoshka over
per-layer stacks) and with sharding. Peak memory: one chunk's activations + the embeddings
+ the loss's own B x B similarity matrix (``benchmarks/gradcache_memory.py``).

Chunk layout. Chunk ``j`` of ``n = B / chunk_size`` holds rows ``j, j + n, j + 2n, ...``
(strided, not contiguous): with the batch sharded contiguously over the devices, every chunk
then has the same number of rows on every device and all devices work on every chunk
(contiguous chunks would each sit on one device). The embeddings are put back in batch order
before the loss, so the loss sees exactly the batch it would see uncached.

Dropout. Chunk ``j`` gets the key ``jax.random.fold_in(key, j)``, in both the forward and the
re-embed pass (``jax.checkpoint`` recomputes with the same key), so the gradient is exact.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _num_chunks(inputs, chunk_size: int) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(inputs)}
    if len(sizes) != 1:
        raise ValueError(f"all inputs need the same leading (batch) size, got {sorted(sizes)}")
    (b,) = sizes
    if chunk_size <= 0 or b % chunk_size:
        raise ValueError(f"chunk_size {chunk_size} must divide the batch size {b}")
    return b // chunk_size


def split_chunks(x, n: int):
    """(B, ...) -> (n, B / n, ...) with chunk j = rows j::n (see the module docstring)."""
    return jnp.moveaxis(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 1, 0)


def merge_chunks(z, batch_axis: int = 0):
    """Inverse of ``split_chunks`` for an embedding leaf stacked over chunks: the chunk axis is
    axis 0 and the chunk's batch axis is ``batch_axis + 1``; returns the batch in row order."""
    z = jnp.moveaxis(z, 0, batch_axis + 1)  # (..., c, n, ...): row i * n + j
    shape = z.shape
    return z.reshape(*shape[:batch_axis], shape[batch_axis] * shape[batch_axis + 1], *shape[batch_axis + 2 :])


def chunked_embed(embed_fn: Callable, chunk_size: int, *, batch_axis: int = 0) -> Callable:
    """Differentiable chunk-by-chunk embedding of a whole batch.

    Args:
      embed_fn: ``embed_fn(params, chunk_inputs, key) -> embeddings`` for one chunk; the
        inputs are a pytree of arrays whose leading axis is the batch (e.g. ``{a_ids, a_mask,
        b_ids, b_mask, n_ids (B, k, T), n_mask}``), ``key`` is a PRNG key or None (no dropout).
        It may return any pytree, e.g. a tuple of sides or per-layer stacks (k+1, c, D).
      chunk_size: rows per chunk; must divide the batch size.
      batch_axis: the batch axis of every embedding leaf (0 for (c, D) and (c, k, D);
        1 for per-layer (k+1, c, D)).

    Returns:
      ``embed_all(params, inputs, key=None)`` -> the embeddings of the full batch in batch
      order, as one call of ``embed_fn`` on the whole batch would lay them out. Its VJP
      re-embeds one chunk at a time (``jax.checkpoint`` under ``lax.map``).
    """

    def embed_all(params, inputs, key=None):
        n = _num_chunks(inputs, chunk_size)
        chunks = jax.tree.map(lambda x: split_chunks(x, n), inputs)
        keys = None if key is None else jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(n))

        # Saves only the chunk inputs; the backward pass recomputes the chunk's activations.
        @jax.checkpoint
        def one_chunk(params, xs):
            return embed_fn(params, *xs)

        stacked = jax.lax.map(lambda xs: one_chunk(params, xs), (chunks, keys))
        return jax.tree.map(lambda z: merge_chunks(z, batch_axis), stacked)

    return embed_all


def gradcache_value_and_grad(embed_fn: Callable, loss_fn: Callable, chunk_size: int, *, batch_axis: int = 0) -> Callable:
    """GradCache: the loss and its exact parameter gradient, embedding ``chunk_size`` rows at a time.

    Args:
      embed_fn: see ``chunked_embed``.
      loss_fn: ``loss_fn(embeddings, *loss_args) -> scalar`` on the FULL batch of embeddings
        (the pytree ``embed_fn`` returns, with the batch restored), e.g.
        ``lambda z: infonce(*z)``, a ``matryoshka(...)`` of it, or a 2D loss over per-layer
        stacks taking its sampling key in ``loss_args``.
      chunk_size: rows per chunk; bounds the encoder's activation memory.
      batch_axis: see ``chunked_embed``.

    Returns:
      ``value_and_grad(params, inputs, key=None, *loss_args) -> (loss, grads)``; equal (to
      float rounding) to ``jax.value_and_grad`` of the uncached loss whose chunk ``j`` (rows
      ``j::n``) is embedded with dropout key ``fold_in(key, j)``. Jit it; it works on sharded
      inputs and parameters like any other jnp code.
    """
    embed_all = chunked_embed(embed_fn, chunk_size, batch_axis=batch_axis)

    def value_and_grad(params, inputs, key=None, *loss_args):
        return jax.value_and_grad(lambda p: loss_fn(embed_all(p, inputs, key), *loss_args))(params)

    return value_and_grad
