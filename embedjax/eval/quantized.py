"""Any evaluator on quantised embeddings: float32 next to int8 and binary.

``QuantizedEvaluator(inner)`` embeds once (``inner.embed``) and scores the same embeddings at
every precision with ``inner.score`` (``embedjax.eval.quantize``, sentence-transformers'
``quantize_embeddings`` conventions):

* ``float32``: as embedded; keys as ``inner`` reports them;
* ``int8``: 256 buckets per dimension over the [min, max] of a calibration set, scored as floats;
  keys ``{key}@int8``;
* ``binary``: sign bits packed 8 per byte, scored by Hamming distance (an STS evaluator then
  reports ``hamming_*`` keys); keys ``{key}@binary``.

Calibration (int8 ranges): ``calibration=None`` takes the evaluated embeddings themselves (every
array ``inner.embed`` returned, stacked), which is what ``quantize_embeddings`` does without ranges
or calibration embeddings (and how sentence-transformers' ``EmbeddingSimilarityEvaluator``
calibrates: both sides together). Texts are embedded with the same encoder and depth; an array, or
a dict of arrays (stacked), is used as given.

With ``rescore=True`` the float32 embeddings go to ``inner.score(..., reference=...)``, so an
evaluator that can rescore (retrieval: re-rank the quantised top-k with float queries) does.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Sequence

import numpy as np

from embedjax.eval import base, quantize

CALIBRATION = "calibration"  # the embed dict's key for the calibration embeddings


def _stack(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float32) for a in arrays], axis=0)


@dataclasses.dataclass
class QuantizedEvaluator:
    """``inner`` at every precision of ``precisions``; follows the evaluator contract itself.

    Args:
      inner: any evaluator (``name``, ``main_metric``, ``embed``, ``score``).
      precisions: a subset of ``("float32", "int8", "binary")``, in report order.
      calibration: int8 ranges from None (the evaluated embeddings), texts, an ``(N, D)`` array or
        a dict of arrays.
      rescore: hand the float32 embeddings to ``inner.score`` as ``reference``.
      batch_size: encode batch size for calibration texts.
    """

    inner: base.Evaluator
    precisions: Sequence[str] = quantize.PRECISIONS
    calibration: Sequence[str] | np.ndarray | Mapping[str, np.ndarray] | None = None
    rescore: bool = True
    batch_size: int = 128

    def __post_init__(self):
        self.precisions = tuple(self.precisions)
        bad = [p for p in self.precisions if p not in quantize.PRECISIONS]
        if bad or not self.precisions or len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"QuantizedEvaluator: precisions must be distinct values of {quantize.PRECISIONS}, "
                             f"got {list(self.precisions)}")
        cal = self.calibration
        if isinstance(cal, str):
            raise ValueError("QuantizedEvaluator: calibration is one string; pass a list of texts")
        if isinstance(cal, Mapping):
            self.calibration = _stack(cal.values())
        elif cal is not None and not isinstance(cal, np.ndarray):
            cal = list(cal)
            if not cal or not all(isinstance(t, str) for t in cal):
                raise ValueError("QuantizedEvaluator: calibration texts must be a non-empty list of strings")
            self.calibration = cal
        if isinstance(self.calibration, np.ndarray):
            quantize.int8_ranges(self.calibration)  # checks the shape now, not at scoring time

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def main_metric(self) -> str:
        """``inner.main_metric`` at the first precision (float32 by default: no suffix)."""
        return self.inner.main_metric + _suffix(self.precisions[0])

    def embed(self, encoder, *, num_layers: int | None = None) -> base.Embeddings:
        """``inner.embed``'s arrays, plus ``"calibration"`` when calibration texts or embeddings are set
        (so a ``GridEvaluator`` around this one slices them with the rest)."""
        out = dict(self.inner.embed(encoder, num_layers=num_layers))
        if CALIBRATION in out:
            raise ValueError(f"QuantizedEvaluator: the inner evaluator already uses the key {CALIBRATION!r}")
        if isinstance(self.calibration, np.ndarray):
            out[CALIBRATION] = self.calibration
        elif self.calibration is not None:
            out[CALIBRATION] = base.encode(encoder, self.calibration, batch_size=self.batch_size,
                                           num_layers=num_layers)
        return out

    def score(self, embeddings: base.Embeddings, *, reference: base.Embeddings | None = None) -> dict[str, float]:
        """``inner.score`` at every precision: ``{key}``, ``{key}@int8``, ``{key}@binary``."""
        floats = {k: np.asarray(v) for k, v in embeddings.items()}
        quantised = [k for k, v in floats.items() if not np.issubdtype(v.dtype, np.floating)]
        if quantised:
            raise ValueError(f"QuantizedEvaluator quantises float embeddings; {quantised} are already "
                             f"{floats[quantised[0]].dtype}")
        calibration = floats.pop(CALIBRATION, None)
        if calibration is None:
            calibration = _stack(floats.values())
        reference = floats if self.rescore else None
        out = {}
        for precision in self.precisions:
            if precision == "float32":
                scores = self.inner.score(floats)
            elif precision == "int8":
                ranges = quantize.int8_ranges(calibration)
                scores = self.inner.score({k: quantize.int8(v, ranges) for k, v in floats.items()},
                                          reference=reference)
            else:
                scores = self.inner.score({k: quantize.binary(v) for k, v in floats.items()}, reference=reference)
            out.update({f"{key}{_suffix(precision)}": float(v) for key, v in scores.items()})
        return out

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        """Yields ``(f"{name}/{key}[@int8|@binary]", value)``."""
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))


def _suffix(precision: str) -> str:
    return "" if precision == "float32" else f"@{precision}"
