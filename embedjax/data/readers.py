"""Readers for the text files embedjax trains and evaluates on.

Pure Python, no TensorFlow, no grain. Every reader returns a ``Rows`` list of small
dataclasses (or strings, for one sentence per line) and reports bad input precisely:
``DataError`` names the file, the 1-based line number and what was expected. With
``skip_bad=True`` a bad row is skipped instead, counted (``rows.skipped``) and the
count logged with the first error, so a silently shrinking dataset is still visible.

Kinds of examples (the field names are the column-mapping keys everywhere):

- ``"sentences"``: ``text_a`` -> ``str`` (unsupervised SimCSE);
- ``"pairs"``: ``text_a, text_b`` -> ``Pair`` (anchor, positive);
- ``"triplets"``: ``text_a, text_b, text_n`` -> ``Triplet`` (anchor, positive, hard negative(s));
- ``"scored"``: ``text_a, text_b, score`` -> ``ScoredPair`` (CoSENT / AnglE);
- ``"labelled"``: ``text_a, text_b, label`` (0 / 1) -> ``LabelledPair`` (pair classification);
- ``"distill"``: ``text_a, text_b, text_n, teacher`` -> ``DistillRecord`` (mined negatives with a
  teacher's scores, for listwise-KL / MarginMSE distillation).

Several hard negatives per record: in jsonl, ``text_n`` may be a non-empty list of texts
(``Triplet.text_n`` is then a tuple of str). A ``"distill"`` row holds
``{"text_a": q, "text_b": p, "text_n": [n_1, ..., n_k], "teacher": [s(q,p), s(q,n_1), ..., s(q,n_k)]}``:
``teacher`` is always a list of 1 + k finite numbers, the positive's score first; ``text_n``
may be one string (k = 1). In tsv/csv, a distill ``text_n`` cell that starts with ``[`` is read as
a JSON list of texts (any other cell is one text), and the ``teacher`` cell must be a JSON list
(``[0.9, 0.1]``); a triplets tsv/csv cell is always one text. Every row of a file must have the
same number k of negatives (and a triplets file either single texts or lists throughout):
batches stack them as (rows, k, tokens).

Formats: ``tsv`` (split on tabs, no quoting), ``csv`` (the ``csv`` module, RFC 4180
quoting, one record per line: a quoted field may not span lines, which makes an
unbalanced quote an error on its own line instead of swallowing the rest of the
file), ``jsonl`` (one JSON object, or array, per line) and ``txt`` (one sentence per
line). Blank lines are ignored everywhere, except by ``read_sentences(path, keep_blank=True)``
(txt only), which returns one string per line, ``""`` for a blank one (``scripts/encode.py``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class DataError(ValueError):
    """Malformed input: names the file, the line and what was expected."""

    def __init__(self, path, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.message = Path(path), line, message


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two texts that mean the same thing (anchor ``text_a``, positive ``text_b``)."""

    text_a: str
    text_b: str


@dataclasses.dataclass(frozen=True)
class Triplet:
    """Anchor ``text_a``, positive ``text_b`` and hard negative ``text_n``: one text, or a tuple
    of k texts (several mined negatives; the same k for every record of a dataset)."""

    text_a: str
    text_b: str
    text_n: str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DistillRecord:
    """Query ``text_a``, positive ``text_b``, k mined negatives ``text_n`` and the teacher's scores
    ``teacher`` = (s(a, b), s(a, n_1), ..., s(a, n_k)): 1 + k floats, the positive's first."""

    text_a: str
    text_b: str
    text_n: tuple[str, ...]
    teacher: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class ScoredPair:
    """Two texts and a gold similarity score on the dataset's own scale."""

    text_a: str
    text_b: str
    score: float


@dataclasses.dataclass(frozen=True)
class NLIPair(ScoredPair):
    """A SICK pair: relatedness score plus entailment judgment."""

    label: str = ""


@dataclasses.dataclass(frozen=True)
class LabelledPair:
    """Two texts and a binary label: 1 = the pair belongs together (duplicate, paraphrase,
    entailment), 0 = it does not (pair classification)."""

    text_a: str
    text_b: str
    label: int


class Rows(list):
    """A list of parsed rows; ``lines``: the 1-based line of each row in its file;
    ``skipped``: how many bad rows were left out (``skip_bad=True``)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.lines: list[int] = []
        self.skipped = 0


# kind -> (fields in order, constructor from a {field: value} dict)
RECORD_KINDS: dict[str, tuple[tuple[str, ...], Callable[[dict], Any]]] = {
    "sentences": (("text_a",), lambda f: f["text_a"]),
    "pairs": (("text_a", "text_b"), lambda f: Pair(**f)),
    "triplets": (("text_a", "text_b", "text_n"), lambda f: Triplet(**f)),
    "scored": (("text_a", "text_b", "score"), lambda f: ScoredPair(**f)),
    "labelled": (("text_a", "text_b", "label"), lambda f: LabelledPair(**f)),
    "distill": (("text_a", "text_b", "text_n", "teacher"), lambda f: DistillRecord(**f)),
}
FORMATS = ("tsv", "csv", "jsonl", "txt")
_SUFFIXES = {".tsv": "tsv", ".tab": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "txt"}


# ---------------------------------------------------------------------------- lines and rows


def _raw_lines(path: Path, keep_blank: bool = False) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each non-blank line (each line with ``keep_blank``,
    the text after a final newline not counting as one); a file without a non-blank line raises
    DataError. Streams the file: a million-document corpus is never held twice."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    blank: list[tuple[int, bytes]] = []  # blank lines seen before the first non-blank one (keep_blank)
    seen_text = False
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip(b"\n").rstrip(b"\r")
            if line.strip():
                if not seen_text:
                    seen_text = True
                    yield from blank
                yield number, line
            elif keep_blank:
                if seen_text:
                    yield number, line
                else:
                    blank.append((number, line))
    if not seen_text:
        raise DataError(path, None, "file is empty (expected at least one row)")


def _decode(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise DataError(path, number, f"undecodable bytes at column {err.start + 1} (expected UTF-8 text)") from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; an empty file or undecodable bytes raise DataError."""
    for number, raw in _raw_lines(path):
        yield number, _decode(path, number, raw)


def _score(value: Any, lo: float | None, hi: float | None, path, line: int, column: str) -> float:
    """``value`` as a finite float in [lo, hi] (no range check when lo/hi is None)."""
    expected = f"expected a number in {lo}..{hi}" if lo is not None else "expected a finite number"
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        score = float(value)
    except (TypeError, ValueError):
        raise DataError(path, line, f"{column} {value!r} is not a number ({expected})") from None
    if not math.isfinite(score) or (lo is not None and not lo <= score <= hi):
        raise DataError(path, line, f"{column} {score} is out of range ({expected})")
    return score


def _text_list(value: Any, path, line: int, column: str) -> tuple[str, ...]:
    """``value`` (a JSON array) as a non-empty tuple of non-empty strings."""
    if not isinstance(value, list) or not value:
        raise DataError(path, line, f"{column} must be a non-empty list of texts, found {value!r}")
    for j, text in enumerate(value):
        if not isinstance(text, str):
            raise DataError(path, line, f"{column} item {j} must be a string, found {type(text).__name__} {text!r}")
        if not text.strip():
            raise DataError(path, line, f"{column} item {j} is empty (expected non-empty text)")
    return tuple(value)


def _number_list(value: Any, length: int, what: str, path, line: int, column: str) -> tuple[float, ...]:
    """``value`` (a JSON array) as a tuple of ``length`` finite floats; ``what`` describes them."""
    expected = f"expected a list of {length} finite numbers: {what}"
    if not isinstance(value, list):
        raise DataError(path, line, f"{column} is {type(value).__name__} {value!r} ({expected})")
    if len(value) != length:
        raise DataError(path, line, f"{column} has {len(value)} number(s) ({expected})")
    out = []
    for j, x in enumerate(value):
        # JSON strings and booleans are not scores, even when float() would take them.
        try:
            ok = not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(float(x))
        except OverflowError:  # an integer beyond float range
            ok = False
        if not ok:
            raise DataError(path, line, f"{column} item {j} {x!r} is not a finite number ({expected})")
        out.append(float(x))
    return tuple(out)


def _json_cell(text: str, what: str, path, line: int, column: str) -> Any:
    """A tsv/csv cell that holds JSON (a distill record's list of negatives or of teacher scores)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(path, line, f"{column} {text!r} is not valid JSON ({err.msg} at column {err.colno}): "
                                    f"expected {what}") from None


def _negatives_form(count: int | None) -> str:
    return "a single text, not a list" if count is None else f"{count} negative(s)"


_TRUE, _FALSE = ("1", "true", "1.0"), ("0", "false", "0.0")


def parse_label(value: Any, path, line: int, column: str = "label") -> int:
    """``value`` as 0 or 1: ints/floats 0 and 1, JSON booleans, strings "0", "1", "true", "false" (any case)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return 1
        if text in _FALSE:
            return 0
    raise DataError(path, line, f"{column} {value!r} is not a binary label (expected 0, 1, true or false)")


def _rows(
    path: Path,
    parse: Callable[[int, str], T],
    *,
    skip_bad: bool,
    header: bool | Callable[[int, str], None] = False,
    keep_blank: bool = False,
) -> Rows:
    """``parse(line number, text)`` over the non-blank lines of ``path``.

    ``header``: True skips the first non-blank line, a callable consumes it (and may
    raise DataError: a bad header is never skippable). A DataError from a row (or
    undecodable bytes in it) is raised, or with ``skip_bad`` counted and logged.
    """
    out, skipped, first = Rows(), 0, None
    lines = _raw_lines(path, keep_blank)
    if header:
        number, raw = next(lines)
        text = _decode(path, number, raw)
        if callable(header):
            header(number, text)
    for number, raw in lines:
        try:
            out.append(parse(number, _decode(path, number, raw)))
            out.lines.append(number)
        except DataError as err:
            if not skip_bad:
                raise
            skipped += 1
            first = first or err
    out.skipped = skipped
    if skipped:
        log.warning("%s: skipped %d bad row(s); the first: %s", path, skipped, first)
    if not out:
        why = f"all {skipped} row(s) were bad" if skipped else "the file has a header but no rows"
        raise DataError(path, None, f"no usable rows ({why}; expected at least one)")
    return out


# ---------------------------------------------------------------------------- STS-B and SICK


def read_stsb(path, *, skip_bad: bool = False) -> Rows:
    """The STS benchmark's tab-separated files (genre, file, year, id, score 0-5, s1, s2[, extra...]).

    Some lines carry extra trailing columns (the source of the pair); they are ignored.
    """
    path = Path(path)

    def parse(line: int, text: str) -> ScoredPair:
        f = text.split("\t")
        if len(f) < 7:
            raise DataError(path, line, f"expected >= 7 tab-separated columns (genre, file, year, id, score, "
                                        f"sentence1, sentence2), found {len(f)}")
        return ScoredPair(f[5], f[6], _score(f[4], 0.0, 5.0, path, line, "score"))

    return _rows(path, parse, skip_bad=skip_bad)


SICK_LABELS = ("ENTAILMENT", "NEUTRAL", "CONTRADICTION")


def read_sick(path, *, skip_bad: bool = False) -> Rows:
    """SICK files (header; pair_ID, sentence_A, sentence_B, relatedness_score 1-5, entailment_judgment)."""
    path = Path(path)

    def parse(line: int, text: str) -> NLIPair:
        f = text.split("\t")
        if len(f) < 5:
            raise DataError(path, line, f"expected 5 tab-separated columns (pair_ID, sentence_A, sentence_B, "
                                        f"relatedness_score, entailment_judgment), found {len(f)}")
        label = f[4].strip().upper()
        if label not in SICK_LABELS:
            raise DataError(path, line, f"entailment_judgment {f[4]!r} is not one of {SICK_LABELS}")
        return NLIPair(f[1], f[2], _score(f[3], 1.0, 5.0, path, line, "relatedness_score"), label)

    return _rows(path, parse, skip_bad=skip_bad, header=True)


def sick_triplets(pairs: Iterable[NLIPair], *, symmetric: bool = True) -> list[Triplet]:
    """Supervised-SimCSE triplets (anchor, entailed positive, contradicting hard negative) from SICK.

    The rule: every ENTAILMENT pair makes its sentence B a positive of sentence A and
    every CONTRADICTION pair makes B a hard negative of A. With ``symmetric`` (the
    default) each pair also counts from B to A: SICK lists a sentence sometimes as A,
    sometimes as B, contradiction is symmetric, and a contrastive positive only needs
    to be close in meaning (InfoNCE treats the two sides alike). On SICK_train this
    gives 532 triplets instead of 141. A sentence that is both a positive and a
    negative of the same anchor (conflicting labels) is dropped from both; a sentence is
    never its own partner. Each anchor that has at least one positive and one negative
    emits one triplet per positive, the negatives taken in turn (in file order), so no
    positive is repeated. Output order: anchors by first appearance, then file order.
    """
    positives: dict[str, dict[str, None]] = {}
    negatives: dict[str, dict[str, None]] = {}
    for p in pairs:
        table = {"ENTAILMENT": positives, "CONTRADICTION": negatives}.get(p.label)
        if table is None:
            continue
        directions = ((p.text_a, p.text_b), (p.text_b, p.text_a)) if symmetric else ((p.text_a, p.text_b),)
        for anchor, other in directions:
            if anchor != other:
                table.setdefault(anchor, {})[other] = None
    out = []
    for anchor, pos in positives.items():
        neg = negatives.get(anchor, {})
        good_neg = [n for n in neg if n not in pos]
        good_pos = [p for p in pos if p not in neg]
        if good_neg:
            out.extend(Triplet(anchor, p, good_neg[i % len(good_neg)]) for i, p in enumerate(good_pos))
    return out


def read_sick_triplets(path, *, symmetric: bool = True, skip_bad: bool = False) -> list[Triplet]:
    """``sick_triplets(read_sick(path))``: SICK as supervised-SimCSE triplets."""
    return sick_triplets(read_sick(path, skip_bad=skip_bad), symmetric=symmetric)


# ---------------------------------------------------------------------------- generic files


def infer_format(path, format: str | None = None, *, default: str | None = None) -> str:
    """``format`` if given, else from the file suffix (.tsv .csv .jsonl .txt), else ``default``."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        return format
    found = _SUFFIXES.get(Path(path).suffix.lower(), default)
    if found is None:
        raise ValueError(f"{path}: cannot tell the format from the suffix; pass format= one of {FORMATS}")
    return found


def _column_map(kind: str, fmt: str, columns: Mapping[str, str | int] | None) -> dict[str, str | int]:
    """The column of each field: a name (header / JSON key) or a 0-based index."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"kind must be one of {tuple(RECORD_KINDS)}, got {kind!r}")
    fields = RECORD_KINDS[kind][0]
    if fmt == "txt" and kind != "sentences":
        raise ValueError(f"format 'txt' holds one sentence per line; kind {kind!r} needs tsv, csv or jsonl")
    if columns is None:
        return {f: (f if fmt == "jsonl" else i) for i, f in enumerate(fields)}
    columns = dict(columns)
    unknown, missing = set(columns) - set(fields), [f for f in fields if f not in columns]
    if unknown or missing:
        raise ValueError(f"columns for kind {kind!r} must map exactly {fields}; "
                         f"unknown {sorted(unknown)}, missing {missing}")
    for field, key in columns.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)) or (isinstance(key, int) and key < 0):
            raise ValueError(f"column of {field!r} must be a name or a 0-based index, got {key!r}")
    return columns


def _split(fmt: str, path: Path, number: int, text: str):
    """One line as a list of fields (tsv, csv, txt) or a JSON value (jsonl)."""
    if fmt == "tsv":
        return text.split("\t")
    if fmt == "csv":
        try:
            return next(csv.reader([text], strict=True))
        except csv.Error as err:
            raise DataError(path, number, f"malformed CSV ({err}): expected comma-separated fields, a quoted "
                                          f"field closed by a matching double quote on the same line") from None
    if fmt == "jsonl":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, number, f"invalid JSON ({err.msg} at column {err.colno}): "
                                          f"expected one JSON object per line") from None
        if not isinstance(value, (dict, list)):
            raise DataError(path, number, f"expected a JSON object (or array) per line, found {type(value).__name__}")
        return value
    return [text.strip()]


def read_records(
    path,
    kind: str,
    *,
    format: str | None = None,
    columns: Mapping[str, str | int] | None = None,
    header: bool | None = None,
    num_columns: int | None = None,
    score_range: tuple[float, float] | None = None,
    skip_bad: bool = False,
    keep_blank: bool = False,
) -> Rows:
    """Reads examples of ``kind`` ("sentences", "pairs", "triplets", "scored", "labelled", "distill") from one file.

    Args:
      path: the file.
      kind: what each row holds (see the module docstring).
      format: "tsv", "csv", "jsonl" or "txt"; default from the suffix ("txt" for
        sentences when the suffix says nothing).
      columns: {field: column}, a column being a header name / JSON key or a 0-based
        index (tsv/csv, or JSON arrays). Default: the fields in order (tsv/csv) or the
        field names as JSON keys (jsonl).
      header: tsv/csv start with a header row; default: True iff a column is named.
      num_columns: the column count every tsv/csv row must have; default: the header's,
        else the first row's (a tab or comma inside a text shows up as a wrong count).
      score_range: (lo, hi) a score must lie in (inclusive); default: any finite number.
      skip_bad: skip, count and log bad rows instead of raising ``DataError``.
      keep_blank: (txt only) one row per line, ``""`` for a blank line, so row i is line i + 1.

    Returns a ``Rows`` list (``.skipped`` = bad rows left out) of ``str`` / ``Pair`` /
    ``Triplet`` / ``ScoredPair`` / ``LabelledPair`` / ``DistillRecord``. Lists of negatives and
    teacher scores: see the module docstring (the same k on every row, else ``DataError``).
    """
    parser = record_parser(path, kind, format=format, columns=columns, header=header, num_columns=num_columns,
                           score_range=score_range, keep_blank=keep_blank)
    return _rows(Path(path), parser.parse_line, skip_bad=skip_bad, header=parser.take_header or False,
                 keep_blank=keep_blank)


@dataclasses.dataclass(frozen=True)
class RecordParser:
    """How ``read_records`` turns one file's rows into records (``record_parser``), for readers that
    fetch the rows themselves (``embedjax.data.streaming``).

    ``take_header(line, text)`` reads a tsv/csv header row (None: the file has none);
    ``parse_line(line, text)`` parses one non-blank line, ``parse_row(line, row)`` a row already
    split into cells (a list) or keyed by column (a dict, as a jsonl object). Both raise
    ``DataError`` naming the file and ``line``. The first row parsed fixes what the rest must
    match (the column count, the number of hard negatives), as in ``read_records``: parse the
    header, then the first row, before any other.
    """

    format: str
    fields: tuple[str, ...]
    take_header: Callable[[int, str], None] | None
    parse_line: Callable[[int, str], Any]
    parse_row: Callable[[int, Any], Any]


def record_parser(
    path,
    kind: str,
    *,
    format: str | None = None,
    columns: Mapping[str, str | int] | None = None,
    header: bool | None = None,
    num_columns: int | None = None,
    score_range: tuple[float, float] | None = None,
    keep_blank: bool = False,
) -> RecordParser:
    """The ``RecordParser`` ``read_records`` reads ``path`` with (the same arguments, less ``skip_bad``)."""
    path = Path(path)
    fmt = infer_format(path, format, default="txt" if kind == "sentences" else None)
    cols = _column_map(kind, fmt, columns)
    if keep_blank and fmt != "txt":
        raise ValueError(f"keep_blank applies to txt files (one sentence per line), not {fmt}")
    shown = dict(cols)  # as the user named them, for messages
    fields, make = RECORD_KINDS[kind]
    lo, hi = (None, None) if score_range is None else map(float, score_range)
    tabular = fmt in ("tsv", "csv")
    if header is None:
        header = tabular and any(isinstance(k, str) for k in cols.values())
    if header and not tabular:
        raise ValueError(f"header applies to tsv/csv files, not {fmt}")
    if tabular and not header and any(isinstance(k, str) for k in cols.values()):
        raise ValueError(f"columns {cols} name columns, so the file needs header=True")
    unit = {"tsv": "tab-separated", "csv": "comma-separated"}.get(fmt, "")
    shape = {"count": num_columns, "why": "num_columns"}

    def take_header(number: int, text: str) -> None:
        names = [n.strip() for n in _split(fmt, path, number, text)]
        for field, key in cols.items():
            if isinstance(key, str):
                if key not in names:
                    raise DataError(path, number, f"missing column {key!r} (for {field}): expected it in the "
                                                  f"header, which has {names}")
                cols[field] = names.index(key)
        if shape["count"] is None:
            shape.update(count=len(names), why=f"as in the header on line {number}")

    def get(row, field: str, number: int):
        key = cols[field]
        if isinstance(row, dict):
            if not isinstance(key, str):
                raise DataError(path, number, f"expected a JSON array (column {key} for {field}), found an object")
            if key not in row:
                raise DataError(path, number, f"missing key {key!r} (for {field}): expected a JSON object with "
                                              f"keys {[shown[f] for f in fields]}")
            return row[key]
        if isinstance(key, str):
            raise DataError(path, number, f"expected a JSON object with key {key!r} (for {field}), found an array")
        if key >= len(row):
            raise DataError(path, number, f"missing column {key + 1} (for {field}): expected at least {key + 1} "
                                          f"columns, found {len(row)}")
        return row[key]

    def negatives(value, number: int, column: str) -> str | tuple[str, ...]:
        """A text or a tuple of texts (always a tuple for distill), with the file's k."""
        if tabular and kind == "distill" and isinstance(value, str) and value.lstrip().startswith("["):
            value = _json_cell(value, "a JSON list of texts", path, number, column)
        if isinstance(value, list):
            value = _text_list(value, path, number, column)
        elif not isinstance(value, str):
            raise DataError(path, number, f"{column} must be a text or a non-empty list of texts, found "
                                          f"{type(value).__name__} {value!r}")
        elif not value.strip():
            raise DataError(path, number, f"{column} is empty (expected non-empty text)")
        elif kind == "distill":
            value = (value,)
        count = len(value) if isinstance(value, tuple) else None
        first = shape.get("negatives")
        if first is not None and first[0] != count:
            raise DataError(path, number, f"{column} holds {_negatives_form(count)}, expected "
                                          f"{_negatives_form(first[0])} as on line {first[1]}, the first good row "
                                          f"(every row of a file needs the same number of hard negatives)")
        return value

    def teacher(value, k: int, number: int, column: str) -> tuple[float, ...]:
        if tabular and isinstance(value, str):
            value = _json_cell(value, f"a JSON list of {1 + k} numbers", path, number, column)
        what = f"the teacher's score of text_b, then of each of the {k} negative(s)"
        return _number_list(value, 1 + k, what, path, number, column)

    def parse(number: int, text: str):
        return parse_row(number, _split(fmt, path, number, text))

    def parse_row(number: int, row):
        if tabular:
            if shape["count"] is None:
                shape.update(count=len(row), why=f"as on line {number}, the first row")
            if len(row) != shape["count"]:
                raise DataError(path, number, f"expected {shape['count']} {unit} columns ({shape['why']}), "
                                              f"found {len(row)}")
        values = {}
        for field in fields:
            value = get(row, field, number)
            if field == "text_n" and kind in ("triplets", "distill"):
                values[field] = negatives(value, number, f"text_n (column {shown[field]!r})")
            elif field == "teacher":
                values[field] = teacher(value, len(values["text_n"]), number, f"teacher (column {shown[field]!r})")
            elif field == "score":
                values[field] = _score(value, lo, hi, path, number, f"score (column {shown[field]!r})")
            elif field == "label":
                values[field] = parse_label(value, path, number, f"label (column {shown[field]!r})")
            elif not isinstance(value, str):
                raise DataError(path, number, f"{field} must be a string, found {type(value).__name__} {value!r}")
            elif not value.strip() and not keep_blank:
                raise DataError(path, number, f"{field} (column {shown[field]!r}) is empty (expected non-empty text)")
            else:
                values[field] = value
        if "text_n" in values and "negatives" not in shape:  # the first good row sets k for the file
            n = values["text_n"]
            shape["negatives"] = (len(n) if isinstance(n, tuple) else None, number)
        return make(values)

    def parse_or_explain(number: int, text: str):
        """``parse``; a first row that fails in a file read without a header may BE a header: say how
        to read it as one (its cells as the column names)."""
        first = "parsed" not in shape
        shape["parsed"] = True
        try:
            return parse(number, text)
        except DataError as err:
            if not (first and tabular and not header):
                raise
            cells = [c.strip() for c in _split(fmt, path, number, text)]
            named = {f: cells[k] for f, k in cols.items() if isinstance(k, int) and k < len(cells)}
            raise DataError(path, number, f"{err.message}. If line {number} is a header, name the columns so it is "
                                          f"read as one: columns={named} (data.columns in a training config)") from None

    return RecordParser(format=fmt, fields=fields, take_header=take_header if header else None,
                        parse_line=parse_or_explain if tabular and not header else parse, parse_row=parse_row)


def read_sentences(path, **kw) -> Rows:
    """One sentence per line (``format="txt"``, surrounding whitespace stripped) -> ``list[str]``.

    Blank lines are skipped; with ``keep_blank=True`` (txt) each line gives one row, ``""`` if blank.

    Also reads one column of a tsv/csv/jsonl file with ``columns={"text_a": ...}``.
    """
    return read_records(path, "sentences", **kw)


def read_pairs(path, **kw) -> Rows:
    """(anchor, positive) pairs -> ``list[Pair]``; keywords as ``read_records``."""
    return read_records(path, "pairs", **kw)


def read_triplets(path, **kw) -> Rows:
    """(anchor, positive, hard negative) triplets -> ``list[Triplet]``; keywords as ``read_records``."""
    return read_records(path, "triplets", **kw)


def read_scored_pairs(path, **kw) -> Rows:
    """Pairs with a similarity score -> ``list[ScoredPair]``; keywords as ``read_records``."""
    return read_records(path, "scored", **kw)


def read_distill(path, **kw) -> Rows:
    """Mined negatives with teacher scores -> ``list[DistillRecord]``; keywords as ``read_records``."""
    return read_records(path, "distill", **kw)
