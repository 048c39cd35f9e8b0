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
Each block is scored in column tiles (``tile_columns``, 2,048 candidates by default): a tile's
logits are folded into the running sums and dropped, and the backward pass recomputes them a tile
at a time (``jax.checkpoint`` on the ring step and on the tile step). What a device keeps is the
candidate blocks it received (the global batch's embeddings, as the gathered loss holds too) and
a few (local rows x tile) logit arrays, less than one (local x local) block once a block has more
than a few tiles (benchmarks/ring_memory.py).

Every ``infonce`` option composes, because the masks are the same code (``infonce``'s column
blocks carry their ids, their query and their global column index): hard negatives, several
positives (one row per positive or all in the numerator), duplicate and qrels masks, the
false-negative rules (the student's own scores or a guide's), the GTE directions, hardness
weighting, ``in_batch_negatives=False`` and the symmetric variant. Wrappers compose from outside
(Matryoshka and 2D prefixes call the loss on sliced embeddings; GradCache differentiates it with
respect to the embeddings). Soft targets (``teacher_similarity``) and metric objects (MaxSim)
stay gathered-only.

The result equals the gathered loss up to float summation order: tests/test_ring_loss.py checks,
on 8 devices, whole blocks and tiles, the loss at rtol 1e-6, the gradients at 1e-12 in float64,
and the float32 gradients as close to the float64 truth as the gathered loss's own.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from embedjax.losses.infonce import (D2Q, Q2D, Q2Q, _back_block, _block_logits, _candidate_blocks, _columns, _joint,
                                     _prepare, _rows, _rule_blocks, _threshold)

BATCH_AXES = ("data", "fsdp")  # embedjax.sharding.BATCH_AXES (not imported: losses stay free of the mesh module)


class _RunningLogSumExp(NamedTuple):
    """Per row: the largest logit seen (no gradient) and the sum of exp(logit - that maximum)."""

    peak: jax.Array
    total: jax.Array

    @classmethod
    def empty(cls, rows, dtype):
        return cls(jnp.full((rows,), -jnp.inf, dtype), jnp.zeros((rows,), dtype))

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


def tile_count(queries: int, columns: int, tile_columns: int | None) -> int:
    """How many column tiles a device's (rows x candidates) block is scored in: the fewest that
    divide its ``queries`` (so its documents and its queries split alike) and hold at most
    ``tile_columns`` of its ``columns`` candidate documents each (None: one tile)."""
    if tile_columns is None or columns <= tile_columns:
        return 1
    return next((t for t in range(2, queries + 1) if queries % t == 0 and columns // t <= tile_columns), queries)


def _tiles(columns, count):
    """A ``_Docs`` / ``_Queries`` block (every leaf column-major) as ``count`` equal tiles, stacked."""
    return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), columns)


def _row_sum_and_count(per_row, valid):
    if valid is None:
        return jnp.sum(per_row), jnp.asarray(per_row.shape[0], per_row.dtype)
    return jnp.sum(jnp.where(valid, per_row, 0.0)), jnp.sum(valid).astype(per_row.dtype)


def _shard_loss(arrays, *, axes, options, tile_columns):
    """One device's part: its rows against every device's candidates, reduced over the ring.

    Each (rows x one device's candidates) block is scored in column tiles (``tile_count``), each
    folded into the rows' running log-sum-exps and recomputed on the way back, so the largest
    logit block alive is (rows x one tile)."""
    shards, shard = jax.lax.axis_size(axes), jax.lax.axis_index(axes)
    guide = arrays.pop("guide", None)
    symmetric = options["symmetric"]
    batch, guide, opts, all_positives = _prepare(**arrays, guide=guide, **options, soft_targets=False)
    rows = _rows(batch, all_positives, guide, shard=shard)
    docs, queries = _columns(batch, guide, shard=shard, shards=shards)
    if not (symmetric or set(opts.directions) & {Q2Q, D2Q}):
        queries = None  # only documents travel
    count = tile_count(batch.b, docs.vecs.shape[0], tile_columns)
    positive_ids_given = arrays["positive_ids"] is not None
    n_rows, dtype = rows.query.shape[0], rows.queries.dtype
    empty = _RunningLogSumExp.empty(n_rows, dtype)

    def tiled(fold, carry, blocks):
        """``fold(carry, tile)`` over the column tiles of ``blocks``, each tile recomputed on the way back."""
        carry, _ = jax.lax.scan(jax.checkpoint(lambda c, tile: (fold(c, tile), None)), _varying(carry, axes),
                                _tiles(blocks, count))
        return carry

    # The own block holds every target. First the false-negative rule's bar: the target's rule score
    # (no gradient flows into it), as a running minimum over the tiles.
    bar = None
    if opts.has_rule:
        def lowest_target(low, tile):
            raw = _candidate_blocks(rows, *tile, opts.directions, opts.similarity)
            return jnp.minimum(low, _threshold(rows, tile[0], _rule_blocks(rows, *tile, opts, raw)[Q2D]))

        bar = jax.lax.stop_gradient(tiled(lowest_target, jnp.full((n_rows,), jnp.inf, dtype), (docs, queries)))

    # The target columns of each row (its slot; all its query's slots with all_positives): their
    # logits are picked out tile by tile, then reduced as infonce reduces them.
    target_columns = (rows.target[:, None] if rows.target is not None
                      else rows.query[:, None] * rows.m + jnp.arange(rows.m)[None, :])

    def fold_own(carry, tile):
        joint, (picked, found), back, back_target = carry
        masked, _ = _block_logits(rows, *tile, opts, bar=bar)
        joint = joint.add(_joint(masked))
        hit = (tile[0].index[None, None, :] == target_columns[:, :, None]) & rows.is_target(tile[0])[:, None, :]
        picked = picked + jnp.sum(jnp.where(hit, masked[Q2D][:, None, :], 0.0), axis=2)
        found = found | jnp.any(hit, axis=2)
        if symmetric:  # the symmetric direction's target: the row's own query
            logits = _back_block(rows, tile[1], opts.scale, opts.similarity, positive_ids_given)
            back = back.add(logits)
            back_target = back_target + jnp.sum(jnp.where(tile[1].index[None, :] == rows.query[:, None], logits, 0.0),
                                                axis=1)
        return joint, (picked, found), back, back_target

    targets = (jnp.zeros(target_columns.shape, dtype), jnp.zeros(target_columns.shape, bool))
    joint, (picked, found), back, back_target = tiled(
        fold_own, (empty, targets, empty if symmetric else None, jnp.zeros((n_rows,), dtype) if symmetric else None),
        (docs, queries))
    target = jax.nn.logsumexp(jnp.where(found, picked, -jnp.inf), axis=1)

    def fold_visiting(carry, tile):
        joint, back = carry
        masked, _ = _block_logits(rows, *tile, opts, bar=bar)
        joint = joint.add(_joint(masked))
        if back is not None:
            back = back.add(_back_block(rows, tile[1], opts.scale, opts.similarity, positive_ids_given))
        return joint, back

    ring = [(d, (d + 1) % shards) for d in range(shards)]

    @jax.checkpoint  # the backward pass recomputes each block instead of keeping its logits
    def step(carry, _):
        (blocks, joint, back) = carry
        blocks = jax.lax.ppermute(blocks, axes, ring)
        joint, back = tiled(fold_visiting, (joint, back), blocks)
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
    tile_columns=2048,
):
    """``embedjax.losses.infonce`` over the global batch, computed around a ring of devices.

    Takes ``infonce``'s arguments (all but ``teacher_similarity``) on the GLOBAL batch, every
    array batch-major and split over ``axes`` of ``mesh`` (the training mesh's batch axes by
    default), and returns the same scalar; see the module docstring for how.

    Args:
      mesh: the device mesh; None takes the one set by ``jax.set_mesh`` (the training step sets it).
      axes: the mesh axes the batch is split over; the ring goes around their devices.
      tile_columns: the most candidate documents of one device scored at once (``tile_count``): a
        device's rows meet each device's candidates in column tiles of about this many, so the
        logits alive at once are (local rows x tile), not (local x local). None: whole blocks.
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
        return _shard_loss(dict(arrays), axes=axes, options=options, tile_columns=tile_columns)

    return jax.shard_map(shard_loss, mesh=mesh, in_specs=(P(axes),), out_specs=P())(arrays)
