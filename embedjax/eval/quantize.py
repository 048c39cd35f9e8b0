"""Quantised embeddings: int8 with calibrated ranges, and packed sign bits.

The conventions of sentence-transformers' ``quantize_embeddings`` (its ``int8`` and
``ubinary`` precisions):

* ``int8``: per dimension, the [min, max] range of a calibration set is cut into 256 buckets,
  ``q = clip(floor((x - min) / ((max - min) / 255)), 0, 255) - 128``; scored as floats.
* ``binary``: the sign bit of every dimension (``x > 0``), packed 8 per byte (``np.packbits``,
  big-endian bit order) into uint8; scored by negative Hamming distance
  (``embedjax.similarity.hamming_*``).
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "int8", "binary")


def int8_ranges(calibration: np.ndarray) -> np.ndarray:
    """``(2, D)`` per-dimension [min, max] of calibration embeddings ``(N, D)``."""
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim != 2 or not len(calibration):
        raise ValueError(f"calibration embeddings must be a non-empty (N, D) array, got shape {calibration.shape}")
    return np.stack([calibration.min(axis=0), calibration.max(axis=0)])


def int8(x: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """``(N, D)`` float -> int8 with ``ranges`` from ``int8_ranges`` (a zero-width range maps to -128)."""
    x = np.asarray(x, np.float32)
    lo, hi = np.asarray(ranges, np.float32)
    if lo.shape[-1] != x.shape[-1]:
        raise ValueError(f"ranges are for {lo.shape[-1]} dimensions, embeddings have {x.shape[-1]}")
    steps = (hi - lo) / 255
    steps = np.where(steps > 0, steps, 1.0)
    # floor into buckets 0..255, then shift, as sentence-transformers does; truncating after the
    # shift would round the lower half (negative values) toward zero, one bucket up
    return (np.clip(np.floor((x - lo) / steps), 0, 255) - 128).astype(np.int8)


def binary(x: np.ndarray) -> np.ndarray:
    """``(N, D)`` -> ``(N, ceil(D / 8))`` uint8: the sign bits (``x > 0``), packed."""
    return np.packbits(np.asarray(x) > 0, axis=-1)


def unpack_binary(bits: np.ndarray, dim: int) -> np.ndarray:
    """Packed sign bits -> ``(N, dim)`` float32 of +1 / -1 (for rescoring against float queries)."""
    return np.unpackbits(np.asarray(bits, np.uint8), axis=-1, count=dim).astype(np.float32) * 2 - 1
