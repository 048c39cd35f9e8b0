"""Retrieval evaluation of a ColBERT model (``embedjax.colbert_model.ColbertEncoder``): BEIR data,
token vectors, exact MaxSim search with the corpus sharded over every device
(``embedjax.eval.search.sharded_maxsim_topk``).

The same conventions and metrics as ``embedjax.eval.retrieval`` (the same scored queries,
self-hits removed, graded nDCG / MRR / recall / precision / MAP / accuracy at every k), plus
``document_tokens``: the mean number of token vectors a document keeps in the index
(``pool_factor`` > 1 shrinks it: ``colbert.pool_tokens``).

With ``first_stage`` (a dense model) the ColBERT model reranks that model's top
``rerank_depth`` documents per query instead of searching the whole corpus: only those documents
are encoded, and ``first_stage/<metric>`` reports the first stage's own ranking beside it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
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
      pool_factor: documents' token vectors clustered about this many times fewer (1: off).
      first_stage: a dense model (an ``Encoder``, or a path ``load_pretrained`` reads) whose top
        ``rerank_depth`` documents per query the ColBERT model reranks; None: exact search.
    """

    data: BeirData
    name: str = "colbert_retrieval"
    k_values: Sequence[int] = DEFAULT_K
    batch_size: int = 32
    chunk_size: int = 64
    query_chunk_size: int = 64
    pool_factor: int = 1
    first_stage: Any = None
    rerank_depth: int = 100

    def __post_init__(self):
        # the dense evaluator holds the scored queries and their qrels: one definition of both
        self._queries = RetrievalEvaluator(self.data, name=self.name, k_values=self.k_values,
                                           batch_size=self.batch_size)
        self.k_values = self._queries.k_values
        for field in ("chunk_size", "query_chunk_size", "pool_factor", "rerank_depth"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        self._candidates = None  # the first stage's ranking: computed once, the same for every model scored

    @property
    def main_metric(self) -> str:
        return self._queries.main_metric

    def embed(self, encoder, *, num_layers: int | None = None) -> dict[str, list]:
        """``{"queries": [(Tq, D)], "corpus": [(n_i, D)]}``: each text's token vectors."""
        if num_layers is not None:
            raise ValueError("a ColBERT model has no layer grid: num_layers must be None")
        queries = encoder.encode_queries(list(self._queries.query_texts), batch_size=self.batch_size)
        texts = list(self.data.corpus_texts)
        if self.first_stage is None:
            return {"queries": queries,
                    "corpus": encoder.encode_documents(texts, batch_size=self.batch_size, pool_factor=self.pool_factor)}
        position = {doc_id: i for i, doc_id in enumerate(self.data.corpus_ids)}
        needed = sorted({position[d] for ranked in self.first_stage_ranking() for d in ranked})
        vectors = encoder.encode_documents([texts[i] for i in needed], batch_size=self.batch_size,
                                           pool_factor=self.pool_factor)
        corpus: list = [None] * len(texts)  # only the candidates are encoded
        for i, v in zip(needed, vectors):
            corpus[i] = v
        return {"queries": queries, "corpus": corpus}

    def first_stage_ranking(self) -> list[list[str]]:
        """The first stage's top ``rerank_depth`` corpus ids per scored query (self-hits removed)."""
        if self._candidates is None:
            model = self.first_stage
            if isinstance(model, (str, os.PathLike)):
                from embedjax.model import load_pretrained

                model = load_pretrained(model)
            self._candidates = self._queries.retrieve(self._queries.embed(model), depth=self.rerank_depth)
        return self._candidates

    def retrieve(self, embeddings: Mapping[str, list], *, depth: int | None = None) -> list[list[str]]:
        """Each scored query's ranked corpus ids (self-hits removed), ``depth`` (default
        ``max(k_values)``) deep at most."""
        ev, corpus = self._queries, embeddings["corpus"]
        if len(corpus) != len(self.data.corpus_ids) or len(embeddings["queries"]) != len(ev.query_ids):
            raise ValueError(f"expected {len(ev.query_ids)} query and {len(self.data.corpus_ids)} corpus texts, got "
                             f"{len(embeddings['queries'])} and {len(corpus)}")
        depth = min(depth or max(self.k_values), len(corpus))
        if self.first_stage is not None:
            position = {doc_id: i for i, doc_id in enumerate(self.data.corpus_ids)}
            candidates = [[position[d] for d in ranked] for ranked in self.first_stage_ranking()]
            order = rerank_by_maxsim(embeddings["queries"], corpus, candidates)
            return [[self.data.corpus_ids[i] for i in row][:depth] for row in order]
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
        out = {**ranking_metrics.retrieval_scores(rels, ideal, n_relevant, self.k_values),
               "document_tokens": float(np.mean([len(d) for d in embeddings["corpus"] if d is not None]))}
        if self.first_stage is not None:
            first = ranking_metrics.ranked_relevance(self.first_stage_ranking(), qrels, max(self.k_values))
            out.update({f"first_stage/{k}": v for k, v in
                        ranking_metrics.retrieval_scores(first, ideal, n_relevant, self.k_values).items()})
        return out

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))


@jax.jit
def _maxsim_one_query(q, docs, mask):
    from embedjax import similarity

    return similarity.maxsim_pairwise(q[None], docs, None, mask)


def maxsim_scores(query: np.ndarray, documents: Sequence[np.ndarray]) -> np.ndarray:
    """Exact MaxSim of one query's token vectors (Tq, D) against each document's (n_j, D)."""
    if not len(documents):
        return np.zeros(0, np.float64)
    docs, mask = search.pad_tokens(list(documents))
    width = -(-docs.shape[1] // 64) * 64  # a few padded shapes, a few compilations
    docs, mask = (np.pad(x, ((0, 0), (0, width - x.shape[1])) + ((0, 0),) * (x.ndim - 2)) for x in (docs, mask))
    return np.asarray(_maxsim_one_query(np.asarray(query, np.float32), docs, mask), np.float64)


def rerank_by_maxsim(queries: Sequence[np.ndarray], corpus: Sequence[np.ndarray | None],
                     candidates: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each query's ``candidates`` (corpus indices) reordered by exact MaxSim (ties keep the given
    order): ``queries[i]`` (Tq, D) token vectors, ``corpus[j]`` (n_j, D)."""
    out = []
    for q, row in zip(queries, candidates):
        scores = maxsim_scores(q, [corpus[j] for j in row])
        out.append([row[i] for i in np.argsort(-scores, kind="stable")])
    return out


OPTIONS = ("path", "split", "k_values", "batch_size", "chunk_size", "query_chunk_size", "pool_factor",
           "first_stage", "rerank_depth")


def from_spec(name: str, spec: Mapping[str, Any]) -> LateRetrievalEvaluator:
    """A ``LateRetrievalEvaluator`` from ``{"path": BEIR_DIR, "split": "dev", **options}``."""
    check_options(name, spec, OPTIONS)
    options = {k: v for k, v in spec.items() if k not in ("path", "split")}
    if "k_values" in options:
        options["k_values"] = tuple(options["k_values"])
    return LateRetrievalEvaluator(read_beir(spec["path"], spec.get("split", "test")), name=name, **options)
