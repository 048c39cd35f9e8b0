"""Readers for binary-labelled pairs (pair classification: duplicate / paraphrase / entailment).

``read_labelled_pairs`` reads ``text_a, text_b, label`` rows from tsv, csv or jsonl, the label
being 0 or 1 (also ``true`` / ``false``, any case). Bad rows raise ``DataError`` naming the file
and the 1-based line (wrong column count, a label that is not 0/1, empty text, bad JSON), or with
``skip_bad=True`` are counted (``rows.skipped``) and logged, as in ``embedjax.data.readers``.

``sick_binary`` / ``read_sick_binary`` turn SICK into pair classification: ENTAILMENT = 1,
NEUTRAL and CONTRADICTION = 0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping

from embedjax.data.readers import DataError, NLIPair, Rows, _rows, _split, infer_format, read_sick

FIELDS = ("text_a", "text_b", "label")
_TRUE, _FALSE = ("1", "true", "1.0"), ("0", "false", "0.0")


@dataclasses.dataclass(frozen=True)
class LabelledPair:
    """Two texts and a binary label: 1 = the pair belongs together (duplicate, paraphrase,
    entailment), 0 = it does not."""

    text_a: str
    text_b: str
    label: int


def parse_label(value: Any, path, line: int, column: str = "label") -> int:
    """``value`` as 0 or 1: ints/floats 0 and 1, JSON booleans, strings "0", "1", "true", "false"."""
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


def _columns(fmt: str, columns: Mapping[str, str | int] | None) -> dict[str, str | int]:
    if fmt not in ("tsv", "csv", "jsonl"):
        raise ValueError(f"labelled pairs need a tsv, csv or jsonl file, not {fmt}")
    if columns is None:
        return {f: (f if fmt == "jsonl" else i) for i, f in enumerate(FIELDS)}
    columns = dict(columns)
    unknown, missing = set(columns) - set(FIELDS), [f for f in FIELDS if f not in columns]
    if unknown or missing:
        raise ValueError(f"columns must map exactly {FIELDS}; unknown {sorted(unknown)}, missing {missing}")
    for field, key in columns.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)) or (isinstance(key, int) and key < 0):
            raise ValueError(f"column of {field!r} must be a name or a 0-based index, got {key!r}")
    return columns


def read_labelled_pairs(
    path,
    *,
    format: str | None = None,
    columns: Mapping[str, str | int] | None = None,
    header: bool | None = None,
    skip_bad: bool = False,
) -> Rows:
    """Reads binary-labelled pairs -> ``Rows`` of ``LabelledPair``.

    Args:
      path: a tsv, csv or jsonl file.
      format: "tsv", "csv" or "jsonl"; default from the suffix.
      columns: {"text_a": c, "text_b": c, "label": c}, c a header name / JSON key or a 0-based
        index. Default: columns 0, 1, 2 (tsv/csv) or keys "text_a", "text_b", "label" (jsonl).
      header: tsv/csv start with a header row; default: True iff a column is named.
      skip_bad: skip, count and log bad rows instead of raising ``DataError``.

    Every tsv/csv row must have as many columns as the header (or, without one, the first row),
    so a stray tab or comma inside a text is caught on its line.
    """
    path = Path(path)
    fmt = infer_format(path, format)
    cols = _columns(fmt, columns)
    tabular = fmt != "jsonl"
    named = any(isinstance(k, str) for k in cols.values())
    if header is None:
        header = tabular and named
    if header and not tabular:
        raise ValueError("header applies to tsv/csv files, not jsonl")
    if tabular and named and not header:
        raise ValueError(f"columns {cols} name columns, so the file needs header=True")
    shown = dict(cols)
    shape: dict[str, Any] = {"count": None, "why": ""}
    unit = "tab-separated" if fmt == "tsv" else "comma-separated"

    def take_header(number: int, text: str) -> None:
        names = [n.strip() for n in _split(fmt, path, number, text)]
        for field, key in cols.items():
            if isinstance(key, str):
                if key not in names:
                    raise DataError(path, number, f"missing column {key!r} (for {field}): expected it in the "
                                                  f"header, which has {names}")
                cols[field] = names.index(key)
        shape.update(count=len(names), why=f"as in the header on line {number}")

    def get(row, field: str, number: int):
        key = cols[field]
        if isinstance(row, dict):
            if not isinstance(key, str):
                raise DataError(path, number, f"expected a JSON array (column {key} for {field}), found an object")
            if key not in row:
                raise DataError(path, number, f"missing key {key!r} (for {field}): expected a JSON object with "
                                              f"keys {[shown[f] for f in FIELDS]}")
            return row[key]
        if isinstance(key, str):
            raise DataError(path, number, f"expected a JSON object with key {key!r} (for {field}), found an array")
        if key >= len(row):
            raise DataError(path, number, f"missing column {key + 1} (for {field}): expected at least {key + 1} "
                                          f"columns, found {len(row)}")
        return row[key]

    def parse(number: int, text: str) -> LabelledPair:
        row = _split(fmt, path, number, text)
        if tabular:
            if shape["count"] is None:
                shape.update(count=len(row), why=f"as on line {number}, the first row")
            if len(row) != shape["count"]:
                raise DataError(path, number, f"expected {shape['count']} {unit} columns ({shape['why']}), "
                                              f"found {len(row)}")
        texts = []
        for field in ("text_a", "text_b"):
            value = get(row, field, number)
            if not isinstance(value, str):
                raise DataError(path, number, f"{field} must be a string, found {type(value).__name__} {value!r}")
            if not value.strip():
                raise DataError(path, number, f"{field} (column {shown[field]!r}) is empty (expected non-empty text)")
            texts.append(value)
        label = parse_label(get(row, "label", number), path, number, f"label (column {shown['label']!r})")
        return LabelledPair(texts[0], texts[1], label)

    return _rows(path, parse, skip_bad=skip_bad, header=take_header if header else False)


def sick_binary(pairs: Iterable[NLIPair]) -> list[LabelledPair]:
    """SICK as pair classification: ENTAILMENT = 1, NEUTRAL and CONTRADICTION = 0."""
    return [LabelledPair(p.text_a, p.text_b, int(p.label == "ENTAILMENT")) for p in pairs]


def read_sick_binary(path, *, skip_bad: bool = False) -> list[LabelledPair]:
    """``sick_binary(read_sick(path))``: a SICK file (e.g. SICK_trial.txt) as labelled pairs."""
    return sick_binary(read_sick(path, skip_bad=skip_bad))
