"""Embedding-space diagnostics: what the geometry of a model's embeddings looks like, as metrics.

Pure functions of an ``(N, D)`` embedding matrix (and, for alignment, of positive pairs):

* ``alignment(a, b)``: mean ``||f(a_i) - f(b_i)||^alpha`` over positive pairs of unit vectors
  (Wang & Isola, arXiv:2005.10242; lower: positives closer);
* ``uniformity(x)``: ``log mean_{i<j} exp(-t ||f(x_i) - f(x_j)||^2)`` over distinct pairs of unit
  vectors (same paper; lower: spread more evenly over the sphere);
* ``anisotropy(x)``: the mean cosine of every distinct pair (Ethayarajh, arXiv:1909.00512, samples
  random pairs; this is the exact mean, from ``||sum u_i||^2``);
* ``hubness(x, k)``: the skewness of the k-occurrence distribution, how often each point is among
  the others' k nearest neighbours by cosine (Radovanovic et al., JMLR 2010; scikit-hubness's
  ``k_skewness``); high: a few hubs are everyone's neighbours;
* ``intrinsic_dimension(x)``: the TwoNN estimator (Facco et al., Sci. Rep. 2017, arXiv:1803.06992),
  maximum likelihood form ``N / sum_i log(r2_i / r1_i)`` from each point's first and second
  Euclidean neighbour distances (points with a duplicate, ``r1 = 0``, are left out);
* ``effective_rank(x)``: ``exp`` of the entropy of the normalised singular values of ``x`` as given
  (Roy & Vetterli, EUSIPCO 2007; RankMe, arXiv:2210.02885).

The neighbour searches run on the jitted similarity core over every device
(``embedjax.eval.search.sharded_topk``). ``DiagnosticsEvaluator`` reports all of them for the
sentences of an STS file, alignment on its pairs scored at least ``positive_threshold`` (SimCSE's
analysis, arXiv:2104.08821: STS-B pairs above 4 of 5); ``"type": "diagnostics"`` in a config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from scipy import stats

from embedjax.data.readers import ScoredPair
from embedjax.eval import base

SPEC_KEYS = ("path", "format", "positive_threshold", "k", "batch_size")
SPEC_FORMATS = ("stsb", "sick", "senteval", "scored")


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check(x, least: int, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < least:
        raise ValueError(f"{what} needs an (N, D) embedding matrix with N >= {least}, got shape {x.shape}")
    return x


def alignment(a, b, *, alpha: float = 2.0) -> float:
    """Mean ``||u_i - v_i||^alpha`` of the unit-normalised positive pairs ``(a_i, b_i)``."""
    a, b = _check(a, 1, "alignment"), _check(b, 1, "alignment")
    if a.shape != b.shape:
        raise ValueError(f"alignment needs pairs of equal shape, got {a.shape} and {b.shape}")
    return float(np.mean(np.linalg.norm(_unit(a) - _unit(b), axis=-1) ** alpha))


def uniformity(x, *, t: float = 2.0, chunk_size: int = 2048) -> float:
    """``log mean_{i<j} exp(-t ||u_i - u_j||^2)`` of the unit-normalised rows (blocks of
    ``chunk_size`` rows: never an N x N matrix)."""
    u = _unit(_check(x, 2, "uniformity"))
    n = len(u)
    logs = []
    for start in range(0, n, chunk_size):
        block = u[start:start + chunk_size]
        squared = np.maximum(2.0 - 2.0 * block @ u.T, 0.0)  # ||u_i - u_j||^2 of unit vectors
        rows = np.arange(start, start + len(block))[:, None]
        upper = np.arange(n)[None, :] > rows  # each distinct pair once
        logs.append((-t * squared)[upper])
    values = np.concatenate(logs)
    peak = values.max()
    return float(peak + np.log(np.mean(np.exp(values - peak))))


def anisotropy(x) -> float:
    """The mean cosine over every distinct pair of rows: ``(||sum u_i||^2 - N) / (N (N - 1))``."""
    u = _unit(_check(x, 2, "anisotropy"))
    n = len(u)
    total = u.sum(axis=0)
    return float((total @ total - np.sum(u * u)) / (n * (n - 1)))


def neighbours(x, k: int, *, metric: str = "cosine", mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows: ``(scores, indices)``, both ``(N, k)``, best first
    (``metric``: "cosine", or "euclidean" for negated distances), the row itself left out."""
    from embedjax.eval.search import sharded_topk

    x = np.asarray(_check(x, k + 1, f"{k} neighbours"), np.float32)
    scores, indices = sharded_topk(x, x, k + 1, metric=metric, mesh=mesh)
    scores, indices = np.asarray(scores), np.asarray(indices)
    own = indices == np.arange(len(x))[:, None]
    # a row that is not among its own k + 1 (exact duplicates tie with it) drops its last candidate
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return scores[keep].reshape(len(x), k), indices[keep].reshape(len(x), k)


def hubness(x, *, k: int = 10, mesh=None) -> float:
    """Skewness (biased, scipy.stats.skew) of the k-occurrence counts: how often each row is among
    the other rows' ``k`` nearest neighbours by cosine."""
    _, indices = neighbours(x, k, mesh=mesh)
    counts = np.bincount(indices.ravel(), minlength=len(indices)).astype(np.float64)
    return float(stats.skew(counts))


def intrinsic_dimension(x, *, mesh=None) -> float:
    """TwoNN's maximum-likelihood estimate ``N / sum log(r2 / r1)`` (Euclidean distances to each
    row's first and second neighbours; rows with a duplicate, ``r1 = 0``, left out)."""
    _, indices = neighbours(x, 2, metric="euclidean", mesh=mesh)
    x = np.asarray(x, np.float64)  # the distances again in float64: the search's matmul form rounds close pairs
    r1, r2 = (np.linalg.norm(x - x[indices[:, j]], axis=-1) for j in (0, 1))
    kept = r1 > 0
    if kept.sum() < 2:
        raise ValueError("intrinsic_dimension needs at least 2 rows without a duplicate")
    return float(kept.sum() / np.sum(np.log(r2[kept] / r1[kept])))


def effective_rank(x) -> float:
    """``exp(-sum p_k log p_k)``, ``p = s / sum(s)`` over the singular values ``s`` of ``x`` as given."""
    s = np.linalg.svd(np.asarray(_check(x, 1, "effective_rank"), np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


@dataclasses.dataclass
class DiagnosticsEvaluator:
    """The diagnostics of a model's embeddings of ``pairs``' sentences (every distinct text once):
    ``alignment`` on the pairs scored at least ``positive_threshold``, the rest on the distinct
    sentences; ``k`` neighbours for hubness. Main metric: uniformity."""

    pairs: Sequence[ScoredPair]
    name: str = "diagnostics"
    positive_threshold: float = 4.0
    k: int = 10
    batch_size: int = 128

    main_metric = "uniformity"

    def __post_init__(self):
        self.texts = list(dict.fromkeys(t for p in self.pairs for t in (p.text_a, p.text_b)))
        row = {t: i for i, t in enumerate(self.texts)}
        positives = [p for p in self.pairs if p.score >= self.positive_threshold]
        if not positives:
            raise ValueError(f"{self.name}: no pair scores >= positive_threshold={self.positive_threshold} "
                             "(alignment needs positive pairs)")
        if len(self.texts) <= self.k + 1:
            raise ValueError(f"{self.name}: {len(self.texts)} distinct sentences; hubness with k={self.k} needs more")
        self.positive_rows = np.array([[row[p.text_a], row[p.text_b]] for p in positives])

    def embed(self, encoder, *, num_layers: int | None = None) -> base.Embeddings:
        return {"texts": base.encode(encoder, self.texts, batch_size=self.batch_size, num_layers=num_layers)}

    def score(self, embeddings: base.Embeddings, *, reference: base.Embeddings | None = None) -> dict[str, float]:
        del reference
        if base.is_binary(embeddings["texts"]):
            raise ValueError(f"{self.name}: diagnostics measure float embeddings, not packed sign bits "
                             "(leave 'binary' out of this evaluator's quantize)")
        x = np.asarray(embeddings["texts"], np.float32)
        a, b = x[self.positive_rows[:, 0]], x[self.positive_rows[:, 1]]
        return {"alignment": alignment(a, b), "uniformity": uniformity(x), "anisotropy": anisotropy(x),
                f"hubness@{self.k}": hubness(x, k=self.k), "intrinsic_dimension": intrinsic_dimension(x),
                "effective_rank": effective_rank(x), "positive_pairs": float(len(a)), "texts": float(len(x))}

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    @classmethod
    def from_spec(cls, name: str, spec: Mapping) -> "DiagnosticsEvaluator":
        """From a config mapping: ``{"path": FILE_OR_DIR, "format": "stsb" | "sick" | "senteval" |
        "scored", "positive_threshold"?, "k"?, "batch_size"?}`` (the STS evaluator's readers)."""
        from embedjax.data import read_scored_pairs
        from embedjax.data.sts_readers import read_senteval_sts, read_sick_sts, read_stsb_sts

        spec = dict(spec)
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"diagnostics spec {name!r}: unknown keys {unknown}; allowed: {list(SPEC_KEYS)}")
        readers = {"stsb": read_stsb_sts, "sick": read_sick_sts, "senteval": read_senteval_sts,
                   "scored": read_scored_pairs}
        if "path" not in spec or spec.get("format") not in readers:
            raise ValueError(f"diagnostics spec {name!r}: needs 'path' and 'format' one of {SPEC_FORMATS}")
        pairs = readers[spec.pop("format")](Path(spec.pop("path")))
        return cls(pairs, name=name, **spec)


def from_spec(name: str, spec: Mapping) -> DiagnosticsEvaluator:
    """``DiagnosticsEvaluator.from_spec``."""
    return DiagnosticsEvaluator.from_spec(name, spec)
