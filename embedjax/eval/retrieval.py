"""Retrieval evaluation (BEIR, arXiv:2104.08663; MTEB's retrieval tasks, arXiv:2210.07316).

Every query ranks the whole corpus by similarity (``metric``, cosine by default) with the
exact, device-sharded ``embedjax.eval.search.sharded_topk``; the top ``max(k_values)`` ids are
scored against the graded qrels by ``embedjax.eval.ranking_metrics`` (pytrec_eval's
definitions: nDCG@k with linear gain, as MTEB and BEIR report it; MAP@k divided by all
judged relevant documents). Conventions, as in BEIR and MTEB:

* a document is ``title + " " + text`` (``text`` alone when the title is empty);
* only queries with at least one relevant (> 0) judgment are scored; the rest are skipped;
* when a query's ``_id`` is also a corpus ``_id``, that document is removed from the query's
  results (a query never retrieves itself);
* ties between documents go to the one listed first in ``corpus.jsonl``.

Quantised embeddings (``embedjax.eval.quantize``): int8 is scored as floats with ``metric``;
packed sign bits (uint8) by Hamming distance, retrieving ``k * rescore_multiplier``
candidates which, when the float32 ``reference`` embeddings are given and
``rescore_multiplier > 0``, are re-ranked by the float32 query . unpacked +-1 document bits
(sentence-transformers' ``semantic_search`` rescoring of binary indexes). ``binary_first_stage``
searches float embeddings the same way, shortlisting by Hamming distance of their sign bits, then
re-ranks the shortlist exactly with the float embeddings (``search.binary_rescored_topk``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from embedjax import similarity
from embedjax.data.retrieval_readers import BeirData, read_beir
from embedjax.eval import base, quantize, ranking_metrics, search

DEFAULT_K = (1, 3, 5, 10, 100)
RESCORE_QUERY_CHUNK = 256  # queries rescored at once: bounds the (chunk, candidates, D) unpacked bits


def resolve_prompt(encoder, prompt: str | None, prompt_name: str | None, default_name: str) -> str | None:
    """The instruction to prefix: ``prompt``, else the checkpoint's prompt ``prompt_name``, else
    its prompt called ``default_name`` ("query" / "document") when it has one, as
    sentence-transformers' ``encode_query`` / ``encode_document`` do; else None (the
    encoder's ``default_prompt_name`` then applies)."""
    if prompt is not None and prompt_name is not None:
        raise ValueError("pass a prompt or a prompt name, not both")
    if prompt is not None:
        return prompt
    prompts = getattr(encoder, "prompts", None) or {}
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise KeyError(f"prompt name {prompt_name!r} not in this checkpoint's prompts {sorted(prompts)}")
        return prompts[prompt_name]
    return prompts.get(default_name)


def check_options(name: str, spec: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """ValueError naming the allowed keys when ``spec`` has others or lacks ``path``."""
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f"evaluator {name!r}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    if "path" not in spec:
        raise ValueError(f"evaluator {name!r}: missing 'path' (allowed options: {sorted(allowed)})")


def drop_self_hits(indices: np.ndarray, corpus_ids: Sequence[str], query_ids: Sequence[str],
                   depth: int) -> list[list[str]]:
    """Each query's ranked corpus ids without its own ``_id``, cut to ``depth``."""
    return [[corpus_ids[i] for i in row if corpus_ids[i] != qid][:depth] for row, qid in zip(indices, query_ids)]


def rescore_binary(indices: np.ndarray, query_floats: np.ndarray, corpus_bits: np.ndarray, depth: int) -> np.ndarray:
    """Re-ranks Hamming candidates ``indices (Q, C)`` by float32 query . unpacked +-1 document bits
    (sentence-transformers' rescoring); keeps the best ``depth``. Ties keep the Hamming order."""
    query_floats = np.asarray(query_floats, np.float32)
    dim = query_floats.shape[1]
    if dim > 8 * corpus_bits.shape[1]:
        raise ValueError(f"reference queries have {dim} dimensions, the bits only {8 * corpus_bits.shape[1]}")
    out = np.empty((len(indices), depth), indices.dtype)
    for start in range(0, len(indices), RESCORE_QUERY_CHUNK):
        idx = indices[start : start + RESCORE_QUERY_CHUNK]
        docs = quantize.unpack_binary(corpus_bits[idx.reshape(-1)], dim).reshape(*idx.shape, dim)
        scores = np.einsum("qd,qcd->qc", query_floats[start : start + len(idx)], docs)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
        out[start : start + len(idx)] = np.take_along_axis(idx, order, axis=1)
    return out


@dataclasses.dataclass
class RetrievalEvaluator:
    """BEIR-style retrieval; ``run(encoder)`` yields ``(f"{name}/{key}", value)``.

    Keys: ``ndcg@k``, ``mrr@k``, ``recall@k``, ``precision@k``, ``map@k``, ``accuracy@k`` for
    every k in ``k_values`` (see ``embedjax.eval.ranking_metrics`` for the formulas); the
    headline is ``ndcg@10``. Results are retrieved to depth ``max(k_values)``, capped at the
    corpus size (a k beyond it scores the whole ranked corpus; precision@k still divides by k).

    Args:
      data: a ``BeirData`` (``read_beir``).
      name: prefix of every reported key.
      k_values: cut-offs to report.
      metric: ``embedjax.similarity`` metric for float (and int8) embeddings.
      query_prompt / query_prompt_name: instruction for queries (a string, or the name of one
        of the checkpoint's prompts; default: its "query" prompt if it has one).
      document_prompt / document_prompt_name: likewise for documents ("document").
      batch_size: encode batch size.
      corpus_chunk_size: documents encoded per call (with a progress bar over the chunks).
      rescore_multiplier: binary embeddings retrieve ``k * rescore_multiplier`` candidates by
        Hamming distance and rescore them against the float32 reference; 0 turns rescoring off.
      binary_first_stage: float (and int8) embeddings too are searched in two stages
        (``search.binary_rescored_topk``): their sign bits, packed, shortlist
        ``k * rescore_multiplier`` candidates by Hamming distance, re-ranked by the exact
        ``metric`` on the embeddings themselves (equal to the exact search whenever the shortlist
        holds the true top k). False (default): the exact search.
    """

    data: BeirData
    name: str = "retrieval"
    k_values: Sequence[int] = DEFAULT_K
    metric: str = "cosine"
    query_prompt: str | None = None
    document_prompt: str | None = None
    query_prompt_name: str | None = None
    document_prompt_name: str | None = None
    batch_size: int = 128
    corpus_chunk_size: int = 50_000
    rescore_multiplier: int = 4
    binary_first_stage: bool = False

    def __post_init__(self):
        ks = tuple(self.k_values)
        if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
            raise ValueError(f"k_values must be positive integers, got {self.k_values!r}")
        self.k_values = tuple(sorted(set(int(k) for k in ks)))
        if self.metric not in similarity.METRICS:
            raise ValueError(f"metric must be one of {similarity.METRICS}, got {self.metric!r}")
        for field in ("batch_size", "corpus_chunk_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.rescore_multiplier < 0:
            raise ValueError(f"rescore_multiplier must be >= 0, got {self.rescore_multiplier}")
        if not isinstance(self.binary_first_stage, (bool, np.bool_)):
            raise ValueError(f"binary_first_stage must be True or False, got {self.binary_first_stage!r}")
        qrels, texts = self.data.qrels, dict(zip(self.data.query_ids, self.data.query_texts))
        # BEIR scores only queries with a relevant judgment.
        self.query_ids = tuple(q for q in self.data.query_ids if any(r > 0 for r in qrels.get(q, {}).values()))
        if not self.query_ids:
            raise ValueError(f"evaluator {self.name!r}: no query has a relevant (> 0) judgment in split "
                             f"{self.data.split!r}")
        self.query_texts = tuple(texts[q] for q in self.query_ids)
        self._qrels = [qrels[q] for q in self.query_ids]
        self._self_hits = bool(set(self.query_ids) & set(self.data.corpus_ids))

    @property
    def main_metric(self) -> str:
        return "ndcg@10" if 10 in self.k_values else f"ndcg@{max(self.k_values)}"

    def embed(self, encoder, *, num_layers: int | None = None) -> base.Embeddings:
        """``{"queries": (Q, D), "corpus": (N, D)}`` float32; the corpus in ``corpus_chunk_size`` chunks."""
        from tqdm.auto import tqdm

        kw = dict(batch_size=self.batch_size, num_layers=num_layers)
        queries = base.encode(encoder, self.query_texts,
                              prompt=resolve_prompt(encoder, self.query_prompt, self.query_prompt_name, "query"), **kw)
        doc_prompt = resolve_prompt(encoder, self.document_prompt, self.document_prompt_name, "document")
        texts, step = self.data.corpus_texts, self.corpus_chunk_size
        starts = range(0, len(texts), step)
        chunks = [base.encode(encoder, texts[s : s + step], prompt=doc_prompt, **kw)
                  for s in tqdm(starts, desc=f"{self.name}: corpus chunks", disable=len(starts) < 2)]
        return {"queries": queries, "corpus": np.concatenate(chunks)}

    def retrieve(self, embeddings: base.Embeddings, reference: base.Embeddings | None = None, *,
                 depth: int | None = None) -> list[list[str]]:
        """Each scored query's ranked corpus ids (self-hits removed), ``depth`` (default
        ``max(k_values)``) deep at most."""
        queries, corpus = base.as_scorable(embeddings["queries"]), base.as_scorable(embeddings["corpus"])
        n = len(corpus)
        if n != len(self.data.corpus_ids) or len(queries) != len(self.query_ids):
            raise ValueError(f"expected {len(self.query_ids)} query and {len(self.data.corpus_ids)} corpus embeddings, got "
                             f"{len(queries)} and {len(corpus)}")
        depth = min(depth or max(self.k_values), n)
        wanted = min(depth + self._self_hits, n)  # one more: the query's own document may be dropped
        if base.is_binary(corpus):
            rescore = reference is not None and self.rescore_multiplier > 0
            candidates = min(wanted * self.rescore_multiplier, n) if rescore else wanted
            _, indices = search.sharded_topk(queries, corpus, candidates, metric="hamming")
            if rescore:
                indices = rescore_binary(indices, reference["queries"], corpus, wanted)
        elif self.binary_first_stage:
            _, indices = search.binary_rescored_topk(queries, corpus, wanted, metric=self.metric,
                                                     rescore_multiplier=self.rescore_multiplier)
        else:
            _, indices = search.sharded_topk(queries, corpus, wanted, metric=self.metric)
        return drop_self_hits(indices, self.data.corpus_ids, self.query_ids, depth)

    def score(self, embeddings: base.Embeddings, *, reference: base.Embeddings | None = None) -> dict[str, float]:
        """``{"ndcg@10": ..., "recall@100": ..., ...}``, means over the scored queries."""
        ranked = self.retrieve(embeddings, reference)
        rels = ranking_metrics.ranked_relevance(ranked, self._qrels, max(self.k_values))
        ideal, n_relevant = ranking_metrics.ideal_relevance(self._qrels)
        return ranking_metrics.retrieval_scores(rels, ideal, n_relevant, self.k_values)

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))


OPTIONS = ("path", "split", "k_values", "metric", "query_prompt", "document_prompt", "query_prompt_name",
           "document_prompt_name", "batch_size", "corpus_chunk_size", "rescore_multiplier", "binary_first_stage")


def from_spec(name: str, spec: Mapping[str, Any]) -> RetrievalEvaluator:
    """A ``RetrievalEvaluator`` from ``{"path": BEIR_DIR, "split": "test", **options}``
    (options: the evaluator's fields; an unknown key raises ValueError naming the allowed ones)."""
    check_options(name, spec, OPTIONS)
    options = {k: v for k, v in spec.items() if k not in ("path", "split")}
    if "k_values" in options:
        options["k_values"] = tuple(options["k_values"])
    return RetrievalEvaluator(read_beir(spec["path"], spec.get("split", "test")), name=name, **options)
