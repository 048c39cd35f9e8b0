"""Reranking evaluation (MTEB's reranking tasks, arXiv:2210.07316).

Each query comes with its own candidates: relevant ``positive`` and irrelevant ``negative``
texts. The candidates are ranked by similarity to the query (``metric``, cosine by default)
and scored by ``embedjax.eval.ranking_metrics.reranking_scores``:

* ``map``: mean average precision over all candidates, AP = (1 / P) * sum over the ranks r
  of the positives of (positives in the top r) / r, P = number of positives (the headline);
* ``mrr@10``: 1 / rank of the first positive if it is in the top 10, else 0;
* ``ndcg@10``: DCG@10 / ideal DCG@10 with binary gains, DCG = sum_r rel_r / log2(r + 1).

As in MTEB and sentence-transformers' ``RerankingEvaluator``, a query without negatives is
skipped. Candidates with equal scores keep their order in the file (positives first), so
duplicate texts among a query's candidates favour the positive. Every distinct text is
embedded once, however many queries list it.

Packed-bit embeddings are scored by Hamming distance, or, when the float32 ``reference`` is
given, by the float32 query . unpacked +-1 candidate bits (as retrieval rescores).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import jax
import numpy as np

from embedjax import similarity
from embedjax.data.retrieval_readers import RerankingSample, read_reranking
from embedjax.eval import base, quantize, ranking_metrics
from embedjax.eval.retrieval import check_options, resolve_prompt

log = logging.getLogger(__name__)
PAIR_CHUNK = 16_384  # (query, candidate) pairs scored at once


@functools.partial(jax.jit, static_argnames="metric")
def _pairwise(a, b, metric):
    return similarity.pairwise(a, b, metric).astype(np.float32)


def pair_scores(queries: np.ndarray, documents: np.ndarray, query_index: np.ndarray, doc_index: np.ndarray,
                metric: str) -> np.ndarray:
    """``similarity.pairwise(queries[query_index], documents[doc_index], metric)`` in fixed-size chunks
    (one compile, bounded memory)."""
    out = np.empty(len(query_index), np.float32)
    step = min(PAIR_CHUNK, max(len(query_index), 1))
    for start in range(0, len(query_index), step):
        qi, di = query_index[start : start + step], doc_index[start : start + step]
        pad = step - len(qi)
        a = np.pad(queries[qi], ((0, pad), (0, 0)))
        b = np.pad(documents[di], ((0, pad), (0, 0)))
        out[start : start + len(qi)] = np.asarray(_pairwise(a, b, metric))[: len(qi)]
    return out


@dataclasses.dataclass
class RerankingEvaluator:
    """MTEB-style reranking; ``run(encoder)`` yields ``(f"{name}/{key}", value)``.

    Keys: ``map`` (headline), ``mrr@10``, ``ndcg@10`` (``@{at_k}``).

    Args:
      samples: ``RerankingSample``s (``read_reranking``).
      name: prefix of every reported key.
      at_k: the cut-off of MRR and nDCG.
      metric: ``embedjax.similarity`` metric for float (and int8) embeddings.
      query_prompt / query_prompt_name, document_prompt / document_prompt_name: instructions,
        as in ``RetrievalEvaluator`` (defaults: the checkpoint's "query" / "document" prompts).
      batch_size: encode batch size.
    """

    samples: Sequence[RerankingSample]
    name: str = "reranking"
    at_k: int = 10
    metric: str = "cosine"
    query_prompt: str | None = None
    document_prompt: str | None = None
    query_prompt_name: str | None = None
    document_prompt_name: str | None = None
    batch_size: int = 128
    main_metric: ClassVar[str] = "map"

    def __post_init__(self):
        if self.metric not in similarity.METRICS:
            raise ValueError(f"metric must be one of {similarity.METRICS}, got {self.metric!r}")
        if self.at_k < 1 or self.batch_size < 1:
            raise ValueError(f"at_k and batch_size must be >= 1, got {self.at_k} and {self.batch_size}")
        kept = [s for s in self.samples if s.positive and s.negative]
        if len(kept) < len(self.samples):
            log.info("%s: skipping %d of %d queries without positives or negatives", self.name,
                     len(self.samples) - len(kept), len(self.samples))
        if not kept:
            raise ValueError(f"evaluator {self.name!r}: no query has both a positive and a negative")
        self._samples = kept
        # Distinct texts, embedded once; each query's candidates index into them.
        index: dict[str, int] = {}
        self._candidates = [np.array([index.setdefault(t, len(index)) for t in s.positive + s.negative])
                            for s in kept]
        self._relevant = [np.r_[np.ones(len(s.positive)), np.zeros(len(s.negative))] for s in kept]
        self.documents = tuple(index)

    def embed(self, encoder, *, num_layers: int | None = None) -> base.Embeddings:
        """``{"queries": (Q, D), "documents": (distinct candidate texts, D)}`` float32."""
        kw = dict(batch_size=self.batch_size, num_layers=num_layers)
        queries = base.encode(encoder, [s.query for s in self._samples],
                              prompt=resolve_prompt(encoder, self.query_prompt, self.query_prompt_name, "query"), **kw)
        documents = base.encode(encoder, self.documents, prompt=resolve_prompt(
            encoder, self.document_prompt, self.document_prompt_name, "document"), **kw)
        return {"queries": queries, "documents": documents}

    def candidate_scores(self, embeddings: base.Embeddings, reference: base.Embeddings | None = None) -> list[np.ndarray]:
        """Each query's similarity to each of its candidates (positives first, then negatives)."""
        queries, documents = base.as_scorable(embeddings["queries"]), base.as_scorable(embeddings["documents"])
        if len(queries) != len(self._samples) or len(documents) != len(self.documents):
            raise ValueError(f"expected {len(self._samples)} query and {len(self.documents)} document embeddings, "
                             f"got {len(queries)} and {len(documents)}")
        metric = self.metric
        if base.is_binary(documents):
            if reference is not None:  # float query . +-1 bits, as retrieval rescores
                queries = np.asarray(reference["queries"], np.float32)
                documents = quantize.unpack_binary(documents, queries.shape[1])
                metric = "dot"
            else:
                metric = "hamming"
        lengths = [len(c) for c in self._candidates]
        query_index = np.repeat(np.arange(len(lengths)), lengths)
        flat = pair_scores(queries, documents, query_index, np.concatenate(self._candidates), metric)
        return np.split(flat, np.cumsum(lengths)[:-1])

    def score(self, embeddings: base.Embeddings, *, reference: base.Embeddings | None = None) -> dict[str, float]:
        """``{"map": ..., "mrr@10": ..., "ndcg@10": ...}``, means over the queries."""
        return ranking_metrics.reranking_scores(self.candidate_scores(embeddings, reference), self._relevant, self.at_k)

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))


OPTIONS = ("path", "at_k", "metric", "query_prompt", "document_prompt", "query_prompt_name",
           "document_prompt_name", "batch_size")


def from_spec(name: str, spec: Mapping[str, Any]) -> RerankingEvaluator:
    """A ``RerankingEvaluator`` from ``{"path": JSONL, **options}`` (options: the evaluator's
    fields; an unknown key raises ValueError naming the allowed ones)."""
    check_options(name, spec, OPTIONS)
    options = {k: v for k, v in spec.items() if k != "path"}
    return RerankingEvaluator(read_reranking(spec["path"]), name=name, **options)
