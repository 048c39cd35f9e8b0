"""Pair classification evaluation (MTEB's protocol, arXiv:2210.07316).

Each pair has a binary label (1 = duplicate / paraphrase / entailed). For every similarity
(cosine, dot, euclidean, manhattan; ``hamming`` for packed sign bits) the pair scores are
computed with ``embedjax.similarity.pairwise`` (the core the losses use), and reported:

* ``{metric}_accuracy`` and ``{metric}_accuracy_threshold``: the best accuracy over every
  threshold, and that threshold;
* ``{metric}_f1``, ``{metric}_precision``, ``{metric}_recall``, ``{metric}_f1_threshold``: the
  best F1 over every threshold, with its precision, recall and threshold;
* ``{metric}_ap``: average precision of the ranking by score;
* ``max_ap`` (``main_metric``), ``max_accuracy``, ``max_f1``: the best over the similarities.

Units: accuracy, F1, precision, recall and AP are **fractions in 0..1** (as in
sentence-transformers' ``BinaryClassificationEvaluator`` and MTEB; the STS evaluator's x100 is
the exception). Thresholds are **raw, in the similarity's natural unit**: a similarity for
cosine and dot (a pair is positive when ``score >= threshold``), a positive distance for
euclidean, manhattan and hamming (positive when ``distance <= threshold``), exactly the numbers
``BinaryClassificationEvaluator`` reports. MTEB names the same quantities ``cosine_accuracy``,
..., ``max_ap`` (its main score for most pair-classification tasks); it reports no thresholds.

Embeddings are scored as the encoder returns them (normalised or not as the checkpoint says,
``embedjax.eval.base.encode``), like sentence-transformers and MTEB: dot and the distances
depend on it.

Threshold rules (shared with ``BinaryClassificationEvaluator``): scores are sorted best first
and a threshold may only fall between two *distinct* scores, never inside a group of tied ones
(their order must not leak into the metric). It is the midpoint of the two scores around the
cut, the lowest score when every pair is predicted positive, and just above the highest score
when none is (accuracy only). Among equally good cuts the first one, i.e. the strictest
threshold, wins; for accuracy, "all negative" wins over any cut that only ties it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import ClassVar, Iterator, Mapping, Sequence

import jax
import numpy as np

from embedjax import similarity
from embedjax.data.pair_readers import LabelledPair, read_labelled_pairs, read_sick_binary
from embedjax.eval import base

DEFAULT_METRICS = ("cosine", "dot", "euclidean", "manhattan")
DISTANCES = ("euclidean", "manhattan", "hamming")  # negated by the core; reported as distances


# ---------------------------------------------------------------- metrics on (scores, labels)


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must be 1-D of the same length, got {scores.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(labels.tolist()) - {0, 1})[:5]}")
    if labels.min() == labels.max():
        raise ValueError(f"labels must hold both 0 and 1 (only {int(labels[0])} found): the metrics are undefined")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return scores, labels.astype(np.int64)


def _cuts(scores, labels):
    """Sorted scores (best first) and, after each group of tied scores: its last index,
    true positives and predicted positives so far."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    ends = np.flatnonzero(np.append(s[1:] != s[:-1], True))  # last index of each tie group
    tp = np.cumsum(y)[ends]
    predicted = ends + 1
    return s, ends, tp, predicted


def _threshold(s: np.ndarray, ends: np.ndarray, k: int):
    """Threshold for predicting tie groups 0..k positive: the midpoint to the next group."""
    i = ends[k]
    if i == len(s) - 1:
        return s[i]
    mid = (s[i] + s[i + 1]) / 2
    return s[i] if mid == s[i + 1] else mid  # a rounded midpoint must not take in the next group


def _float_dtype(scores: np.ndarray):
    return np.result_type(scores.dtype, np.float16)  # float32 stays float32, ints become float64


def best_accuracy(scores, labels) -> tuple[float, float]:
    """``(accuracy, threshold)``: the threshold maximising accuracy of ``score >= threshold``.

    ``scores``: higher = more similar; ``labels``: 0/1 with both present.
    """
    scores, labels = _check(scores, labels)
    dtype = _float_dtype(scores)
    s, ends, tp, predicted = _cuts(scores.astype(dtype), labels)
    n, negatives = len(labels), int((labels == 0).sum())
    fp = predicted - tp
    acc = (tp + (negatives - fp)) / n
    k = int(np.argmax(acc))  # first maximum: the strictest threshold
    if acc[k] > negatives / n:
        return float(acc[k]), float(_threshold(s, ends, k))
    # Predicting every pair negative is as good: a threshold just above the best score.
    return negatives / n, float(np.nextafter(s[0], np.inf, dtype=dtype))


def best_f1(scores, labels) -> tuple[float, float, float, float]:
    """``(f1, precision, recall, threshold)`` at the threshold maximising F1 of ``score >= threshold``."""
    scores, labels = _check(scores, labels)
    s, ends, tp, predicted = _cuts(scores.astype(_float_dtype(scores)), labels)
    precision = tp / predicted
    recall = tp / labels.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall), 0.0)
    k = int(np.argmax(f1))  # some cut has tp > 0 (a positive exists), so f1[k] > 0
    return float(f1[k]), float(precision[k]), float(recall[k]), float(_threshold(s, ends, k))


def average_precision(scores, labels) -> float:
    """Average precision of ranking by score: sum over tie groups of (recall gain) x precision
    (ties share one precision, as in scikit-learn's ``average_precision_score``)."""
    scores, labels = _check(scores, labels)
    _, _, tp, predicted = _cuts(scores, labels)
    recall_gain = np.diff(tp, prepend=0) / labels.sum()
    return float(np.sum(recall_gain * (tp / predicted)))


def binary_metrics(scores, labels, *, distance: bool = False) -> dict[str, float]:
    """Every pair-classification metric of ``scores`` (higher = more similar) against ``labels``.

    ``distance``: the scores are negated distances; the thresholds are reported as distances.
    Keys: accuracy, accuracy_threshold, f1, precision, recall, f1_threshold, ap.
    """
    acc, acc_t = best_accuracy(scores, labels)
    f1, precision, recall, f1_t = best_f1(scores, labels)
    sign = -1.0 if distance else 1.0
    return {
        "accuracy": acc,
        "accuracy_threshold": sign * acc_t,
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "f1_threshold": sign * f1_t,
        "ap": average_precision(scores, labels),
    }


# ---------------------------------------------------------------- the evaluator


@functools.partial(jax.jit, static_argnames="metric")
def _pair_scores(a, b, metric):
    return similarity.pairwise(a, b, metric)


@dataclasses.dataclass
class PairClassificationEvaluator:
    """Pair classification of an ``Encoder`` on labelled pairs (see the module docstring).

    Args:
      pairs: ``LabelledPair``s with both labels present (``read_labelled_pairs``, ``read_sick_binary``).
      name: prefix of every reported key, e.g. ``"sick_trial_entailment"``.
      metrics: similarities to report (packed-bit embeddings get ``("hamming",)``).
      batch_size: encode batch size.
    """

    pairs: Sequence[LabelledPair]
    name: str = "pair_classification"
    metrics: Sequence[str] = DEFAULT_METRICS
    batch_size: int = 128
    main_metric: ClassVar[str] = "max_ap"

    def __post_init__(self):
        self.pairs = list(self.pairs)
        if not self.pairs:
            raise ValueError(f"{self.name}: no pairs to evaluate")
        labels = {p.label for p in self.pairs}
        if labels != {0, 1}:
            raise ValueError(f"{self.name}: labels must be 0/1 with both present, found {sorted(labels)}")
        unknown = [m for m in self.metrics if m not in similarity.METRICS + ("hamming",)]
        if unknown or not self.metrics:
            raise ValueError(f"{self.name}: metrics must be a non-empty subset of {similarity.METRICS}, got {self.metrics}")

    @property
    def labels(self) -> np.ndarray:
        return np.array([p.label for p in self.pairs], np.int64)

    def embed(self, encoder, *, num_layers: int | None = None) -> base.Embeddings:
        """``{"a": (N, D), "b": (N, D)}``; each distinct text is encoded once."""
        texts = list(dict.fromkeys([p.text_a for p in self.pairs] + [p.text_b for p in self.pairs]))
        z = base.encode(encoder, texts, batch_size=self.batch_size, num_layers=num_layers)
        row = {t: i for i, t in enumerate(texts)}
        return {"a": z[[row[p.text_a] for p in self.pairs]], "b": z[[row[p.text_b] for p in self.pairs]]}

    def score(self, embeddings: base.Embeddings, *, reference: base.Embeddings | None = None) -> dict[str, float]:
        """The metrics of ``{"a", "b"}`` embeddings; ``reference`` is unused (no rescoring step)."""
        a, b = base.as_scorable(embeddings["a"]), base.as_scorable(embeddings["b"])
        labels = self.labels
        out: dict[str, float] = {}
        metrics = base.metrics_for(a, self.metrics)
        for metric in metrics:
            scores = np.asarray(_pair_scores(a, b, metric))
            for key, value in binary_metrics(scores, labels, distance=metric in DISTANCES).items():
                out[f"{metric}_{key}"] = value
        for key in ("ap", "accuracy", "f1"):
            out[f"max_{key}"] = max(out[f"{m}_{key}"] for m in metrics)
        return out

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        """Yields ``(f"{name}/{key}", value)`` for every metric."""
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))


SPEC_KEYS = ("path", "format", "columns", "header", "skip_bad", "reader", "metrics", "batch_size")


def from_spec(name: str, spec: Mapping) -> PairClassificationEvaluator:
    """A ``PairClassificationEvaluator`` from a config entry.

    ``spec``: ``{"path": FILE}`` plus optional ``format``, ``columns``, ``header``, ``skip_bad``
    (as ``read_labelled_pairs``), ``reader`` (``"labelled"``, the default, or ``"sick"``: a SICK
    file as entailment vs the rest), ``metrics`` and ``batch_size``.
    """
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"pair classification {name!r}: unknown keys {unknown}; allowed: {list(SPEC_KEYS)}")
    if "path" not in spec:
        raise ValueError(f"pair classification {name!r}: 'path' is required; allowed keys: {list(SPEC_KEYS)}")
    reader = spec.get("reader", "labelled")
    path = Path(spec["path"])
    if reader == "sick":
        extra = sorted(set(spec) & {"format", "columns", "header"})
        if extra:
            raise ValueError(f"pair classification {name!r}: {extra} do not apply to reader 'sick'")
        pairs = read_sick_binary(path, skip_bad=spec.get("skip_bad", False))
    elif reader == "labelled":
        pairs = read_labelled_pairs(path, format=spec.get("format"), columns=spec.get("columns"),
                                    header=spec.get("header"), skip_bad=spec.get("skip_bad", False))
    else:
        raise ValueError(f"pair classification {name!r}: reader must be 'labelled' or 'sick', got {reader!r}")
    kw = {k: spec[k] for k in ("metrics", "batch_size") if k in spec}
    if "metrics" in kw:
        kw["metrics"] = tuple(kw["metrics"])
    return PairClassificationEvaluator(pairs, name=name, **kw)
