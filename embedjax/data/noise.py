"""Damaged copies of texts for denoising objectives: each text becomes a ``Pair`` of its damaged
copy (``text_a``, what the encoder reads) and itself (``text_b``, what is reconstructed).

``DeletionNoise`` is TSDAE's input (arXiv:2104.06979; sentence-transformers'
``DenoisingAutoEncoderDataset``): words deleted by ``embedjax.tsdae.delete_tokens``. The noise of
record i is drawn from a generator seeded by ``(seed, i)``, so a record's damaged copy is the same
whenever it is read: on every host, after a resume, and in every epoch (sentence-transformers draws
new noise at each access; a CPU-sized run reads each text once or twice, so the two agree there).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from embedjax.data.readers import Pair
from embedjax.tsdae import delete_tokens

NOISES = ("delete",)  # data.noise


class DeletionNoise(Sequence):
    """Random access ``Pair(delete_tokens(text), text)`` over ``texts`` (a random-access sequence of
    strings), deleting each word with probability ``ratio`` (TSDAE's 0.6)."""

    def __init__(self, texts: Sequence[str], ratio: float = 0.6, seed: int = 0):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"the deletion ratio is the probability of deleting each word, in [0, 1); got {ratio!r}")
        if texts and not isinstance(texts[0], str):
            raise ValueError(f"deletion noise damages single texts (data.kind sentences, stsb_sentences or "
                             f"beir_corpus), got records like {texts[0]!r}")
        self.texts, self.ratio, self.seed = texts, float(ratio), int(seed)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Pair:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        text = self.texts[index]
        return Pair(delete_tokens(text, np.random.default_rng((self.seed, index)), self.ratio), text)


def with_noise(texts: Sequence[str], noise: str | None, *, ratio: float, seed: int):
    """``texts`` as they train: unchanged (``noise`` None) or as ``(damaged, original)`` pairs."""
    if noise is None:
        return texts
    if noise not in NOISES:
        raise ValueError(f"unknown data.noise {noise!r}; choose one of {NOISES} or None")
    return DeletionNoise(texts, ratio, seed)


__all__ = ["NOISES", "DeletionNoise", "with_noise"]
