"""Retrieval evaluation of a SPLADE encoder (``embedjax.sparse_model.SparseEncoder``): BEIR data,
the vectors kept sparse, exact search on an inverted index (``embedjax.sparse_index``).

The same conventions and metrics as ``embedjax.eval.retrieval`` (the same scored queries,
self-hits removed, graded nDCG / MRR / recall / precision / MAP / accuracy at every k), scored
by the sparse dot product, plus what a sparse index costs:

* ``query_active_terms`` / ``document_active_terms``: mean non-zero terms per vector;
* ``avg_flops``: the expected number of multiplications of one query-document product,
  ``sum_j p_q(j) p_d(j)`` with ``p(j)`` the fraction of queries (documents) where term j is
  active (the FLOPS of arXiv:2004.05665; sentence-transformers' ``avg_flops``).

Every host encodes every text (SPLADE vectors are vocabulary-wide: they are not gathered).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from embedjax.data.retrieval_readers import BeirData, read_beir
from embedjax.eval import base, ranking_metrics
from embedjax.eval.retrieval import DEFAULT_K, RetrievalEvaluator, check_options, drop_self_hits, resolve_prompt
from embedjax.sparse_index import SparseIndex


def sparsity(queries: sp.csr_matrix, corpus: sp.csr_matrix) -> dict[str, float]:
    """Mean active terms of queries and documents, and the expected FLOPS of a query-document product."""
    q_active, d_active = np.diff(queries.indptr), np.diff(corpus.indptr)
    p_q = np.bincount(queries.indices, minlength=queries.shape[1]) / max(queries.shape[0], 1)
    p_d = np.bincount(corpus.indices, minlength=corpus.shape[1]) / max(corpus.shape[0], 1)
    return {"query_active_terms": float(q_active.mean()) if len(q_active) else 0.0,
            "document_active_terms": float(d_active.mean()) if len(d_active) else 0.0,
            "avg_flops": float(p_q @ p_d)}


@dataclasses.dataclass
class SparseRetrievalEvaluator:
    """BEIR-style retrieval of a ``SparseEncoder``; ``run(encoder)`` yields ``(f"{name}/{key}", value)``.

    Args:
      data: a ``BeirData`` (``read_beir``).
      name: prefix of every reported key.
      k_values: cut-offs to report.
      query_prompt / query_prompt_name, document_prompt / document_prompt_name: instructions,
        as ``RetrievalEvaluator`` (default: the checkpoint's "query" / "document" prompts).
      batch_size: encode batch size.
      corpus_chunk_size: documents encoded per call (a progress bar over the chunks).
      top_k: keep each vector's k largest terms (default: the encoder's own ``top_k``).
      query_block: queries scored against the index at once (bounds the dense score block).
    """

    data: BeirData
    name: str = "sparse_retrieval"
    k_values: Sequence[int] = DEFAULT_K
    query_prompt: str | None = None
    document_prompt: str | None = None
    query_prompt_name: str | None = None
    document_prompt_name: str | None = None
    batch_size: int = 32
    corpus_chunk_size: int = 50_000
    top_k: int | None = None
    query_block: int = 256

    def __post_init__(self):
        # the dense evaluator holds the scored queries and their qrels: one definition of both
        self._queries = RetrievalEvaluator(self.data, name=self.name, k_values=self.k_values,
                                           batch_size=self.batch_size, corpus_chunk_size=self.corpus_chunk_size)
        self.k_values = self._queries.k_values
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: keep every term), got {self.top_k}")
        if self.query_block < 1:
            raise ValueError(f"query_block must be >= 1, got {self.query_block}")

    @property
    def main_metric(self) -> str:
        return self._queries.main_metric

    def embed(self, encoder, *, num_layers: int | None = None) -> dict[str, sp.csr_matrix]:
        """``{"queries": CSR (Q, V), "corpus": CSR (N, V)}``; the corpus in ``corpus_chunk_size`` chunks."""
        from tqdm.auto import tqdm

        if num_layers is not None:
            raise ValueError("a sparse encoder has no layer grid: num_layers must be None")
        kw = dict(batch_size=self.batch_size, top_k=self.top_k)
        # an inference-free model's queries are its static weights, not the transformer's (encode_query)
        encode_queries = encoder.encode_query if getattr(encoder, "inference_free", False) else encoder.encode
        queries = encode_queries(list(self._queries.query_texts), **kw,
                                 prompt=resolve_prompt(encoder, self.query_prompt, self.query_prompt_name, "query"))
        doc_prompt = resolve_prompt(encoder, self.document_prompt, self.document_prompt_name, "document")
        texts, step = self.data.corpus_texts, self.corpus_chunk_size
        starts = range(0, len(texts), step)
        chunks = [encoder.encode(list(texts[s:s + step]), prompt=doc_prompt, **kw)
                  for s in tqdm(starts, desc=f"{self.name}: corpus chunks", disable=len(starts) < 2)]
        corpus = sp.vstack(chunks, format="csr") if chunks else sp.csr_matrix((0, queries.shape[1]), dtype=np.float32)
        return {"queries": queries, "corpus": corpus}

    def retrieve(self, embeddings: Mapping[str, sp.csr_matrix], *, depth: int | None = None) -> list[list[str]]:
        """Each scored query's ranked corpus ids (self-hits removed), ``depth`` (default
        ``max(k_values)``) deep at most."""
        queries, corpus = embeddings["queries"], embeddings["corpus"]
        ev = self._queries
        if corpus.shape[0] != len(self.data.corpus_ids) or queries.shape[0] != len(ev.query_ids):
            raise ValueError(f"expected {len(ev.query_ids)} query and {len(self.data.corpus_ids)} corpus vectors, got "
                             f"{queries.shape[0]} and {corpus.shape[0]}")
        n = corpus.shape[0]
        depth = min(depth or max(self.k_values), n)
        wanted = min(depth + ev._self_hits, n)  # one more: the query's own document may be dropped
        _, indices = SparseIndex.build([corpus]).search(queries, wanted, block=self.query_block)
        return drop_self_hits(indices, self.data.corpus_ids, ev.query_ids, depth)

    def score(self, embeddings: Mapping[str, sp.csr_matrix], *, reference=None) -> dict[str, float]:
        """``{"ndcg@10": ..., "query_active_terms": ..., "avg_flops": ...}``: means over the scored queries."""
        ranked = self.retrieve(embeddings)
        qrels = self._queries._qrels
        rels = ranking_metrics.ranked_relevance(ranked, qrels, max(self.k_values))
        ideal, n_relevant = ranking_metrics.ideal_relevance(qrels)
        return {**ranking_metrics.retrieval_scores(rels, ideal, n_relevant, self.k_values),
                **sparsity(embeddings["queries"], embeddings["corpus"])}

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))


OPTIONS = ("path", "split", "k_values", "query_prompt", "document_prompt", "query_prompt_name",
           "document_prompt_name", "batch_size", "corpus_chunk_size", "top_k", "query_block")


def from_spec(name: str, spec: Mapping[str, Any]) -> SparseRetrievalEvaluator:
    """A ``SparseRetrievalEvaluator`` from ``{"path": BEIR_DIR, "split": "dev", **options}``."""
    check_options(name, spec, OPTIONS)
    options = {k: v for k, v in spec.items() if k not in ("path", "split")}
    if "k_values" in options:
        options["k_values"] = tuple(options["k_values"])
    return SparseRetrievalEvaluator(read_beir(spec["path"], spec.get("split", "test")), name=name, **options)
