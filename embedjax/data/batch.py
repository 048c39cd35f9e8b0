"""The training batch: one typed pytree, built by ``collate`` and read by everything after it.

A batch holds up to three *sides*, one per text field of the records:

    a   text_a   the first text of each example (a query, STS sentence 1)
    b   text_b   the second text (a positive, STS sentence 2); absent for single texts
                 (unsupervised SimCSE without packing: the positive is side a again); or m
                 positive slots per query (a ``(B, m)`` lead; an empty slot has hash 0)
    n   text_n   hard negatives: one per example, or k (a ``(B, k)`` lead)

A ``Side`` is either padded tokens, ``ids / mask / types`` of shape ``lead + (T,)`` (``lead``
is ``(B,)``, or ``(B, k)`` for k negatives per example) with an optional ``pool`` mask (0 on an
instruction prefix that pooling skips), or, in a packed batch, ``text_index``: where each
example's text sits among the texts packed into the batch's ``PackedRows``. Either way it
carries ``hashes``: an int32 hash of each raw text, so a loss can tell equal texts apart from
negatives (``embedjax.data.pipeline.text_hash``).

``Batch`` adds the example-level fields: ``labels`` (B,) gold scores, ``teacher`` (B, 1 + k)
teacher scores [s(a, b), s(a, n_1), ...], ``relevant`` (B, P) the hashes of every document
judged relevant to the row's query (retrieval records; 0 = no document), never its negatives,
and two host-side fields the model never reads,
``valid`` (B,) False on padding rows and ``index`` (B,) each row's record index (-1: padding).

A cross-encoder batch (``embedjax.data.cross_batches``) has one side, ``a``: the (query, candidate)
pairs of each row's candidate group, lead ``(B, G)``, hashed by candidate (0: masked), with
``labels`` ``(B, G)``.

Every class is a registered pytree (absent fields are None, empty subtrees), so a batch goes
through ``jax.jit``, ``jax.tree.map`` and ``sharding.to_global`` as one argument. What is
specific to a field (how it pads when hosts agree on shapes, which fields an encoder reads)
is said here, once: a new model family adds its fields to these classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

SIDES = ("a", "b", "n")
Array = Any  # numpy on the host, jax.Array on device, ShapeDtypeStruct when abstract


def _pad_last(x, length: int, value):
    """``x`` with its last axis padded with ``value`` to ``length`` (unchanged when already so, or None)."""
    return None if x is None else _pad_to(x, (*x.shape[:-1], length), value)


def _pad_to(x, shape: tuple[int, ...], value):
    if x is None or tuple(x.shape) == tuple(shape):
        return x
    out = np.full(shape, value, x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Side:
    """One side of every example: padded tokens (``ids``, ``mask``, ``types``, ``pool``) or,
    packed, ``text_index`` into the batch's packed texts; ``hashes`` of the raw texts."""

    hashes: Array = None      # lead int32
    ids: Array = None         # lead + (T,) int32
    mask: Array = None        # lead + (T,) 1 on real tokens
    types: Array = None       # lead + (T,) token type (segment) ids
    pool: Array = None        # lead + (T,) 1 on the tokens pooling reads; None: ``mask``
    text_index: Array = None  # lead int32, packed batches only

    @property
    def packed(self) -> bool:
        return self.text_index is not None

    @property
    def length(self) -> int:
        """Padded tokens per text (0 for a packed side)."""
        return 0 if self.ids is None else int(self.ids.shape[-1])

    def tokens(self) -> Side:
        """Only what an encoder reads (no hashes): what GradCache splits into chunks."""
        return Side(ids=self.ids, mask=self.mask, types=self.types, pool=self.pool)

    def padded_to(self, length: int, pad_token_id: int) -> Side:
        """Padded to ``length`` tokens per text: padding is inert (mask 0, pool 0)."""
        if self.ids is None:
            return self
        return dataclasses.replace(self, ids=_pad_last(self.ids, length, pad_token_id),
                                   mask=_pad_last(self.mask, length, 0), types=_pad_last(self.types, length, 0),
                                   pool=_pad_last(self.pool, length, 0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PackedRows:
    """Every text of a packed batch in shared rows (``embedjax.tokenize.Tokenizer.pack``), all (R, L):
    ``segments`` is 0 on padding and ``i + 1`` on the tokens of packed text i, ``positions``
    each token's index in its text, ``pool`` (optional) 1 on the tokens pooling reads."""

    ids: Array
    types: Array
    segments: Array
    positions: Array
    pool: Array = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)

    def padded_to(self, rows: int, length: int, pad_token_id: int) -> PackedRows:
        """``rows`` x ``length``; padding holds no text (segment 0)."""
        pad = lambda x, value=0: _pad_to(x, (rows, length), value)  # noqa: E731
        return PackedRows(ids=pad(self.ids, pad_token_id), types=pad(self.types), segments=pad(self.segments),
                          positions=pad(self.positions), pool=pad(self.pool))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """A batch of examples: its sides (``a``, optional ``b`` and ``n``), packed rows when the
    sides are packed, gold ``labels`` and ``teacher`` scores, and the host-side ``valid`` and
    ``index`` (see the module docstring)."""

    a: Side
    b: Side | None = None
    n: Side | None = None
    packed: PackedRows | None = None
    labels: Array = None      # (B,) float32
    teacher: Array = None     # (B, 1 + k) float32
    relevant: Array = None    # (B, P) int32 hashes of the query's relevant documents, 0-padded
    valid: Array = None       # (B,) bool, host-side
    index: Array = None       # (B,) int32, host-side

    @property
    def sides(self) -> dict[str, Side]:
        """The sides present, in order a, b, n."""
        return {name: getattr(self, name) for name in SIDES if getattr(self, name) is not None}

    @property
    def rows(self) -> int:
        return int(self.a.hashes.shape[0])

    @property
    def positive_hashes(self) -> Array:
        """Hashes of each example's positive: side b's, or side a's when the positive is a second
        view of the same text (unsupervised SimCSE)."""
        return (self.b if self.b is not None else self.a).hashes

    def model_inputs(self) -> Batch:
        """What the train step reads: without the host-side ``valid`` and ``index``."""
        return dataclasses.replace(self, valid=None, index=None)

    def token_inputs(self) -> Batch:
        """Only the sides' tokens, every leaf batch-major: what GradCache embeds chunk by chunk."""
        if self.packed is not None:
            raise ValueError("a packed batch has no per-example tokens (GradCache needs the padded layout)")
        side = lambda s: None if s is None else s.tokens()  # noqa: E731
        return Batch(a=side(self.a), b=side(self.b), n=side(self.n))

    # ------------------------------------------------------------------ hosts agreeing on shapes

    def shape_signature(self) -> np.ndarray:
        """The sizes hosts must agree on before their slices become one global array: each padded
        side's token length (a, b, n; 0 when absent or packed), the packed rows' (R, L) and the
        width of ``relevant`` (0 when absent)."""
        lengths = [self.sides[s].length if s in self.sides else 0 for s in SIDES]
        rows = list(self.packed.shape) if self.packed is not None else [0, 0]
        relevant = [0 if self.relevant is None else int(self.relevant.shape[1])]
        return np.asarray(lengths + rows + relevant, np.int64)

    def padded_to(self, signature, pad_token_id: int) -> Batch:
        """Padded to the sizes of ``signature`` (``shape_signature`` maxed over hosts)."""
        sides = {s: self.sides[s].padded_to(int(n), pad_token_id) for s, n in zip(SIDES, signature[:3])
                 if s in self.sides}
        packed = None if self.packed is None else self.packed.padded_to(int(signature[3]), int(signature[4]),
                                                                        pad_token_id)
        relevant = _pad_last(self.relevant, int(signature[5]), 0)  # 0: no document
        return dataclasses.replace(self, packed=packed, relevant=relevant, **sides)

    def with_text_offset(self, offset: int) -> Batch:
        """Packed text indices (and segments) shifted by ``offset``: host h's packed text i is
        global text ``h * texts_per_host + i``. Unchanged when not packed."""
        if self.packed is None or not offset:
            return self
        segments = self.packed.segments
        packed = dataclasses.replace(self.packed, segments=np.where(segments > 0, segments + offset, 0).astype(np.int32))
        sides = {s: dataclasses.replace(side, text_index=(side.text_index + offset).astype(np.int32))
                 for s, side in self.sides.items()}
        return dataclasses.replace(self, packed=packed, **sides)

    @property
    def packed_texts(self) -> int:
        """How many texts this batch packs (every host packs the same number: rows x sides)."""
        return sum(int(np.size(s.text_index)) for s in self.sides.values() if s.packed)


__all__ = ["Batch", "PackedRows", "SIDES", "Side"]
