"""Readers for retrieval (BEIR layout) and reranking (MTEB jsonl) evaluation sets.

BEIR (arXiv:2104.08663), as MTEB (arXiv:2210.07316) also ships its retrieval tasks::

    DIR/corpus.jsonl       {"_id": "d1", "title": "...", "text": "..."}   one document per line
    DIR/queries.jsonl      {"_id": "q1", "text": "..."}                   one query per line
    DIR/qrels/<split>.tsv  query-id <TAB> corpus-id <TAB> score            header line first

A document is embedded as ``title + " " + text``, or just ``text`` when the title is empty
or absent (BEIR's and MTEB's rule). Relevance scores are integers (graded; > 0 is relevant).

Reranking (MTEB's format): one JSON object per line,
``{"query": str, "positive": [str, ...], "negative": [str, ...]}`` (a single string is read
as a one-element list, as sentence-transformers' ``RerankingEvaluator`` does).

Every error is a ``DataError`` naming the file, the 1-based line and what was expected.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from embedjax.data.readers import DataError, _rows, _split

QRELS_HEADER = ("query-id", "corpus-id", "score")


@dataclasses.dataclass(frozen=True)
class BeirData:
    """A BEIR retrieval set: parallel id / text tuples and ``qrels[qid][docid] = relevance``."""

    corpus_ids: tuple[str, ...]
    corpus_texts: tuple[str, ...]
    query_ids: tuple[str, ...]
    query_texts: tuple[str, ...]
    qrels: dict[str, dict[str, int]]
    split: str = "test"


@dataclasses.dataclass(frozen=True)
class RerankingSample:
    """One reranking query with its relevant (``positive``) and irrelevant (``negative``) candidates."""

    query: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


def _json_object(path: Path, number: int, text: str) -> dict:
    value = _split("jsonl", path, number, text)
    if not isinstance(value, dict):
        raise DataError(path, number, "expected a JSON object per line, found an array")
    return value


def _id(row: Mapping[str, Any], path: Path, number: int, keys: list[str]) -> str:
    """The ``_id`` of a row as a string (BEIR ids are strings; integer ids are accepted)."""
    if "_id" not in row:
        raise DataError(path, number, f"missing key '_id': expected a JSON object with keys {keys}")
    value = row["_id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        raise DataError(path, number, f"_id must be a non-empty string, found {type(value).__name__} {value!r}")
    return str(value)


def _string(row: Mapping[str, Any], key: str, path: Path, number: int, keys: list[str], *,
            required: bool = True) -> str:
    if key not in row:
        if not required:
            return ""
        raise DataError(path, number, f"missing key {key!r}: expected a JSON object with keys {keys}")
    value = row[key]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(path, number, f"{key} must be a string, found {type(value).__name__} {value!r}")
    return value


def _read_texts(path: Path, *, titles: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(ids, texts) of a corpus or queries file; duplicate ids raise, naming both lines."""
    seen: dict[str, int] = {}
    keys = ["_id", "title", "text"] if titles else ["_id", "text"]

    def parse(number: int, text: str) -> tuple[str, str]:
        row = _json_object(path, number, text)
        doc_id = _id(row, path, number, keys)
        if doc_id in seen:
            raise DataError(path, number, f"duplicate _id {doc_id!r} (first on line {seen[doc_id]}): "
                                          f"expected every _id once")
        seen[doc_id] = number
        body = _string(row, "text", path, number, keys)
        title = _string(row, "title", path, number, keys, required=False) if titles else ""
        return doc_id, (f"{title} {body}" if title.strip() else body)

    rows = _rows(path, parse, skip_bad=False)
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


def read_corpus_texts(directory) -> tuple[str, ...]:
    """Every document of a BEIR directory's ``corpus.jsonl``, in file order, joined as the
    retrieval evaluator joins them (``title + " " + text``): a corpus as plain texts, e.g. for
    unsupervised domain adaptation (``data.kind="beir_corpus"``)."""
    path = Path(directory) / "corpus.jsonl"
    if not path.is_file():
        raise DataError(path, None, "no corpus.jsonl: expected a BEIR directory (corpus.jsonl, queries.jsonl, qrels/)")
    return _read_texts(path, titles=True)[1]


def _qrels_path(directory: Path, split: str) -> Path:
    path = directory / "qrels" / f"{split}.tsv"
    if not path.is_file():
        found = sorted(p.stem for p in (directory / "qrels").glob("*.tsv"))
        raise DataError(path, None, f"no qrels for split {split!r} (expected {path.name}); "
                                    f"splits found: {found or 'none'}")
    return path


def read_qrels(path, query_ids, corpus_ids) -> dict[str, dict[str, int]]:
    """``{query-id: {corpus-id: relevance}}`` from a BEIR qrels tsv (header ``query-id corpus-id score``).

    Every row needs 3 tab-separated columns, an integer score, and ids present in
    ``query_ids`` / ``corpus_ids``; a (query, document) pair may appear only once.
    """
    path = Path(path)
    queries, corpus = set(query_ids), set(corpus_ids)
    out: dict[str, dict[str, int]] = {}
    seen: dict[tuple[str, str], int] = {}

    def header(number: int, text: str) -> None:
        names = tuple(f.strip() for f in text.split("\t"))
        if len(names) != 3 or _is_int(names[2]):
            raise DataError(path, number, f"expected the header {' <TAB> '.join(QRELS_HEADER)}, found {text!r}")

    def parse(number: int, text: str) -> None:
        f = [x.strip() for x in text.split("\t")]
        if len(f) != 3:
            raise DataError(path, number, f"expected 3 tab-separated columns (query-id, corpus-id, score), "
                                          f"found {len(f)}")
        qid, did, score = f
        if not _is_int(score):
            raise DataError(path, number, f"score {score!r} is not an integer (expected a graded relevance "
                                          f"such as 0, 1, 2)")
        if qid not in queries:
            raise DataError(path, number, f"query-id {qid!r} is not in queries.jsonl")
        if did not in corpus:
            raise DataError(path, number, f"corpus-id {did!r} is not in corpus.jsonl")
        if (qid, did) in seen:
            raise DataError(path, number, f"duplicate judgment of ({qid!r}, {did!r}) (first on line "
                                          f"{seen[qid, did]}): expected each pair once")
        seen[qid, did] = number
        out.setdefault(qid, {})[did] = int(score)

    _rows(path, parse, skip_bad=False, header=header)
    return out


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_beir(directory, split: str = "test") -> BeirData:
    """Reads a BEIR directory: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

    Documents become ``title + " " + text`` (``text`` alone when the title is empty). All
    queries are kept; the evaluator scores those with at least one relevant (> 0) judgment.
    """
    directory = Path(directory)
    qrels_path = _qrels_path(directory, split)
    corpus_ids, corpus_texts = _read_texts(directory / "corpus.jsonl", titles=True)
    query_ids, query_texts = _read_texts(directory / "queries.jsonl", titles=False)
    qrels = read_qrels(qrels_path, query_ids, corpus_ids)
    return BeirData(corpus_ids, corpus_texts, query_ids, query_texts, qrels, split)


def _candidates(row: Mapping[str, Any], key: str, path: Path, number: int) -> tuple[str, ...]:
    if key not in row:
        raise DataError(path, number, f"missing key {key!r}: expected a JSON object with keys "
                                      f"['query', 'positive', 'negative']")
    value = row[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(path, number, f"{key} must be a list of strings, found {value!r:.80}")
    return tuple(value)


def read_reranking(path) -> list[RerankingSample]:
    """MTEB reranking jsonl: ``{"query": str, "positive": [str, ...], "negative": [str, ...]}`` per line.

    ``positive`` must hold at least one text; ``negative`` may be empty (the evaluator skips
    such a query, as MTEB and sentence-transformers do).
    """
    path = Path(path)

    def parse(number: int, text: str) -> RerankingSample:
        row = _json_object(path, number, text)
        if "query" not in row:
            raise DataError(path, number, "missing key 'query': expected a JSON object with keys "
                                          "['query', 'positive', 'negative']")
        query = row["query"]
        if not isinstance(query, str):
            raise DataError(path, number, f"query must be a string, found {type(query).__name__} {query!r}")
        positive = _candidates(row, "positive", path, number)
        if not positive:
            raise DataError(path, number, "positive is empty (expected at least one relevant text)")
        return RerankingSample(query, positive, _candidates(row, "negative", path, number))

    return _rows(path, parse, skip_bad=False)
