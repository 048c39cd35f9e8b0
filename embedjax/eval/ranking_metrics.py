"""Ranking metrics, one implementation each, shared by the retrieval and reranking evaluators.

Everything works on **ranked relevance matrices**: ``rels[q, i]`` is the graded relevance
(from the qrels; 0 when unjudged, irrelevant or past the end of the list) of the document
query ``q`` ranked at position ``i`` (0-based; rank ``r = i + 1``). A document counts as
relevant when its relevance is > 0, as in BEIR (arXiv:2104.08663) and MTEB (arXiv:2210.07316).
``ideal[q]`` holds the query's judged relevances sorted descending (zero-padded) and
``n_relevant[q]`` how many of them are > 0. Each function returns one value per query;
the evaluators average them. ``k`` larger than the list means the list as it is (so
precision@k still divides by ``k``, as trec_eval's ``P_k`` does).

The definitions are pytrec_eval's / trec_eval's (``ndcg_cut``, ``map_cut``, ``recall``,
``P``, ``recip_rank`` cut at k), which MTEB and BEIR report:

* nDCG@k = DCG@k / IDCG@k, DCG@k = sum_{r<=k} g_r / log2(r + 1) with **linear gain**
  g_r = max(rel_r, 0); IDCG@k is the DCG@k of ``ideal``.
* MRR@k = 1 / (rank of the first relevant document) if one is in the top k, else 0.
* recall@k = (relevant in the top k) / n_relevant.
* precision@k = (relevant in the top k) / k.
* MAP@k = (1 / n_relevant) * sum_{r<=k, rel_r>0} precision@r (pytrec_eval's ``map_cut``:
  divided by all judged relevant documents, not by min(k, n_relevant) as
  sentence-transformers' ``InformationRetrievalEvaluator`` does; the two agree when a query
  has a single relevant document).
* accuracy@k (hit rate) = 1 if any relevant document is in the top k, else 0.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def _top(rels, k: int | None) -> np.ndarray:
    rels = np.asarray(rels, np.float64)
    if rels.ndim != 2:
        raise ValueError(f"expected a (queries, ranks) relevance matrix, got shape {rels.shape}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return rels if k is None else rels[:, :k]


def _discounts(n: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(n) + 2.0)  # rank r = i + 1 -> 1 / log2(r + 1)


def dcg_at_k(rels, k: int | None = None) -> np.ndarray:
    """DCG@k = sum_{r<=k} max(rel_r, 0) / log2(r + 1) (linear gain, as trec_eval)."""
    top = np.maximum(_top(rels, k), 0.0)
    return top @ _discounts(top.shape[1])


def ndcg_at_k(rels, ideal, k: int | None = None) -> np.ndarray:
    """nDCG@k = DCG@k(rels) / DCG@k(ideal); 0 for a query without relevant documents."""
    ideal = -np.sort(-np.maximum(np.asarray(ideal, np.float64), 0.0), axis=1)
    best = dcg_at_k(ideal, k)
    return np.divide(dcg_at_k(rels, k), best, out=np.zeros_like(best), where=best > 0)


def mrr_at_k(rels, k: int | None = None) -> np.ndarray:
    """Reciprocal rank of the first relevant document within the top k (0 if none)."""
    hit = _top(rels, k) > 0
    first = hit.argmax(axis=1)
    return np.where(hit.any(axis=1), 1.0 / (first + 1.0), 0.0)


def recall_at_k(rels, n_relevant, k: int | None = None) -> np.ndarray:
    """(relevant in the top k) / n_relevant; 0 for a query with no relevant document."""
    n_relevant = np.asarray(n_relevant, np.float64)
    found = (_top(rels, k) > 0).sum(axis=1)
    return np.divide(found, n_relevant, out=np.zeros_like(n_relevant), where=n_relevant > 0)


def precision_at_k(rels, k: int) -> np.ndarray:
    """(relevant in the top k) / k (a list shorter than k still divides by k)."""
    return (_top(rels, k) > 0).sum(axis=1) / float(k)


def average_precision(rels, n_relevant, k: int | None = None) -> np.ndarray:
    """AP@k = (1 / n_relevant) * sum_{r<=k, rel_r>0} (relevant in the top r) / r.

    ``k=None``: over the whole list (reranking's MAP, average precision over all candidates).
    """
    n_relevant = np.asarray(n_relevant, np.float64)
    hit = (_top(rels, k) > 0).astype(np.float64)
    precision_at_r = np.cumsum(hit, axis=1) / np.arange(1, hit.shape[1] + 1)
    total = (precision_at_r * hit).sum(axis=1)
    return np.divide(total, n_relevant, out=np.zeros_like(n_relevant), where=n_relevant > 0)


def accuracy_at_k(rels, k: int | None = None) -> np.ndarray:
    """1 if a relevant document is in the top k, else 0 (hit rate)."""
    return (_top(rels, k) > 0).any(axis=1).astype(np.float64)


# ---------------------------------------------------------------- building the matrices


def ranked_relevance(ranked_ids: Sequence[Sequence[str]], qrels: Sequence[Mapping[str, int]],
                     depth: int | None = None) -> np.ndarray:
    """``(Q, depth)`` relevance of each query's ranked ids (0 when unjudged; rows shorter than
    ``depth`` are zero-padded). ``depth`` defaults to the longest list."""
    if len(ranked_ids) != len(qrels):
        raise ValueError(f"{len(ranked_ids)} ranked lists but {len(qrels)} qrels")
    depth = max((len(r) for r in ranked_ids), default=0) if depth is None else depth
    out = np.zeros((len(ranked_ids), max(depth, 1)))
    for q, (ids, judged) in enumerate(zip(ranked_ids, qrels)):
        out[q, : min(len(ids), depth)] = [judged.get(d, 0) for d in ids[:depth]]
    return out


def ideal_relevance(qrels: Sequence[Mapping[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(ideal (Q, max judged), n_relevant (Q,))``: judged relevances sorted descending, zero-padded."""
    width = max((len(j) for j in qrels), default=1) or 1
    ideal = np.zeros((len(qrels), width))
    for q, judged in enumerate(qrels):
        ideal[q, : len(judged)] = sorted(judged.values(), reverse=True)
    return ideal, (ideal > 0).sum(axis=1)


RETRIEVAL_METRICS = ("ndcg", "mrr", "recall", "precision", "map", "accuracy")


def retrieval_scores(rels, ideal, n_relevant, k_values: Sequence[int]) -> dict[str, float]:
    """Means over queries: ``{"ndcg@k", "mrr@k", "recall@k", "precision@k", "map@k", "accuracy@k"}``
    for every k in ``k_values``."""
    per_k = {
        "ndcg": lambda k: ndcg_at_k(rels, ideal, k),
        "mrr": lambda k: mrr_at_k(rels, k),
        "recall": lambda k: recall_at_k(rels, n_relevant, k),
        "precision": lambda k: precision_at_k(rels, k),
        "map": lambda k: average_precision(rels, n_relevant, k),
        "accuracy": lambda k: accuracy_at_k(rels, k),
    }
    return {f"{name}@{k}": float(np.mean(per_k[name](k))) for name in RETRIEVAL_METRICS for k in k_values}


def rank_candidates(scores: Sequence[np.ndarray], relevant: Sequence[np.ndarray]) -> np.ndarray:
    """``(Q, max candidates)`` relevance in score order (descending; ties keep the input order,
    so the earlier candidate ranks first), zero-padded: reranking's ranked relevance matrix."""
    width = max((len(s) for s in scores), default=1) or 1
    out = np.zeros((len(scores), width))
    for q, (s, rel) in enumerate(zip(scores, relevant)):
        order = np.argsort(-np.asarray(s, np.float64), kind="stable")
        out[q, : len(order)] = np.asarray(rel, np.float64)[order]
    return out


def reranking_scores(scores: Sequence[np.ndarray], relevant: Sequence[np.ndarray], at_k: int = 10) -> dict[str, float]:
    """MTEB / sentence-transformers reranking metrics, means over queries:

    * ``map``: average precision over all candidates (``average_precision`` with k=None);
    * ``mrr@{at_k}``, ``ndcg@{at_k}`` (binary gains, ideal = all positives first).

    ``scores[q]``: the similarity of query q to each of its candidates; ``relevant[q]``: 1 for
    a positive, 0 for a negative.
    """
    rels = rank_candidates(scores, relevant)
    n_pos = np.array([np.sum(np.asarray(r) > 0) for r in relevant], np.float64)
    ideal = (np.arange(rels.shape[1])[None, :] < n_pos[:, None]).astype(np.float64)
    return {
        "map": float(np.mean(average_precision(rels, n_pos))),
        f"mrr@{at_k}": float(np.mean(mrr_at_k(rels, at_k))),
        f"ndcg@{at_k}": float(np.mean(ndcg_at_k(rels, ideal, at_k))),
    }
