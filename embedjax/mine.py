"""Hard-negative mining with positive-aware false-negative filtering.

For every query, the corpus is searched with the mining model (``embedjax.eval.search.sharded_topk``:
exact top-k, corpus rows sharded over every device), and a few negatives are sampled from a window
of its ranking, as FlagEmbedding's ``hn_mine`` does. Candidates scoring too close to the query's
positive are dropped first: they are likely unlabelled positives (false negatives). The two filters
of NV-Retriever (arXiv:2407.15831), which found them better than a plain rank window:

* ``margin`` ("TopK-MarginPos"): drop a candidate when ``score > pos_score - margin``;
* ``relative_margin`` ("TopK-PercPos", e.g. 0.95): drop it when ``score > relative_margin * pos_score``.

(sentence-transformers' ``mine_hard_negatives`` writes the relative rule as ``1 - relative_margin``:
its 0.05 is our 0.95.)

Conventions:

* **Rank** is the 0-based position in the query's ranking of the corpus *with that query's positives
  (and ``exclude_ids``) taken out*: rank 0 is the most similar document that is not a positive.
  ``rank_window=(lo, hi)`` keeps ranks ``lo <= rank < hi``. Ties go to the lower corpus index.
  The window is cut before the filters (as FlagEmbedding), so filtering only shrinks it.
* **pos_score** is the score of the query's positive; with several positives, the *lowest* of
  their scores (the strictest filter: a candidate must stay below every positive's bound).
* **Sampling**: from the ``m`` surviving candidates (in rank order), ``min(num_negatives, m)``
  positions are drawn uniformly without replacement by
  ``np.random.default_rng([seed, query_index]).choice(m, size, replace=False)`` and sorted, so the
  negatives come out best-ranked first. The draw depends only on the seed, the query's index and
  its candidates: the same on any device count or batching.

``mine_from_embeddings`` is the pure core (embeddings in, corpus indices out);
``mine_hard_negatives`` encodes texts with an ``embedjax.Encoder`` and returns training records
with the mining model's scores as teacher scores (for MarginMSE / listwise-KL distillation);
``write_jsonl`` writes them for ``embedjax.data.readers`` and ``scripts/mine.py``. ``mine_beir`` mines a
BEIR corpus for the queries of a split, never returning a document judged relevant to the query.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from embedjax import similarity
from embedjax.data.readers import read_records
from embedjax.eval.search import sharded_topk

log = logging.getLogger(__name__)

ON_SHORT = ("keep", "skip")


class Mined(NamedTuple):
    """What ``mine_from_embeddings`` returns; one row per kept query (``query_ids``).

    negatives: ``(Q', n)`` int32 corpus indices, best-ranked first, padded with -1.
    scores: ``(Q', n)`` float32 scores of ``negatives`` (-inf where padded).
    positive_scores: ``(Q',)`` float32: the lowest score of the query's positives (NaN if none).
    query_ids: ``(Q',)`` int64: the row of ``query_emb`` each row belongs to (all of them with
      ``on_short="keep"``).
    num_found: ``(Q',)`` int32: negatives actually sampled (< n: the query was short).
    filtered_margin, filtered_relative: ``(Q',)`` int32: candidates in the window dropped by the
      ``margin`` / ``relative_margin`` rule (one failing both counts in both).
    num_short: queries (of all Q) that got fewer than ``n`` negatives, skipped ones included.
    """

    negatives: np.ndarray
    scores: np.ndarray
    positive_scores: np.ndarray
    query_ids: np.ndarray
    num_found: np.ndarray
    filtered_margin: np.ndarray
    filtered_relative: np.ndarray
    num_short: int


# ---------------------------------------------------------------------------- argument checks


def _check_window(rank_window) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in rank_window)
    except (TypeError, ValueError):
        raise ValueError(f"rank_window must be a pair (lo, hi) of ints, got {rank_window!r}") from None
    if not 0 <= lo < hi:
        raise ValueError(f"rank_window=(lo, hi) needs 0 <= lo < hi, got ({lo}, {hi})")
    return lo, hi


def _check_filters(margin, relative_margin) -> None:
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0 (drop score > pos_score - margin), got {margin}")
    if relative_margin is not None and not (math.isfinite(relative_margin) and 0 < relative_margin <= 1):
        raise ValueError(f"relative_margin must be in (0, 1] (drop score > relative_margin * pos_score, "
                         f"e.g. 0.95), got {relative_margin}")


def check_options(num_negatives, rank_window, margin, relative_margin, seed, on_short) -> tuple[int, int]:
    """Raises ValueError naming the bad option; returns the window ``(lo, hi)``."""
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, (int, np.integer)) or num_negatives < 1:
        raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if on_short not in ON_SHORT:
        raise ValueError(f"on_short must be one of {ON_SHORT}, got {on_short!r}")
    _check_filters(margin, relative_margin)
    return _check_window(rank_window)


def _id_lists(ids, q: int, n: int, name: str) -> list[np.ndarray]:
    """``ids`` as Q int64 arrays of corpus indices in [0, n), checked."""
    if ids is None:
        return [np.zeros(0, np.int64)] * q
    ids = list(ids)
    if len(ids) != q:
        raise ValueError(f"{name} needs one list of corpus indices per query ({q}), got {len(ids)}")
    out = []
    for i, row in enumerate(ids):
        row = np.asarray(row, np.int64).reshape(-1)
        bad = row[(row < 0) | (row >= n)]
        if bad.size:
            raise ValueError(f"{name}[{i}] holds corpus index {int(bad[0])}, expected 0 <= index < {n}")
        out.append(row)
    return out


# ---------------------------------------------------------------------------- pure pieces


def pair_scores(query_emb, corpus_emb, query_idx, corpus_idx, metric: str = "cosine") -> np.ndarray:
    """Scores of the pairs (query_emb[query_idx[i]], corpus_emb[corpus_idx[i]]): ``(P,)`` float32.

    The same metric as the search (``embedjax.similarity.pairwise``; higher is more similar).
    """
    query_idx, corpus_idx = np.asarray(query_idx, np.int64), np.asarray(corpus_idx, np.int64)
    if query_idx.size == 0:
        return np.zeros(0, np.float32)
    a, b = np.asarray(query_emb)[query_idx], np.asarray(corpus_emb)[corpus_idx]
    if a.dtype != np.uint8:  # packed bits (hamming) stay uint8
        a, b = a.astype(np.float32), b.astype(np.float32)
    return np.asarray(similarity.pairwise(a, b, metric), np.float32)


def lowest_positive_scores(query_emb, corpus_emb, positive_ids: Sequence[np.ndarray],
                           metric: str = "cosine") -> np.ndarray:
    """Per query, the lowest score of its positives: ``(Q,)`` float32, NaN for a query without one."""
    rows = np.repeat(np.arange(len(positive_ids)), [len(p) for p in positive_ids])
    flat = np.concatenate([np.zeros(0, np.int64), *positive_ids])
    scores = pair_scores(query_emb, corpus_emb, rows, flat, metric)
    out = np.full(len(positive_ids), np.inf, np.float32)
    np.minimum.at(out, rows, scores)
    out[[len(p) == 0 for p in positive_ids]] = np.nan
    return out


def window(indices: np.ndarray, scores: np.ndarray, removed: np.ndarray, lo: int, hi: int):
    """One query's candidates: its ranked ``indices``/``scores`` (best first) without ``removed``,
    then ranks ``lo <= rank < hi`` of what is left -> ``(indices, scores)``."""
    keep = ~np.isin(indices, removed)
    return indices[keep][lo:hi], scores[keep][lo:hi]


def false_negative_masks(scores: np.ndarray, pos_score: float, margin: float | None,
                         relative_margin: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the candidates each filter drops: ``(by margin, by relative_margin)``.

    ``score > pos_score - margin`` and ``score > relative_margin * pos_score``; a rule that is None
    (or a NaN ``pos_score``: no positive) drops nothing.
    """
    none = np.zeros(scores.shape, bool)
    if math.isnan(pos_score):
        return none, none
    by_margin = scores > pos_score - margin if margin is not None else none
    by_relative = scores > relative_margin * pos_score if relative_margin is not None else none
    return by_margin, by_relative


def sample(num_candidates: int, num_negatives: int, seed: int, query_index: int) -> np.ndarray:
    """Sorted positions of ``min(num_negatives, num_candidates)`` candidates drawn uniformly without
    replacement, by a generator seeded with ``(seed, query_index)`` (see the module docstring)."""
    rng = np.random.default_rng([seed, query_index])
    return np.sort(rng.choice(num_candidates, size=min(num_negatives, num_candidates), replace=False))


# ---------------------------------------------------------------------------- the core


def mine_from_embeddings(
    query_emb,
    corpus_emb,
    positive_ids: Sequence[Sequence[int]],
    *,
    num_negatives: int,
    rank_window: tuple[int, int] = (0, 100),
    margin: float | None = None,
    relative_margin: float | None = None,
    seed: int = 0,
    metric: str = "cosine",
    exclude_ids: Sequence[Sequence[int]] | None = None,
    on_short: str = "keep",
    mesh=None,
) -> Mined:
    """Samples hard negatives for every query from its ranking of the corpus.

    Args:
      query_emb: ``(Q, D)`` query embeddings (packed uint8 bits with ``metric="hamming"``).
      corpus_emb: ``(N, D)`` corpus embeddings.
      positive_ids: per query, the corpus indices of its positives (never sampled; the lowest
        of their scores is ``pos_score`` for the filters). An empty list is allowed when no
        filter is on.
      num_negatives: negatives per query (``n`` >= 1).
      rank_window: ``(lo, hi)``: sample from ranks ``lo <= rank < hi`` (0-based, positives and
        ``exclude_ids`` not counted; see the module docstring).
      margin: drop a candidate with ``score > pos_score - margin`` (NV-Retriever TopK-MarginPos).
      relative_margin: drop one with ``score > relative_margin * pos_score`` (TopK-PercPos, e.g.
        0.95; meant for scores where positives are > 0, such as cosine).
      seed: a non-negative int; the draw for query i uses ``np.random.default_rng([seed, i])``.
      metric: ``embedjax.similarity`` metric of the search and the scores (higher = more similar).
      exclude_ids: per query, further corpus indices never sampled and not ranked (e.g. the
        query's own text in the corpus); None: none.
      on_short: a query with fewer than ``n`` surviving candidates: ``"keep"`` it with what
        there is (rows padded with -1), or ``"skip"`` it (its row is left out).
      mesh: the devices the corpus is sharded over (default: every device).

    Returns a ``Mined`` tuple (negatives, scores, positive_scores, query_ids, num_found,
    filtered_margin, filtered_relative, num_short). Logs a warning when queries are short.
    """
    query_emb, corpus_emb = np.asarray(query_emb), np.asarray(corpus_emb)
    if query_emb.ndim != 2 or corpus_emb.ndim != 2 or query_emb.shape[1] != corpus_emb.shape[1]:
        raise ValueError(f"need (Q, D) query and (N, D) corpus embeddings, got {query_emb.shape} "
                         f"and {corpus_emb.shape}")
    q, n = query_emb.shape[0], corpus_emb.shape[0]
    if n == 0:
        raise ValueError("the corpus is empty (expected at least one candidate)")
    lo, hi = check_options(num_negatives, rank_window, margin, relative_margin, seed, on_short)
    positives = _id_lists(positive_ids, q, n, "positive_ids")
    excluded = _id_lists(exclude_ids, q, n, "exclude_ids")
    if margin is not None or relative_margin is not None:
        empty = [i for i, p in enumerate(positives) if len(p) == 0]
        if empty:
            raise ValueError(f"positive_ids[{empty[0]}] is empty: the false-negative filters need a positive "
                             f"score for every query ({len(empty)} queries have none)")
    removed = [np.union1d(p, e) for p, e in zip(positives, excluded)]

    # Enough ranks that taking the removed ones out still leaves ranks up to hi.
    k = min(n, hi + max((len(r) for r in removed), default=0))
    top_scores, top_idx = sharded_topk(query_emb, corpus_emb, k, mesh=mesh, metric=metric)
    pos_scores = lowest_positive_scores(query_emb, corpus_emb, positives, metric)

    negatives = np.full((q, num_negatives), -1, np.int32)
    scores = np.full((q, num_negatives), -np.inf, np.float32)
    found, by_margin, by_relative = (np.zeros(q, np.int32) for _ in range(3))
    for i in range(q):
        cand, cand_scores = window(top_idx[i], top_scores[i], removed[i], lo, hi)
        drop_m, drop_r = false_negative_masks(cand_scores, float(pos_scores[i]), margin, relative_margin)
        keep = ~(drop_m | drop_r)
        picks = sample(int(keep.sum()), num_negatives, seed, i)
        found[i], by_margin[i], by_relative[i] = len(picks), drop_m.sum(), drop_r.sum()
        negatives[i, : len(picks)] = cand[keep][picks]
        scores[i, : len(picks)] = cand_scores[keep][picks]

    short = found < num_negatives
    if short.any():
        log.warning("%d of %d queries got fewer than %d negatives (ranks %d..%d, %d corpus texts)%s",
                    short.sum(), q, num_negatives, lo, hi - 1, n, "; skipped" if on_short == "skip" else "")
    rows = np.flatnonzero(~short) if on_short == "skip" else np.arange(q)
    return Mined(negatives[rows], scores[rows], pos_scores[rows], rows.astype(np.int64), found[rows],
                 by_margin[rows], by_relative[rows], int(short.sum()))


# ---------------------------------------------------------------------------- texts


def _positive_lists(positives, q: int) -> list[list[str]]:
    if len(positives) != q:
        raise ValueError(f"need one positive (or a list of them) per query: {q} queries, {len(positives)} positives")
    out = []
    for i, p in enumerate(positives):
        p = [p] if isinstance(p, str) else list(p)
        if not p or not all(isinstance(t, str) for t in p):
            raise ValueError(f"positives[{i}] must be a string or a non-empty list of strings, got {p!r:.80}")
        out.append(p)
    return out


def build_corpus(positives: Sequence[Sequence[str]], corpus: Iterable[str] | None = None) -> list[str]:
    """The candidate texts: ``corpus`` without repeats (first occurrence kept), then every positive
    text it lacks; with no ``corpus``, the distinct positives (as FlagEmbedding does)."""
    texts = dict.fromkeys(corpus if corpus is not None else ())
    for group in positives:
        texts.update(dict.fromkeys(group))
    return list(texts)


def mine_hard_negatives(
    encoder,
    queries: Sequence[str],
    positives: Sequence[str | Sequence[str]],
    corpus: Iterable[str] | None = None,
    *,
    num_negatives: int = 5,
    rank_window: tuple[int, int] = (0, 100),
    margin: float | None = None,
    relative_margin: float | None = None,
    seed: int = 0,
    metric: str = "cosine",
    on_short: str = "keep",
    batch_size: int = 128,
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    show_progress: bool | None = None,
    mesh=None,
    stats: dict | None = None,
) -> list[dict]:
    """Mines hard negatives for text queries with ``encoder`` (an ``embedjax.Encoder``).

    Args:
      encoder: the mining model; texts are embedded by ``encoder.encode`` (normalised as the
        checkpoint says), each batch split over ``mesh``'s devices.
      queries: Q query texts.
      positives: per query, its positive text or a list of them.
      corpus: candidate texts; None: the distinct positives. Repeats are dropped, positives
        missing from it are added, and a text equal to its query is never that query's negative.
      num_negatives, rank_window, margin, relative_margin, seed, metric, on_short: as in
        ``mine_from_embeddings`` (query i of ``queries`` is query index i of the draw).
      batch_size: texts per encoder forward pass.
      query_prompt, corpus_prompt: instructions prefixed to queries / candidate texts.
      show_progress: the encoder's progress bar (None: for long encodes on a terminal).
      mesh: a 1-D device mesh for encoding and search; default every local device (on several
        hosts each host mines everything itself: correct, not split).
      stats: a dict, filled with the counts of the run (queries, records, negatives, short,
        filtered_margin, filtered_relative, corpus).

    Returns one record per (query, positive):
    ``{"text_a": query, "text_b": positive, "text_n": [negatives...], "teacher": [score(q, p),
    score(q, n_1), ...]}``: the scores are the mining model's (``metric``), for distillation.
    Queries with several positives share one draw of negatives (filtered against the lowest
    positive score). With ``on_short="skip"`` short queries give no record.
    """
    from embedjax import sharding

    check_options(num_negatives, rank_window, margin, relative_margin, seed, on_short)  # before encoding
    queries = list(queries)
    if not all(isinstance(t, str) for t in queries):
        raise ValueError("queries must be strings")
    groups = _positive_lists(list(positives), len(queries))
    texts = build_corpus(groups, corpus)
    where = {t: j for j, t in enumerate(texts)}
    positive_ids = [[where[t] for t in g] for g in groups]
    self_ids = [[where[t]] if t in where else [] for t in queries]

    mesh = sharding.local_mesh() if mesh is None else mesh
    kw = dict(batch_size=batch_size, show_progress=show_progress, mesh=mesh)
    query_emb = encoder.encode(queries, prompt=query_prompt, **kw)
    corpus_emb = encoder.encode(texts, prompt=corpus_prompt, **kw)
    mined = mine_from_embeddings(query_emb, corpus_emb, positive_ids, num_negatives=num_negatives,
                                 rank_window=rank_window, margin=margin, relative_margin=relative_margin,
                                 seed=seed, metric=metric, exclude_ids=self_ids, on_short=on_short, mesh=mesh)

    records = []
    for row, i in enumerate(mined.query_ids):
        count = mined.num_found[row]
        negs = [texts[j] for j in mined.negatives[row, :count]]
        neg_scores = [float(s) for s in mined.scores[row, :count]]
        pos = pair_scores(query_emb, corpus_emb, [i] * len(positive_ids[i]), positive_ids[i], metric)
        for text, score in zip(groups[i], pos):
            records.append({"text_a": queries[i], "text_b": text, "text_n": negs,
                            "teacher": [float(score)] + neg_scores})
    if stats is not None:
        stats.update(queries=len(queries), records=len(records), negatives=int(mined.num_found.sum()),
                     short=mined.num_short, filtered_margin=int(mined.filtered_margin.sum()),
                     filtered_relative=int(mined.filtered_relative.sum()), corpus=len(texts))
    return records


def cross_encoder_teacher(records: Sequence[Mapping], cross_encoder, *, batch_size: int = 64) -> list[dict]:
    """The records with ``teacher`` rescored by a cross-encoder: ``[logit(q, p), logit(q, n_1), ...]``
    (raw logits, no activation, as MarginMSE and listwise-KL distillation from a reranker use
    them), the pairs scored on every local device. Records are ``mine_hard_negatives``'s."""
    from embedjax import sharding

    pairs = [(r["text_a"], text) for r in records for text in (r["text_b"], *r["text_n"])]
    scores = cross_encoder.predict(pairs, batch_size=batch_size, activation=False, mesh=sharding.local_mesh())
    if scores.ndim != 1:
        raise ValueError(f"teacher scores need a one-logit cross-encoder, this one has {scores.shape[1]} labels")
    out, start = [], 0
    for r in records:
        n = 1 + len(r["text_n"])
        out.append({**r, "teacher": [float(x) for x in scores[start:start + n]]})
        start += n
    return out


def mine_beir(
    encoder,
    directory,
    split: str = "train",
    *,
    min_grade: int = 1,
    num_negatives: int = 8,
    rank_window: tuple[int, int] = (0, 100),
    margin: float | None = None,
    relative_margin: float | None = None,
    seed: int = 0,
    metric: str = "cosine",
    on_short: str = "keep",
    batch_size: int = 128,
    query_prompt: str | None = None,
    corpus_prompt: str | None = None,
    show_progress: bool | None = None,
    mesh=None,
    stats: dict | None = None,
) -> tuple[list[str], list[list[str]], list[list[float]]]:
    """Mines hard negatives from a BEIR corpus for the queries of a split.

    Every training query of ``read_beir_training(directory, split, min_grade=min_grade)`` is
    searched against the whole corpus. Its positives (relevance >= ``min_grade``) set
    ``pos_score`` for the filters (the lowest of them), and EVERY document judged relevant
    (relevance > 0), or with the same text as one, is left out of its ranking: never a
    negative. Other options as in ``mine_from_embeddings``.

    Returns ``(query_ids, negatives, scores)``: per kept query its corpus ids (best-ranked
    first) and their scores, what ``retrieval_training.write_hard_negatives`` writes and
    ``data.kind="beir"`` reads as ``data.hard_negatives``.
    """
    from embedjax import sharding
    from embedjax.data.retrieval_training import read_beir_training

    check_options(num_negatives, rank_window, margin, relative_margin, seed, on_short)  # before encoding
    records = read_beir_training(directory, split, min_grade=min_grade)
    same_text: dict[int, list[int]] = {}
    for j, h in enumerate(records.document_hashes.tolist()):
        same_text.setdefault(h, []).append(j)
    excluded = [sorted({j for h in records.document_hashes[records.relevant[q]].tolist() for j in same_text[h]})
                for q in range(len(records))]

    mesh = sharding.local_mesh() if mesh is None else mesh
    kw = dict(batch_size=batch_size, show_progress=show_progress, mesh=mesh)
    query_emb = encoder.encode(list(records.queries), prompt=query_prompt, **kw)
    corpus_emb = encoder.encode(list(records.documents), prompt=corpus_prompt, **kw)
    mined = mine_from_embeddings(query_emb, corpus_emb, [records.positives[q] for q in range(len(records))],
                                 num_negatives=num_negatives, rank_window=rank_window, margin=margin,
                                 relative_margin=relative_margin, seed=seed, metric=metric, exclude_ids=excluded,
                                 on_short=on_short, mesh=mesh)
    query_ids, negatives, scores = [], [], []
    for row, q in enumerate(mined.query_ids):
        count = int(mined.num_found[row])
        query_ids.append(records.query_ids[q])
        negatives.append([records.document_ids[j] for j in mined.negatives[row, :count]])
        scores.append([float(x) for x in mined.scores[row, :count]])
    if stats is not None:
        stats.update(queries=len(records), records=len(query_ids), negatives=int(mined.num_found.sum()),
                     short=mined.num_short, filtered_margin=int(mined.filtered_margin.sum()),
                     filtered_relative=int(mined.filtered_relative.sum()), corpus=len(records.documents))
    return query_ids, negatives, scores


# ---------------------------------------------------------------------------- files


def write_jsonl(records: Iterable[Mapping], path, *, flat: bool = False) -> int:
    """Writes mined records, one JSON object per line (UTF-8, not ASCII-escaped); returns the line count.

    ``flat=False``: each record as it is (``text_a``, ``text_b``, ``text_n`` list, ``teacher``).
    ``flat=True``: one plain triplet ``{"text_a", "text_b", "text_n": str}`` per negative, what
    ``embedjax.data.readers.read_records(path, "triplets")`` reads (a record without negatives
    gives no line).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = 0
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            rows = ([{"text_a": r["text_a"], "text_b": r["text_b"], "text_n": neg} for neg in r["text_n"]]
                    if flat else [r])
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                lines += 1
    return lines


def read_pairs_for_mining(path, format: str | None = None, columns: Mapping[str, str | int] | None = None,
                          **kw) -> tuple[list[str], list[list[str]]]:
    """(query, positive) pairs from a tsv/csv/jsonl file, grouped by query.

    Built on ``read_records(path, "pairs", format=, columns=, **kw)`` (``columns`` maps
    ``text_a`` (query) and ``text_b`` (positive)). Returns ``(queries, positives)``: the distinct
    queries in order of first appearance, and per query its distinct positives in file order (a
    query on several lines has several positives).
    """
    grouped: dict[str, dict[str, None]] = {}
    for pair in read_records(path, "pairs", format=format, columns=columns, **kw):
        grouped.setdefault(pair.text_a, {})[pair.text_b] = None
    return list(grouped), [list(p) for p in grouped.values()]
