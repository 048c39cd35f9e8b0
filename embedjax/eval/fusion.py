"""Retrieval by several models at once, their scores fused (BGE-M3's hybrid retrieval, arXiv:2402.03216).

Each member (a dense ``Encoder``, a SPLADE ``SparseEncoder``, a ColBERT ``ColbertEncoder``)
retrieves alone with its own evaluator and is reported alone. The union of the members' top
``depth`` documents per query is then scored by every member and ranked two ways:

* ``sum``: the weighted sum of the members' scores, ``sum_m w_m * s_m(q, d)`` (BGE-M3's
  ``w_dense * s_dense + w_lex * s_lex + w_mul * s_mul``; the scales differ: cosine for dense,
  sparse dot products, MaxSim sums over query tokens, so the weights carry them);
* ``rrf``: reciprocal-rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009),
  ``sum_m 1 / (rrf_k + rank_m(d))`` over the members that ranked ``d`` in their top ``depth``.

Reported keys: ``<member>/<metric>`` per member, ``sum/<metric>`` and ``rrf/<metric>`` (each under
the evaluator's ``name``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from embedjax.data.retrieval_readers import BeirData
from embedjax.eval import base, ranking_metrics
from embedjax.eval.retrieval import DEFAULT_K, RetrievalEvaluator


def _member_evaluator(model, data: BeirData, name: str, k_values, batch_size: int):
    """The evaluator that scores ``model`` alone, and its kind."""
    from embedjax.colbert_model import ColbertEncoder
    from embedjax.eval.late_retrieval import LateRetrievalEvaluator
    from embedjax.eval.sparse_retrieval import SparseRetrievalEvaluator
    from embedjax.sparse_model import SparseEncoder

    kind = getattr(model, "retrieval_kind", None)  # a head of a multi-head model (embedjax.m3_model's views)
    if isinstance(model, SparseEncoder) or kind == "sparse":
        return "sparse", SparseRetrievalEvaluator(data, name=name, k_values=k_values, batch_size=batch_size)
    if isinstance(model, ColbertEncoder) or kind == "late":
        return "late", LateRetrievalEvaluator(data, name=name, k_values=k_values, batch_size=batch_size)
    return "dense", RetrievalEvaluator(data, name=name, k_values=k_values, batch_size=batch_size)


def _pair_scores(kind: str, evaluator, embeddings, query: int, documents: Sequence[int]) -> np.ndarray:
    """One member's scores of query ``query`` against ``documents`` (corpus indices)."""
    if kind == "sparse":
        q = embeddings["queries"][query]
        return np.asarray((embeddings["corpus"][list(documents)] @ q.T).todense(), np.float64)[:, 0]
    if kind == "late":
        from embedjax.eval.late_retrieval import maxsim_scores

        return maxsim_scores(embeddings["queries"][query], [embeddings["corpus"][j] for j in documents])
    from embedjax import similarity

    q = base.as_scorable(embeddings["queries"][query][None])
    docs = base.as_scorable(embeddings["corpus"][list(documents)])
    return np.asarray(similarity.matrix(q, docs, evaluator.metric), np.float64)[0]


@dataclasses.dataclass
class FusedRetrievalEvaluator:
    """BEIR-style retrieval by several models fused; ``run(models)`` yields ``(f"{name}/{key}", value)``.

    Args:
      data: a ``BeirData`` (``read_beir``).
      name: prefix of every reported key.
      weights: ``{member: weight}`` of the ``sum`` fusion (default 1 each).
      k_values: cut-offs to report.
      depth: each member's candidates per query (the fusions rank their union).
      rrf_k: reciprocal-rank fusion's constant (60, as in the paper).
      batch_size: encode batch size.
    """

    data: BeirData
    name: str = "fused"
    weights: Mapping[str, float] | None = None
    k_values: Sequence[int] = DEFAULT_K
    depth: int = 100
    rrf_k: float = 60.0
    batch_size: int = 32

    def __post_init__(self):
        self._queries = RetrievalEvaluator(self.data, name=self.name, k_values=self.k_values)
        self.k_values = self._queries.k_values
        if self.depth < max(self.k_values):
            raise ValueError(f"depth {self.depth} must be >= the largest cut-off {max(self.k_values)}")
        if self.rrf_k < 0:
            raise ValueError(f"rrf_k must be >= 0, got {self.rrf_k}")

    def score(self, models: Mapping[str, Any]) -> dict[str, float]:
        """``{"<member>/ndcg@10": ..., "sum/ndcg@10": ..., "rrf/ndcg@10": ...}``: means over the scored queries."""
        if len(models) < 2:
            raise ValueError(f"fusion needs at least two models, got {sorted(models)}")
        weights = {m: 1.0 for m in models} if self.weights is None else dict(self.weights)
        if set(weights) != set(models):
            raise ValueError(f"weights name {sorted(weights)}, the models are {sorted(models)}")
        position = {doc_id: i for i, doc_id in enumerate(self.data.corpus_ids)}
        members, ranked = {}, {}
        for member, model in models.items():
            kind, evaluator = _member_evaluator(model, self.data, member, self.k_values, self.batch_size)
            embeddings = evaluator.embed(model)
            members[member] = (kind, evaluator, embeddings)
            ranked[member] = evaluator.retrieve(embeddings, depth=self.depth)
        out = {}
        for member, lists in ranked.items():
            out.update({f"{member}/{k}": v for k, v in self._metrics(lists).items()})
        fused_sum, fused_rrf = [], []
        for q in range(len(self._queries.query_ids)):
            union = list(dict.fromkeys(d for lists in ranked.values() for d in lists[q]))
            indices = [position[d] for d in union]
            total = np.zeros(len(union))
            for member, (kind, evaluator, embeddings) in members.items():
                total += weights[member] * _pair_scores(kind, evaluator, embeddings, q, indices)
            rrf = np.zeros(len(union))
            slot = {d: i for i, d in enumerate(union)}
            for lists in ranked.values():
                for rank, d in enumerate(lists[q], start=1):
                    rrf[slot[d]] += 1.0 / (self.rrf_k + rank)
            fused_sum.append([union[i] for i in np.argsort(-total, kind="stable")])
            fused_rrf.append([union[i] for i in np.argsort(-rrf, kind="stable")])
        out.update({f"sum/{k}": v for k, v in self._metrics(fused_sum).items()})
        out.update({f"rrf/{k}": v for k, v in self._metrics(fused_rrf).items()})
        return out

    def _metrics(self, ranked: list[list[str]]) -> dict[str, float]:
        qrels = self._queries._qrels
        ideal, n_relevant = ranking_metrics.ideal_relevance(qrels)
        rels = ranking_metrics.ranked_relevance(ranked, qrels, max(self.k_values))
        return ranking_metrics.retrieval_scores(rels, ideal, n_relevant, self.k_values)

    def run(self, models: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(models))

    def __call__(self, models: Mapping[str, Any]) -> dict[str, float]:
        return dict(self.run(models))


@dataclasses.dataclass
class M3RetrievalEvaluator:
    """A three-head model's (``embedjax.m3_model.M3Encoder``) retrieval: its dense, lexical and
    multi-vector heads alone and fused (``FusedRetrievalEvaluator``), BGE-M3's weights (1, 0.3, 1) by
    default; ``run(model)`` yields ``(f"{name}/{key}", value)``, e.g. ``dev/sum/ndcg@10``."""

    data: BeirData
    name: str = "m3_retrieval"
    weights: Sequence[float] = (1.0, 0.3, 1.0)
    k_values: Sequence[int] = DEFAULT_K
    depth: int = 100
    rrf_k: float = 60.0
    batch_size: int = 32

    def __post_init__(self):
        if len(self.weights) != 3:
            raise ValueError(f"weights are (dense, lexical, multi-vector), got {self.weights}")
        self._fused = FusedRetrievalEvaluator(self.data, name=self.name, weights=dict(zip(M3_HEADS, self.weights)),
                                              k_values=self.k_values, depth=self.depth, rrf_k=self.rrf_k,
                                              batch_size=self.batch_size)

    @property
    def main_metric(self) -> str:
        return f"sum/{self._fused._queries.main_metric}"

    def run(self, model) -> Iterator[tuple[str, float]]:
        yield from self._fused.run({"dense": model.dense(), "lexical": model.lexical(),
                                    "multi_vector": model.multi_vector()})

    def __call__(self, model) -> dict[str, float]:
        return dict(self.run(model))


M3_HEADS = ("dense", "lexical", "multi_vector")
M3_OPTIONS = ("path", "split", "weights", "k_values", "depth", "rrf_k", "batch_size")


def m3_from_spec(name: str, spec: Mapping[str, Any]) -> M3RetrievalEvaluator:
    """An ``M3RetrievalEvaluator`` from ``{"path": BEIR_DIR, "split": "dev", **options}``."""
    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval.retrieval import check_options

    check_options(name, spec, M3_OPTIONS)
    options = {k: tuple(v) if k in ("weights", "k_values") else v for k, v in spec.items()
               if k not in ("path", "split")}
    return M3RetrievalEvaluator(read_beir(spec["path"], spec.get("split", "test")), name=name, **options)


__all__ = ["FusedRetrievalEvaluator", "M3RetrievalEvaluator", "m3_from_spec"]
