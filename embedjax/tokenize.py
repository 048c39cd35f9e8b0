"""Tokenization into static shapes.

jit compiles one program per input shape, so batches are padded to the smallest
of a fixed set of length buckets (and rows to a power of two), which bounds the
number of compilations whatever the texts.
"""

from __future__ import annotations

import bisect
import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

# Steps of 4 tokens up to 32 (sentences average ~10-20 tokens), of 8 up to 128, then
# coarser: a length-sorted batch carries little padding while the number of compiled
# shapes stays bounded (28 at most).
DEFAULT_BUCKETS = (*range(4, 33, 4), *range(40, 129, 8), 160, 192, 224, 256, 320, 384, 448, 512)


def buckets_up_to(max_length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The buckets below ``max_length``, plus ``max_length`` itself as the last one."""
    return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= length (the last bucket if none is)."""
    i = bisect.bisect_left(buckets, length)
    return buckets[min(i, len(buckets) - 1)]


def rows_for(n: int, batch_size: int) -> int:
    """Rows a batch of n texts is padded to: the next power of two, capped at batch_size."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each holding at most ``capacity`` in total (longest items first,
    each into the first bin with room). Items longer than ``capacity`` get a bin each."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Several texts per row, (rows, length) int32 arrays (see ``Tokenizer.pack``).

    ``segment_ids`` is 0 on padding and ``i + 1`` on the tokens of text i; ``positions``
    is each token's index within its own text.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    num_texts: int


@dataclasses.dataclass
class Encoded:
    """One text's tokens when ``Tokenizer`` appended the EOS or dropped ids itself (what ``pad`` /
    ``pack`` read of a ``tokenizers.Encoding``: ``ids``, ``type_ids``; ``special_tokens_mask`` 1 on
    added tokens)."""

    ids: list
    type_ids: list
    special_tokens_mask: list


def _without(encoding, drop: frozenset) -> Encoded:
    """``encoding`` without the tokens whose id is in ``drop``."""
    keep = [k for k, i in enumerate(encoding.ids) if i not in drop]
    return Encoded([encoding.ids[k] for k in keep], [encoding.type_ids[k] for k in keep],
                   [encoding.special_tokens_mask[k] for k in keep])


@dataclasses.dataclass(frozen=True)
class Batch:
    """A padded batch: (rows, length) int32 arrays; rows past ``size`` are padding."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    size: int


class Tokenizer:
    """A Hugging Face fast tokenizer with truncation to ``max_length`` and bucketed padding.

    ``eos_token_id``: every encoding ends with this id. Decoder tokenizers (Qwen, Llama) often
    add no EOS, while last-token pooling (Qwen3-Embedding, gte-Qwen, e5-mistral) must pool the
    EOS state: when the backend's post-processor does not already end a text with it (checked
    once, on a probe string: ``appends_eos``), the id is appended to every encoding, and
    truncation stops at ``max_length - 1`` to leave room for it. None: encodings as the backend
    makes them.

    Static token tables (``embedjax.encoders.static``) read a text's tokens without the model's
    special tokens, as model2vec and sentence-transformers' ``StaticEmbedding`` do:
    ``add_special_tokens=False`` (no [CLS] / [SEP]), ``drop_ids`` (ids removed from every encoding
    after truncation: model2vec drops the unknown token) and ``chars_per_token`` (each text is first
    cut to ``max_length * chars_per_token`` characters: model2vec's cut, by its vocabulary's median
    token length).

    The backend's truncation is set here (it is state of the shared ``tokenizers`` object): build
    another tokenizer over the same backend with ``replace``, which keeps these options.
    """

    def __init__(self, backend, max_length: int, pad_token_id: int, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 eos_token_id: int | None = None, add_special_tokens: bool = True, drop_ids: Sequence[int] = (),
                 chars_per_token: int | None = None):
        self.backend = backend
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self.buckets = buckets_up_to(self.max_length, buckets)
        self._bucket_choices = tuple(buckets)
        self.eos_token_id = None if eos_token_id is None else int(eos_token_id)
        self.add_special_tokens = bool(add_special_tokens)
        self.drop_ids = tuple(sorted({int(i) for i in drop_ids}))
        if chars_per_token is not None and int(chars_per_token) < 1:
            raise ValueError(f"chars_per_token must be >= 1 or None, got {chars_per_token}")
        self.chars_per_token = None if chars_per_token is None else int(chars_per_token)
        backend.no_padding()
        backend.enable_truncation(self.max_length)
        self.appends_eos = False
        if self.eos_token_id is not None:
            probe = backend.encode("a", add_special_tokens=self.add_special_tokens).ids
            self.appends_eos = not probe or probe[-1] != self.eos_token_id
        if self.appends_eos:
            if self.max_length < 2:
                raise ValueError(f"max_length {self.max_length} leaves no room for the appended EOS")
            backend.enable_truncation(self.max_length - 1)
        self._special_ids = frozenset(
            int(i) for i, tok in backend.get_added_tokens_decoder().items() if getattr(tok, "special", False))
        self._prompt_lengths: dict[str, int] = {}

    def replace(self, **changes) -> "Tokenizer":
        """A tokenizer over the same backend with these constructor arguments changed (``max_length``,
        ``pad_token_id``, ``buckets``, ``eos_token_id``, the static-table options), the others kept;
        e.g. the training tokenizer ``encoder.tokenizer.replace(buckets=config.data.buckets)``."""
        kw = dict(max_length=self.max_length, pad_token_id=self.pad_token_id, buckets=self._bucket_choices,
                  eos_token_id=self.eos_token_id, add_special_tokens=self.add_special_tokens,
                  drop_ids=self.drop_ids, chars_per_token=self.chars_per_token)
        unknown = sorted(set(changes) - set(kw))
        if unknown:
            raise TypeError(f"Tokenizer.replace: unknown arguments {unknown}; it takes {sorted(kw)}")
        kw.update(changes)
        return Tokenizer(self.backend, **kw)

    @classmethod
    def from_directory(cls, directory: Path, max_length: int, pad_token_id: int, **kw) -> "Tokenizer":
        """Loads ``tokenizer.json``, or builds the fast tokenizer from vocab files via transformers."""
        path = Path(directory) / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer as HFTokenizer

            backend = HFTokenizer.from_file(str(path))
        else:
            from transformers import AutoTokenizer

            backend = AutoTokenizer.from_pretrained(str(directory), use_fast=True).backend_tokenizer
        return cls(backend, max_length, pad_token_id, **kw)

    def encode(self, texts: Sequence[str]) -> list:
        """Token encodings (ids, type ids), truncated to max_length, unpadded (ending with the EOS
        when ``appends_eos``, without ``drop_ids``: then ``Encoded`` records)."""
        texts = list(texts)
        if self.chars_per_token is not None:
            texts = [t[: self.max_length * self.chars_per_token] for t in texts]
        encodings = self.backend.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        if self.drop_ids:
            drop = frozenset(self.drop_ids)
            encodings = [e if drop.isdisjoint(e.ids) else _without(e, drop) for e in encodings]
        if not self.appends_eos:
            return encodings
        eos = self.eos_token_id
        return [Encoded([*e.ids, eos], [*e.type_ids, e.type_ids[-1] if e.type_ids else 0],
                        [*e.special_tokens_mask, 1]) for e in encodings]

    def num_tokens(self, text: str) -> int:
        """Length of ``text`` in tokens, special tokens included (the appended EOS too)."""
        return len(self.encode([text])[0].ids)

    def prompt_length(self, prompt: str) -> int:
        """How many leading tokens of ``prompt + text`` belong to the prompt: what pooling skips
        with ``include_prompt=False`` (``Encoder.encode`` and the training pipeline both call this).

        As sentence-transformers (its Transformer module's ``_get_prompt_length``): the tokens of
        the prompt encoded alone, special ones included (a leading [CLS] / BOS is the prompt's),
        minus the last one when it is a special token (the [SEP] / EOS that closes any text,
        which ``prompt + text`` has after the text instead). Tokens merging across the prompt /
        text boundary are counted as the prompt alone tokenizes them, there as here. 0 for "".
        """
        if not prompt:
            return 0
        if prompt not in self._prompt_lengths:
            e = self.encode([prompt])[0]
            n = len(e.ids)
            if n and (e.special_tokens_mask[-1] or e.ids[-1] in self._special_ids):
                n -= 1
            self._prompt_lengths[prompt] = n
        return self._prompt_lengths[prompt]

    def pad(self, encodings: Sequence, rows: int | None = None, min_length: int = 1) -> Batch:
        """Pads encodings to ``rows`` rows and to the bucket of the longest one
        (or of ``min_length``, if longer: to give several batches one shape)."""
        n = len(encodings)
        rows = n if rows is None else rows
        length = bucket_for(max(max((len(e.ids) for e in encodings), default=1), min_length), self.buckets)
        ids = np.full((rows, length), self.pad_token_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        types = np.zeros((rows, length), np.int32)
        for i, e in enumerate(encodings):
            t = len(e.ids)
            ids[i, :t] = e.ids
            mask[i, :t] = 1
            types[i, :t] = e.type_ids
        return Batch(ids, mask, types, n)

    def pack(self, encodings: Sequence, length: int, rows_multiple: int = 1) -> PackedBatch:
        """Packs encodings into rows of ``length`` tokens, several texts per row.

        Row length: ``length``, or the bucket of the longest text if that is longer. Rows:
        as few as first-fit-decreasing needs, rounded up to a multiple of ``rows_multiple``
        (a multiple of the device count shards evenly; coarser multiples mean fewer
        compiled shapes). A text never spans two rows, and ``embed_packed`` masks attention
        across texts, so each text's embedding is the one it gets alone.
        """
        lengths = [len(e.ids) for e in encodings]
        length = max(int(length), bucket_for(max(lengths, default=1), self.buckets))
        bins = first_fit_decreasing(lengths, length)
        rows = max(-(-len(bins) // rows_multiple) * rows_multiple, rows_multiple)
        ids = np.full((rows, length), self.pad_token_id, np.int32)
        types, segments, positions = (np.zeros((rows, length), np.int32) for _ in range(3))
        for r, members in enumerate(bins):
            start = 0
            for i in members:
                e, n = encodings[i], lengths[i]
                ids[r, start:start + n] = e.ids
                types[r, start:start + n] = e.type_ids
                segments[r, start:start + n] = i + 1
                positions[r, start:start + n] = np.arange(n)
                start += n
        return PackedBatch(ids, types, segments, positions, len(encodings))

    def __call__(self, texts: Sequence[str], rows: int | None = None) -> Batch:
        """Tokenizes and pads ``texts`` into one static-shape batch."""
        return self.pad(self.encode(texts), rows)
