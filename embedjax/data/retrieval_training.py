"""Retrieval training records from a BEIR split: one record per query, with every relevant document.

``read_beir_training(directory, split)`` reads a BEIR directory with the evaluator's own reader
(``embedjax.data.retrieval_readers``: the same ``title + " " + text`` documents, the same
file:line errors) and returns ``RetrievalRecords``: a random-access sequence the training
pipeline reads like any other source. Documents are held once, in the corpus's order, and
every record refers to them by index (a query's positives, its relevant set, its mined hard
negatives), so a million-document corpus costs its texts once, not once per query.

Graded qrels: a document with relevance >= ``min_grade`` is a *positive* (trained towards); every
document with relevance > 0 is *relevant*, and a relevant document is never one of the query's
negatives, in its batch or on another device (``Batch.relevant`` carries the hashes of each
row's relevant documents; ``embedjax.losses.infonce`` masks them).

Positives per step (``positives``): ``1`` (default): each query takes one of its positives,
drawn uniformly; ``m > 1``: up to m of them (all when it has fewer; empty slots are ``None``
and are never candidates); ``"all"``: every positive (m = the largest count in the split; on
NFCorpus that is hundreds of documents per query, so a sampled m is the practical choice).
The draw is ``np.random.default_rng((seed, epoch, record index))``: a pure function of the
pipeline's seed, the epoch and the record, so it is deterministic and a resumed run draws
exactly what the uninterrupted run would have drawn.

Hard negatives (``hard_negatives``): a jsonl file of ``{"query_id": ..., "negatives": [corpus
ids, best-ranked first]}`` lines, as ``scripts/mine.py --beir`` writes them. Each step a query
takes ``num_negatives`` of its list (without replacement; a query with fewer takes them all and
repeats some, as Tevatron does), drawn like its positives. A query the miner left without any
(its false-negative filter dropped every candidate, or no line) draws random corpus documents
that are not relevant to it instead; the reader logs how many such queries there are.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from embedjax.data.readers import DataError, _rows, _split
from embedjax.data.retrieval_readers import _qrels_path, _read_texts, read_qrels

ALL = "all"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Ragged:
    """Lists of ints, one per row, stored flat (CSR): row i is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray   # int32
    offsets: np.ndarray  # int64, len(rows) + 1

    @classmethod
    def from_lists(cls, lists) -> _Ragged:
        lengths = np.fromiter((len(x) for x in lists), np.int64, count=len(lists))
        offsets = np.zeros(len(lists) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((v for x in lists for v in x), np.int32, count=int(offsets[-1]))
        return cls(values, offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class RetrievalRecords(collections.abc.Sequence):
    """One training record per query of a BEIR split (see the module docstring).

    ``record_at(i, epoch, seed)`` is record i as epoch ``epoch`` of a pipeline seeded with
    ``seed`` sees it: ``{"text_a": query, "text_b": positive (a str with positives=1, else a
    tuple of m texts or None), ["text_n": tuple of num_negatives texts,] "relevant": hashes of
    every relevant document}``. ``records[i]`` is ``record_at(i, 0, 0)``.
    """

    def __init__(self, *, documents, document_ids, document_hashes, queries, query_ids, positives: _Ragged,
                 relevant: _Ragged, negatives: _Ragged | None, positives_per_query: int | str = 1,
                 num_negatives: int = 0, source: str = "", skipped_queries: int = 0):
        self.documents = documents              # tuple of str: title + " " + text
        self.document_ids = document_ids        # tuple of str: the corpus ids
        self.document_hashes = document_hashes  # (N,) int32: pipeline.text_hash of each document
        self.queries, self.query_ids = queries, query_ids
        self.positives, self.relevant, self.negatives = positives, relevant, negatives
        self.num_negatives = num_negatives
        self.source = source
        self.skipped_queries = skipped_queries  # judged queries without a positive at min_grade, left out
        most = int(positives.lengths().max())
        if positives_per_query == ALL:
            self.slots = most
        elif isinstance(positives_per_query, bool) or not isinstance(positives_per_query, int) or positives_per_query < 1:
            raise ValueError(f"positives must be an int >= 1 or {ALL!r}, got {positives_per_query!r}")
        else:
            self.slots = positives_per_query
        self.positives_per_query = positives_per_query
        if num_negatives and negatives is None:
            raise ValueError(f"num_negatives={num_negatives} needs hard negatives (a mined file): none were given")

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.record_at(i, 0, 0)

    def _texts(self, indices) -> tuple[str, ...]:
        return tuple(self.documents[j] for j in indices)

    def record_at(self, i: int, epoch: int, seed: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range (0..{len(self) - 1})")
        rng = np.random.default_rng((int(seed), int(epoch), i))
        positives = self.positives[i]
        if self.slots == 1:
            text_b: Any = self.documents[int(positives[rng.integers(len(positives))])]
        else:
            picked = positives if len(positives) <= self.slots else (
                positives[np.sort(rng.choice(len(positives), self.slots, replace=False))])
            text_b = self._texts(picked) + (None,) * (self.slots - len(picked))
        record = {"text_a": self.queries[i], "text_b": text_b}
        if self.num_negatives:
            negatives = self.negatives[i]
            k = self.num_negatives
            if len(negatives) == 0:
                negatives = self._random_negatives(i, k, rng)
            if len(negatives) >= k:
                picked = negatives[np.sort(rng.choice(len(negatives), k, replace=False))]
            else:  # all of them, then repeats (Tevatron's rule for short lists)
                picked = np.concatenate([negatives, rng.choice(negatives, k - len(negatives))])
            record["text_n"] = self._texts(picked)
        record["relevant"] = tuple(int(h) for h in self.document_hashes[self.relevant[i]])
        return record

    def _random_negatives(self, i: int, k: int, rng) -> np.ndarray:
        """k corpus documents not relevant to query i, drawn uniformly (for a query without mined ones)."""
        relevant = set(self.relevant[i].tolist())
        if len(self.documents) - len(relevant) < 1:
            raise ValueError(f"query {self.query_ids[i]!r}: every document of the corpus is relevant to it; no "
                             "negative to draw")
        out: list[int] = []
        while len(out) < k:
            j = int(rng.integers(len(self.documents)))
            if j not in relevant:
                out.append(j)
        return np.asarray(out, np.int32)


def _check_grade(min_grade) -> int:
    if isinstance(min_grade, bool) or not isinstance(min_grade, int) or min_grade < 1:
        raise ValueError(f"min_grade must be an int >= 1 (relevance grades > 0 are relevant), got {min_grade!r}")
    return min_grade


def read_hard_negatives(path, query_ids, corpus_ids, relevant: dict[str, set[str]]) -> dict[str, list[str]]:
    """``{query id: [corpus ids]}`` from a mined jsonl (``{"query_id": ..., "negatives": [...]}`` per line).

    Refuses (file:line) an unknown query or corpus id, a query on two lines, and a negative
    judged relevant to its query (it would be trained away from a relevant document).
    """
    path = Path(path)
    queries, corpus = set(query_ids), set(corpus_ids)
    seen: dict[str, int] = {}
    out: dict[str, list[str]] = {}

    def parse(number: int, text: str) -> None:
        row = _split("jsonl", path, number, text)
        if not isinstance(row, dict) or "query_id" not in row or "negatives" not in row:
            raise DataError(path, number, 'expected a JSON object {"query_id": ..., "negatives": [corpus ids]}')
        qid, negatives = str(row["query_id"]), row["negatives"]
        if qid not in queries:
            raise DataError(path, number, f"query_id {qid!r} is not a query of this split")
        if qid in seen:
            raise DataError(path, number, f"query_id {qid!r} again (first on line {seen[qid]}): expected one line "
                                          "per query")
        seen[qid] = number
        if not isinstance(negatives, list) or not all(isinstance(d, (str, int)) and not isinstance(d, bool)
                                                      for d in negatives):
            raise DataError(path, number, f"negatives must be a list of corpus ids, found {negatives!r:.80}")
        for d in map(str, negatives):
            if d not in corpus:
                raise DataError(path, number, f"negative {d!r} is not in corpus.jsonl")
            if d in relevant.get(qid, ()):
                raise DataError(path, number, f"negative {d!r} is judged relevant to query {qid!r} in the qrels "
                                              "(mine again with scripts/mine.py --beir, which excludes them)")
        out[qid] = [str(d) for d in negatives]

    _rows(path, parse, skip_bad=False)
    return out


def read_beir_training(directory, split: str = "train", *, min_grade: int = 1, positives: int | str = 1,
                       hard_negatives=None, num_negatives: int = 0) -> RetrievalRecords:
    """Training records of a BEIR split (see the module docstring).

    Args:
      directory: a BEIR directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).
      split: the qrels split to train on.
      min_grade: relevance >= this is a positive (every relevance > 0 stays relevant: masked).
      positives: positives per query and step: an int m >= 1, or "all".
      hard_negatives: a mined jsonl (``scripts/mine.py --beir``), or None.
      num_negatives: hard negatives per query and step (0: none, even with a file).

    Queries without a positive at ``min_grade`` are left out (counted in ``skipped_queries``).
    """
    directory = Path(directory)
    min_grade = _check_grade(min_grade)
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 0:
        raise ValueError(f"num_negatives must be an int >= 0, got {num_negatives!r}")
    if num_negatives and hard_negatives is None:
        raise ValueError(f"num_negatives={num_negatives} needs a file of mined hard negatives (hard_negatives); "
                         "write one with scripts/mine.py --beir")
    qrels_path = _qrels_path(directory, split)
    corpus_ids, documents = _read_texts(directory / "corpus.jsonl", titles=True)
    all_query_ids, all_queries = _read_texts(directory / "queries.jsonl", titles=False)
    qrels = read_qrels(qrels_path, all_query_ids, corpus_ids)
    row_of = {d: j for j, d in enumerate(corpus_ids)}

    from embedjax.data.pipeline import text_hash  # the hash collate gives the same text

    keep, pos_lists, rel_lists = [], [], []
    for q, qid in enumerate(all_query_ids):
        judged = qrels.get(qid, {})
        # best grade first, then corpus order: the order "all" fills slots in
        pos = sorted((-g, row_of[d]) for d, g in judged.items() if g >= min_grade)
        if not pos:
            continue
        keep.append(q)
        pos_lists.append([j for _, j in pos])
        rel_lists.append(sorted(row_of[d] for d, g in judged.items() if g > 0))
    if not keep:
        raise DataError(qrels_path, None, f"no query has a document of relevance >= {min_grade} (min_grade): "
                                          "nothing to train on")
    query_ids = tuple(all_query_ids[q] for q in keep)
    negatives = None
    if num_negatives:
        relevant_ids = {qid: {d for d, g in qrels[qid].items() if g > 0} for qid in query_ids}
        mined = read_hard_negatives(hard_negatives, query_ids, corpus_ids, relevant_ids)
        lacking = [qid for qid in query_ids if not mined.get(qid)]
        if len(lacking) == len(query_ids):
            raise DataError(Path(hard_negatives), None, f"no training query of {directory} ({split}) has a hard "
                                                       "negative here: is it mined for this split?")
        if lacking:
            log.warning("%s: %d of %d training queries have no mined negative (first: %r): they draw random "
                        "documents not relevant to them", hard_negatives, len(lacking), len(query_ids), lacking[0])
        negatives = _Ragged.from_lists([[row_of[d] for d in mined.get(qid, [])] for qid in query_ids])
    hashes = np.fromiter((text_hash(t) for t in documents), np.int32, count=len(documents))
    records = RetrievalRecords(
        documents=documents, document_ids=corpus_ids, document_hashes=hashes,
        queries=tuple(all_queries[q] for q in keep), query_ids=query_ids,
        positives=_Ragged.from_lists(pos_lists), relevant=_Ragged.from_lists(rel_lists), negatives=negatives,
        positives_per_query=positives, num_negatives=num_negatives, source=f"{directory} ({split})",
        skipped_queries=sum(1 for qid in all_query_ids if qid in qrels) - len(keep))
    return records


def write_hard_negatives(path, query_ids, negatives, scores=None) -> int:
    """Writes ``{"query_id", "negatives": [corpus ids], ["scores": [...]]}`` lines; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for n, (qid, negs) in enumerate(zip(query_ids, negatives)):
            row = {"query_id": qid, "negatives": list(negs)}
            if scores is not None:
                row["scores"] = [float(s) for s in scores[n]]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(query_ids)


__all__ = ["ALL", "RetrievalRecords", "read_beir_training", "read_hard_negatives", "write_hard_negatives"]
