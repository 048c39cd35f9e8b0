"""Retrieval evaluation of a ColBERT model (``embedjax.colbert_model.ColbertEncoder``): BEIR data,
token vectors, exact MaxSim search with the corpus sharded over every device
(``embedjax.eval.search.sharded_maxsim_topk``).

The same conventions and metrics as ``embedjax.eval.retrieval`` (the same scored queries,
self-hits removed, graded nDCG / MRR / recall / precision / MAP / accuracy at every k), plus
``document_tokens``: the mean number of token vectors a document keeps in the index.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from embedjax.data.retrieval_readers import BeirData, read_beir
from embedjax.eval import base, ranking_metrics, search
from embedjax.eval.retrieval import DEFAULT_K, RetrievalEvaluator, check_options, drop_self_hits


@dataclasses.dataclass
class LateRetrievalEvaluator:
    """BEIR-style retrieval of a ``ColbertEncoder``; ``run(encoder)`` yields ``(f"{name}/{key}", value)``.

    Args:
      data: a ``BeirData`` (``read_beir``).
      name: prefix of every reported key.
      k_values: cut-offs to report.
      batch_size: encode batch size.
      chunk_size / query_chunk_size: documents and queries scored at once per device
        (``sharded_maxsim_topk``: the peak is one (queries, documents, Tq, Td) block).
    """

    data: BeirData
    name: str = "colbert_retrieval"
    k_values: Sequence[int] = DEFAULT_K
    batch_size: int = 32
    chunk_size: int = 64
    query_chunk_size: int = 64

    def __post_init__(self):
        # the dense evaluator holds the scored queries and their qrels: one definition of both
        self._queries = RetrievalEvaluator(self.data, name=self.name, k_values=self.k_values,
                                           batch_size=self.batch_size)
        self.k_values = self._queries.k_values
        for field in ("chunk_size", "query_chunk_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")

    @property
    def main_metric(self) -> str:
        return self._queries.main_metric

    def embed(self, encoder, *, num_layers: int | None = None) -> dict[str, list]:
        """``{"queries": [(Tq, D)], "corpus": [(n_i, D)]}``: each text's token vectors."""
        if num_layers is not None:
            raise ValueError("a ColBERT model has no layer grid: num_layers must be None")
        return {"queries": encoder.encode_queries(list(self._queries.query_texts), batch_size=self.batch_size),
                "corpus": encoder.encode_documents(list(self.data.corpus_texts), batch_size=self.batch_size)}

    def retrieve(self, embeddings: Mapping[str, list], *, depth: int | None = None) -> list[list[str]]:
        """Each scored query's ranked corpus ids (self-hits removed), ``depth`` (default
        ``max(k_values)``) deep at most."""
        ev, corpus = self._queries, embeddings["corpus"]
        if len(corpus) != len(self.data.corpus_ids) or len(embeddings["queries"]) != len(ev.query_ids):
            raise ValueError(f"expected {len(ev.query_ids)} query and {len(self.data.corpus_ids)} corpus texts, got "
                             f"{len(embeddings['queries'])} and {len(corpus)}")
        depth = min(depth or max(self.k_values), len(corpus))
        wanted = min(depth + ev._self_hits, len(corpus))  # one more: the query's own document may be dropped
        _, indices = search.sharded_maxsim_topk(embeddings["queries"], corpus, wanted, chunk_size=self.chunk_size,
                                                query_chunk_size=self.query_chunk_size)
        return drop_self_hits(indices, self.data.corpus_ids, ev.query_ids, depth)

    def score(self, embeddings: Mapping[str, list], *, reference=None) -> dict[str, float]:
        """``{"ndcg@10": ..., "document_tokens": ...}``: means over the scored queries."""
        ranked = self.retrieve(embeddings)
        qrels = self._queries._qrels
        rels = ranking_metrics.ranked_relevance(ranked, qrels, max(self.k_values))
        ideal, n_relevant = ranking_metrics.ideal_relevance(qrels)
        return {**ranking_metrics.retrieval_scores(rels, ideal, n_relevant, self.k_values),
                "document_tokens": float(np.mean([len(d) for d in embeddings["corpus"]]))}

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))


OPTIONS = ("path", "split", "k_values", "batch_size", "chunk_size", "query_chunk_size")


def from_spec(name: str, spec: Mapping[str, Any]) -> LateRetrievalEvaluator:
    """A ``LateRetrievalEvaluator`` from ``{"path": BEIR_DIR, "split": "dev", **options}``."""
    check_options(name, spec, OPTIONS)
    options = {k: v for k, v in spec.items() if k not in ("path", "split")}
    if "k_values" in options:
        options["k_values"] = tuple(options["k_values"])
    return LateRetrievalEvaluator(read_beir(spec["path"], spec.get("split", "test")), name=name, **options)
