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


@dataclasses.dataclass(frozen=True)
class Batch:
    """A padded batch: (rows, length) int32 arrays; rows past ``size`` are padding."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    size: int


class Tokenizer:
    """A Hugging Face fast tokenizer with truncation to ``max_length`` and bucketed padding."""

    def __init__(self, backend, max_length: int, pad_token_id: int, buckets: Sequence[int] = DEFAULT_BUCKETS):
        self.backend = backend
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self.buckets = buckets_up_to(self.max_length, buckets)
        backend.no_padding()
        backend.enable_truncation(self.max_length)

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
        """Token encodings (ids, type ids), truncated to max_length, unpadded."""
        return self.backend.encode_batch(list(texts))

    def num_tokens(self, text: str) -> int:
        """Length of ``text`` in tokens, special tokens included."""
        return len(self.backend.encode(text).ids)

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

    def __call__(self, texts: Sequence[str], rows: int | None = None) -> Batch:
        """Tokenizes and pads ``texts`` into one static-shape batch."""
        return self.pad(self.encode(texts), rows)
