"""The ring in-batch contrastive loss: ``infonce`` over the global batch, computed blockwise around
the batch axes so that no device ever holds more than a (local x local) logit block.

The gathered loss (``infonce`` on globally sharded arrays) lets GSPMD all-gather every device's
candidates and builds a (local rows x global candidates) logit block per device: at a global
batch of 64k on 8 devices, 8k x 64k float32 logits per direction, 2 GiB, plus their gradient.
The ring keeps each device's rows where they are and passes the candidates around instead
(``shard_map`` + ``ppermute``): at step t device d holds the candidate block of device d - t,
scores its rows against it, and folds the block into a running maximum and sum of exponentials
per row (log-sum-exp as flash attention computes its softmax). After ``n`` steps every row has
seen every candidate; the target logits sit in the row's own block, so they are taken at step 0.
The backward pass recomputes each block (``jax.checkpoint`` on the step), so what a device keeps
for it is the candidate blocks it received (the global batch's embeddings, as the gathered loss
holds too), never a logit block wider than one shard.

Every ``infonce`` option composes, because the masks are the same code (``infonce``'s column
blocks carry their ids, their query and their global column index): hard negatives, several
positives (one row per positive or all in the numerator), duplicate and qrels masks, the
false-negative rules (the student's own scores or a guide's), the GTE directions, hardness
weighting, ``in_batch_negatives=False`` and the symmetric variant. Wrappers compose from outside
(Matryoshka and 2D prefixes call the loss on sliced embeddings; GradCache differentiates it with
respect to the embeddings). Soft targets (``teacher_similarity``) and metric objects (MaxSim)
stay gathered-only.

The result equals the gathered loss up to float summation order (tests/test_ring_loss.py checks
loss and gradients on 8 devices at rtol 1e-6).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from embedjax.losses.infonce import (D2Q, Q2D, Q2Q, _back_block, _block_logits, _columns, _joint, _prepare, _rows,
                                     _target_logsumexp)

BATCH_AXES = ("data", "fsdp")  # embedjax.sharding.BATCH_AXES (not imported: losses stay free of the mesh module)


class _RunningLogSumExp(NamedTuple):
    """Per row: the largest logit seen (no gradient) and the sum of exp(logit - that maximum)."""

    peak: jax.Array
    total: jax.Array

    @classmethod
    def of(cls, block):
        peak = jax.lax.stop_gradient(jnp.max(block, axis=1))
        return cls(peak, jnp.sum(jnp.exp(block - _finite(peak)[:, None]), axis=1))

    def add(self, block):
        peak = jax.lax.stop_gradient(jnp.maximum(self.peak, jnp.max(block, axis=1)))
        rescaled = self.total * jnp.exp(_finite(self.peak) - _finite(peak))
        rescaled = jnp.where(jnp.isneginf(self.peak), 0.0, rescaled)
        return _RunningLogSumExp(peak, rescaled + jnp.sum(jnp.exp(block - _finite(peak)[:, None]), axis=1))

    def value(self):
        return _finite(self.peak) + jnp.log(self.total)


def _finite(peak):
    # A row with every entry masked so far has peak -inf; shift by 0 instead (its exponentials are 0).
    return jnp.where(jnp.isneginf(peak), 0.0, peak)


def _varying(tree, axes):
    """Every leaf marked as varying over ``axes`` (ids built from ``arange`` are not, yet they travel)."""
    def cast(x):
        kind = jax.typeof(x)
        manual = getattr(kind, "manual_axis_type", None)  # jax >= 0.10; earlier releases call it ``vma``
        varying = manual.varying if manual is not None else kind.vma
        missing = tuple(a for a in axes if a not in varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _row_sum_and_count(per_row, valid):
    if valid is None:
        return jnp.sum(per_row), jnp.asarray(per_row.shape[0], per_row.dtype)
    return jnp.sum(jnp.where(valid, per_row, 0.0)), jnp.sum(valid).astype(per_row.dtype)


def _shard_loss(arrays, *, axes, options):
    """One device's part: its rows against every device's candidates, reduced over the ring."""
    shards, shard = jax.lax.axis_size(axes), jax.lax.axis_index(axes)
    guide = arrays.pop("guide", None)
    symmetric = options["symmetric"]
    batch, guide, opts, all_positives = _prepare(**arrays, guide=guide, **options, soft_targets=False)
    rows = _rows(batch, all_positives, guide, shard=shard)
    docs, queries = _columns(batch, guide, shard=shard, shards=shards)
    if not (symmetric or set(opts.directions) & {Q2Q, D2Q}):
        queries = None  # only documents travel

    positive_ids_given = arrays["positive_ids"] is not None
    masked, bar = _block_logits(rows, docs, queries, opts)  # the own block: every target is here
    target = _target_logsumexp(rows, docs, masked[Q2D])
    joint = _RunningLogSumExp.of(_joint(masked))
    back = back_target = None
    if symmetric:
        own_back = _back_block(rows, queries, opts.scale, opts.similarity, positive_ids_given)
        back, back_target = _RunningLogSumExp.of(own_back), jnp.diagonal(own_back)

    ring = [(d, (d + 1) % shards) for d in range(shards)]

    @jax.checkpoint  # the backward pass recomputes each block instead of keeping its logits
    def step(carry, _):
        (blocks, joint, back) = carry
        blocks = jax.lax.ppermute(blocks, axes, ring)
        visiting_docs, visiting_queries = blocks
        masked, _ = _block_logits(rows, visiting_docs, visiting_queries, opts, bar=bar)
        joint = joint.add(_joint(masked))
        if back is not None:
            back = back.add(_back_block(rows, visiting_queries, opts.scale, opts.similarity, positive_ids_given))
        return (blocks, joint, back), None

    (_, joint, back), _ = jax.lax.scan(step, (_varying((docs, queries), axes), joint, back), None, length=shards - 1)

    total, count = _row_sum_and_count(joint.value() - target, rows.valid)
    loss = jax.lax.psum(total, axes) / jnp.maximum(jax.lax.psum(count, axes), 1.0)
    if not symmetric:
        return loss
    total, count = _row_sum_and_count(back.value() - back_target, batch.slot_real)
    return 0.5 * (loss + jax.lax.psum(total, axes) / jnp.maximum(jax.lax.psum(count, axes), 1.0))


def ring_infonce(
    anchors,
    positives,
    negatives=None,
    *,
    mesh=None,
    axes=BATCH_AXES,
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
):
    """``embedjax.losses.infonce`` over the global batch, computed around a ring of devices.

    Takes ``infonce``'s arguments (all but ``teacher_similarity``) on the GLOBAL batch, every
    array batch-major and split over ``axes`` of ``mesh`` (the training mesh's batch axes by
    default), and returns the same scalar; see the module docstring for how.

    Args:
      mesh: the device mesh; None takes the one set by ``jax.set_mesh`` (the training step sets it).
      axes: the mesh axes the batch is split over; the ring goes around their devices.
      The rest: as ``infonce``. The similarity must be a metric name (not a metric object).
    """
    if not isinstance(similarity, str):
        raise ValueError("the ring loss takes a metric name (cosine, dot, ...); metric objects (TokenMaxSim, "
                         "HeadSum) use the gathered infonce")
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if mesh is None or getattr(mesh, "empty", False) or not set(axes) <= set(mesh.axis_names):
        raise ValueError(f"ring_infonce needs a mesh with the batch axes {axes}: pass mesh= or call it under "
                         "jax.set_mesh(mesh)")
    if guide is not None and not isinstance(guide, (tuple, list)):
        raise ValueError("guide must be a tuple (guide_anchors, guide_positives, guide_negatives_or_None)")
    arrays = dict(anchors=anchors, positives=positives, negatives=negatives, positive_mask=positive_mask,
                  anchor_ids=anchor_ids, positive_ids=positive_ids, negative_ids=negative_ids,
                  relevant_ids=relevant_ids, relevant_mask=relevant_mask)
    if guide is not None:
        arrays["guide"] = tuple(guide)
    options = dict(scale=scale, symmetric=symmetric, similarity=similarity, all_positives=all_positives,
                   directions=directions, fn_margin=fn_margin, fn_relative=fn_relative, hardness=hardness,
                   hardness_mode=hardness_mode, in_batch_negatives=in_batch_negatives)

    def shard_loss(arrays):
        return _shard_loss(dict(arrays), axes=axes, options=options)

    return jax.shard_map(shard_loss, mesh=mesh, in_specs=(P(axes),), out_specs=P())(arrays)
