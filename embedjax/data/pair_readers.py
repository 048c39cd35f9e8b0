"""Readers for binary-labelled pairs (pair classification: duplicate / paraphrase / entailment).

``read_labelled_pairs`` reads ``text_a, text_b, label`` rows from tsv, csv or jsonl, the label
being 0 or 1 (also ``true`` / ``false``, any case). Bad rows raise ``DataError`` naming the file
and the 1-based line (wrong column count, a label that is not 0/1, empty text, bad JSON), or with
``skip_bad=True`` are counted (``rows.skipped``) and logged, as in ``embedjax.data.readers``.

``sick_binary`` / ``read_sick_binary`` turn SICK into pair classification: ENTAILMENT = 1,
NEUTRAL and CONTRADICTION = 0.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from embedjax.data.readers import LabelledPair, NLIPair, Rows, parse_label, read_records, read_sick

__all__ = ["LabelledPair", "parse_label", "read_labelled_pairs", "read_sick_binary", "sick_binary"]


def read_labelled_pairs(
    path,
    *,
    format: str | None = None,
    columns: Mapping[str, str | int] | None = None,
    header: bool | None = None,
    skip_bad: bool = False,
) -> Rows:
    """Reads binary-labelled pairs -> ``Rows`` of ``LabelledPair`` (``read_records(path, "labelled")``).

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
    return read_records(path, "labelled", format=format, columns=columns, header=header, skip_bad=skip_bad)


def sick_binary(pairs: Iterable[NLIPair]) -> list[LabelledPair]:
    """SICK as pair classification: ENTAILMENT = 1, NEUTRAL and CONTRADICTION = 0."""
    return [LabelledPair(p.text_a, p.text_b, int(p.label == "ENTAILMENT")) for p in pairs]


def read_sick_binary(path, *, skip_bad: bool = False) -> list[LabelledPair]:
    """``sick_binary(read_sick(path))``: a SICK file (e.g. SICK_trial.txt) as labelled pairs."""
    return sick_binary(read_sick(path, skip_bad=skip_bad))
