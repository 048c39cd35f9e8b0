"""Semantic textual similarity (STS): Spearman / Pearson (x100) between similarities and gold scores.

Follows the evaluator contract (``embedjax.eval.base``): ``embed`` encodes every distinct text
once with the checkpoint's own normalisation (``base.encode``, like ``SentenceTransformer.encode``)
and ``score`` scores those embeddings **as given**: no extra normalisation, as
sentence-transformers' ``EmbeddingSimilarityEvaluator`` (so ``dot`` and the distances depend on
whether the checkpoint normalises; ``cosine`` does not).

Similarities (``embedjax.similarity.pairwise``, higher = more similar): ``cosine``, ``dot``,
``euclidean`` and ``manhattan`` (negated distances); packed sign bits are scored by ``hamming``.

Two protocols, labelled in the keys:

* ``"pooled"``: one correlation over every pair: ``{metric}_spearman``, ``{metric}_pearson``.
  The "all" setting as SimCSE (arXiv:2104.08821, appendix B) and AnglE report STS12-16: every
  subset of a year pooled into one set; STS-B test and SICK-R as they are; the 7-task average.
  MTEB (arXiv:2210.07316) pools too: its STS12-16 test splits hold every subset of the year
  (e.g. 3108 pairs for STS12), though its copies of the data differ from SentEval's.
* ``"subset_mean"``: one correlation per subset, averaged (unweighted):
  ``{metric}_spearman_subset_mean``, ``{metric}_pearson_subset_mean``; the "mean" that the
  original SentEval toolkit (arXiv:1803.05449) reports for STS12-16. Reported only when the pairs
  carry more than one subset (``embedjax.data.sts_readers``). Not comparable with pooled numbers:
  per-subset correlations ignore how the subsets' score ranges line up.

With ``per_subset=True`` each subset's own correlations come too: ``{metric}_spearman[{subset}]``.
``layers`` / ``dims`` evaluate a (depth x width) grid through ``embedjax.eval.grid.GridEvaluator``
(keys ``{key}@L{k}@{d}``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from scipy import stats

from embedjax import similarity
from embedjax.data.readers import ScoredPair
from embedjax.eval import base

log = logging.getLogger(__name__)
DEFAULT_METRICS = ("cosine", "dot", "euclidean", "manhattan")
PROTOCOLS = ("pooled", "subset_mean", "both")
SPEC_KEYS = ("path", "format", "protocol", "metrics", "batch_size", "per_subset")
SPEC_FORMATS = ("stsb", "sick", "senteval", "scored")


@functools.partial(jax.jit, static_argnames="metric")
def _pairwise(a, b, metric):
    return similarity.pairwise(a, b, metric)


def pair_scores(za, zb, metric: str) -> np.ndarray:
    """``similarity.pairwise(za, zb, metric)`` as float64, on the embeddings as given."""
    za, zb = base.as_scorable(za), base.as_scorable(zb)
    if za.shape != zb.shape:
        raise ValueError(f"the two sides of the pairs have shapes {za.shape} and {zb.shape}; expected equal")
    return np.asarray(_pairwise(za, zb, metric), np.float64)


def _correlate(scores: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    """(Spearman, Pearson) x100."""
    return float(100 * stats.spearmanr(scores, gold).statistic), float(100 * stats.pearsonr(scores, gold).statistic)


def correlations(za, zb, gold, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """``{'{metric}_spearman': ..., '{metric}_pearson': ...}`` (x100) over every pair (pooled).

    The embeddings are scored as given (no normalisation here); packed sign bits
    (uint8) are scored by ``hamming`` whatever ``metrics`` says.
    """
    gold = np.asarray(gold, np.float64)
    out = {}
    for metric in base.metrics_for(za, metrics):
        out[f"{metric}_spearman"], out[f"{metric}_pearson"] = _correlate(pair_scores(za, zb, metric), gold)
    return out


def subset_correlations(za, zb, gold, subsets: Sequence[str], metrics: Sequence[str] = DEFAULT_METRICS,
                        *, per_subset: bool = False) -> dict[str, float]:
    """The per-subset protocol: ``{metric}_{spearman,pearson}_subset_mean`` (x100), the unweighted
    mean over subsets of each subset's correlation; with ``per_subset`` also
    ``{metric}_{spearman,pearson}[{subset}]`` (subsets in order of first appearance)."""
    gold, subsets = np.asarray(gold, np.float64), np.asarray(list(subsets), dtype=object)
    names = list(dict.fromkeys(subsets.tolist()))
    out = {}
    for metric in base.metrics_for(za, metrics):
        scores = pair_scores(za, zb, metric)
        each = {s: _correlate(scores[subsets == s], gold[subsets == s]) for s in names}
        out[f"{metric}_spearman_subset_mean"] = float(np.mean([v[0] for v in each.values()]))
        out[f"{metric}_pearson_subset_mean"] = float(np.mean([v[1] for v in each.values()]))
        if per_subset:
            for s, (rho, r) in each.items():
                out[f"{metric}_spearman[{s}]"], out[f"{metric}_pearson[{s}]"] = rho, r
    return out


@dataclasses.dataclass
class STSEvaluator:
    """STS evaluation of scored pairs (the evaluator contract: ``embed``, ``score``, ``run``).

    Args:
      pairs: ``ScoredPair``s (e.g. ``read_stsb``), or ``STSPair``s that carry a ``subset``
        (``embedjax.data.sts_readers``).
      name: prefix of every reported key, e.g. ``"stsb_dev"``.
      metrics: similarities to report (the first one's pooled Spearman is ``main_metric``).
      dims / layers: a (layers x dims) grid (``GridEvaluator``), keys ``{key}@L{k}@{d}``;
        ``None`` = the full depth / width (no suffix).
      batch_size: encode batch size.
      protocol: ``"pooled"``, ``"subset_mean"`` or ``"both"`` (the default; ``subset_mean``
        is then reported only when the pairs have more than one subset).
      per_subset: report every subset's own correlations as well.
      subsets: one subset name per pair, overriding the pairs' ``subset`` attribute.
    """

    pairs: Sequence[ScoredPair]
    name: str = "sts"
    metrics: Sequence[str] = DEFAULT_METRICS
    dims: Sequence[int | None] = (None,)
    layers: Sequence[int | None] = (None,)
    batch_size: int = 128
    protocol: str = "both"
    per_subset: bool = False
    subsets: Sequence[str] | None = None

    def __post_init__(self):
        self.pairs = list(self.pairs)
        self.metrics = tuple(self.metrics)
        if not self.pairs:
            raise ValueError(f"STSEvaluator {self.name!r}: no pairs to evaluate")
        if len(self.pairs) < 2:
            raise ValueError(f"STSEvaluator {self.name!r}: a correlation needs at least 2 pairs, got 1")
        if not self.metrics:
            raise ValueError(f"STSEvaluator {self.name!r}: metrics is empty; choose from {similarity.METRICS}")
        unknown = [m for m in self.metrics if m not in similarity.METRICS]
        if unknown:
            raise ValueError(f"STSEvaluator {self.name!r}: unknown metrics {unknown}; choose from {similarity.METRICS}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"STSEvaluator {self.name!r}: protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.subsets is None:
            self.subsets = [getattr(p, "subset", "") for p in self.pairs]
        self.subsets = [str(s) for s in self.subsets]
        if len(self.subsets) != len(self.pairs):
            raise ValueError(f"STSEvaluator {self.name!r}: {len(self.subsets)} subsets for {len(self.pairs)} pairs")
        n_subsets = len(set(self.subsets))
        if self.protocol == "subset_mean" and n_subsets < 2:
            raise ValueError(f"STSEvaluator {self.name!r}: protocol 'subset_mean' needs pairs from more than one "
                             f"subset, found {n_subsets} (use 'pooled')")
        small = sorted(s for s in set(self.subsets) if self.subsets.count(s) < 2)
        self._subsets_scored = n_subsets > 1 and (self.protocol != "pooled" or self.per_subset)
        if self._subsets_scored and small:
            if self.protocol == "subset_mean" or self.per_subset:
                raise ValueError(f"STSEvaluator {self.name!r}: subsets {small} have fewer than 2 pairs "
                                 f"(a per-subset correlation needs 2)")
            # "both" (the default) on a small dev file: the pooled protocol alone, said once
            log.warning("STSEvaluator %r: subsets %s have fewer than 2 pairs; reporting the pooled protocol only",
                        self.name, small)
            self._subsets_scored = False
        self.layers, self.dims = tuple(self.layers), tuple(self.dims)

    # ------------------------------------------------------------------ the contract

    @property
    def main_metric(self) -> str:
        """The first metric's pooled Spearman (``cosine_spearman``), or its subset mean."""
        suffix = "_subset_mean" if self.protocol == "subset_mean" else ""
        return f"{self.metrics[0]}_spearman{suffix}"

    def _grid(self):
        """The ``GridEvaluator`` over a plain copy of this evaluator, or None without a grid."""
        if self.layers == (None,) and self.dims == (None,):
            return None
        from embedjax.eval.grid import GridEvaluator

        plain = dataclasses.replace(self, layers=(None,), dims=(None,))
        return GridEvaluator(plain, layers=self.layers, dims=self.dims, mean=False)

    def embed(self, encoder, *, num_layers: int | None = None) -> base.Embeddings:
        """``{"a": (N, D), "b": (N, D)}``: both sides of every pair, each distinct text encoded once."""
        grid = self._grid()
        if grid is not None:
            return grid.embed(encoder, num_layers=num_layers)
        texts = list(dict.fromkeys([p.text_a for p in self.pairs] + [p.text_b for p in self.pairs]))
        row = {t: i for i, t in enumerate(texts)}
        z = base.encode(encoder, texts, batch_size=self.batch_size, num_layers=num_layers)
        return {"a": z[[row[p.text_a] for p in self.pairs]], "b": z[[row[p.text_b] for p in self.pairs]]}

    def score(self, embeddings: base.Embeddings, *, reference: base.Embeddings | None = None) -> dict[str, float]:
        """The correlations (x100) of ``embeddings["a"]`` vs ``["b"]`` with the gold scores, keys without
        the prefix. ``reference`` is accepted for the contract and unused (STS has no rescoring)."""
        grid = self._grid()
        if grid is not None:
            return grid.score(embeddings, reference=reference)
        missing = {"a", "b"} - set(embeddings)
        if missing:
            raise ValueError(f"STSEvaluator {self.name!r}: embeddings lack {sorted(missing)} (expected 'a' and 'b')")
        za, zb = embeddings["a"], embeddings["b"]
        if len(za) != len(self.pairs):
            raise ValueError(f"STSEvaluator {self.name!r}: {len(za)} embeddings for {len(self.pairs)} pairs")
        gold = [p.score for p in self.pairs]
        out = {}
        if self.protocol in ("pooled", "both"):
            out.update(correlations(za, zb, gold, self.metrics))
        if self._subsets_scored:
            scores = subset_correlations(za, zb, gold, self.subsets, self.metrics, per_subset=self.per_subset)
            if self.protocol == "pooled":  # only the per-subset values were asked for
                scores = {k: v for k, v in scores.items() if not k.endswith("_subset_mean")}
            out.update(scores)
        return out

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        """Yields ``(f"{name}/{key}", value)``, e.g. ``dev/cosine_spearman@L3@128``."""
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))

    # ------------------------------------------------------------------ from a config

    @classmethod
    def from_spec(cls, name: str, spec: Mapping) -> "STSEvaluator":
        """An evaluator from a config mapping: ``{"path": FILE_OR_DIR, "format": "stsb" | "sick" |
        "senteval" | "scored", "protocol"?, "metrics"?, "batch_size"?, "per_subset"?}``.

        ``scored`` reads a generic file with ``read_scored_pairs`` (format from the suffix,
        columns text_a, text_b, score). Unknown keys raise ValueError naming the allowed ones.
        """
        from embedjax.data import read_scored_pairs
        from embedjax.data.sts_readers import read_senteval_sts, read_sick_sts, read_stsb_sts

        spec = dict(spec)
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"STS spec {name!r}: unknown keys {unknown}; allowed: {list(SPEC_KEYS)}")
        for key in ("path", "format"):
            if key not in spec:
                raise ValueError(f"STS spec {name!r}: missing {key!r} (required: 'path' and 'format' one of "
                                 f"{SPEC_FORMATS})")
        readers = {"stsb": read_stsb_sts, "sick": read_sick_sts, "senteval": read_senteval_sts,
                   "scored": read_scored_pairs}
        fmt = spec.pop("format")
        if fmt not in readers:
            raise ValueError(f"STS spec {name!r}: format must be one of {SPEC_FORMATS}, got {fmt!r}")
        pairs = readers[fmt](Path(spec.pop("path")))
        return cls(pairs, name=name, **spec)


def from_spec(name: str, spec: Mapping) -> STSEvaluator:
    """``STSEvaluator.from_spec``."""
    return STSEvaluator.from_spec(name, spec)
