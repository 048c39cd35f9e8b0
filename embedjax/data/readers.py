"""Readers for the text-pair files embedjax trains and evaluates on.

Every reader yields small dataclasses and reports bad input precisely: the
file, the 1-based line number and what was expected. With ``skip_bad=True`` a
bad row is skipped instead, counted, and the count logged at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class DataError(ValueError):
    """Malformed input: names the file, the line and what was expected."""

    def __init__(self, path, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line = Path(path), line


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


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; an empty file or undecodable bytes raise DataError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, None, "file is empty")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            yield number, line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise DataError(path, number, f"undecodable bytes at column {err.start + 1} (expected UTF-8 text)") from None


def _score(value: str, lo: float, hi: float, path, line: int, column: str) -> float:
    try:
        score = float(value)
    except ValueError:
        raise DataError(path, line, f"{column} {value!r} is not a number (expected {lo}..{hi})") from None
    if not (math.isfinite(score) and lo <= score <= hi):
        raise DataError(path, line, f"{column} {score} is out of range (expected {lo}..{hi})")
    return score


def _rows(path: Path, parse: Callable[[int, list[str]], T], *, skip_bad: bool, header: bool) -> list[T]:
    out, skipped = [], 0
    lines = _lines(path)
    if header:
        next(lines, None)
    for number, line in lines:
        try:
            out.append(parse(number, line.split("\t")))
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d malformed row(s)", path, skipped)
    if not out:
        raise DataError(path, None, "no usable rows")
    return out


def read_stsb(path, *, skip_bad: bool = False) -> list[ScoredPair]:
    """The STS benchmark's tab-separated files (genre, file, year, id, score 0-5, s1, s2[, extra...])."""
    path = Path(path)

    def parse(line: int, f: list[str]) -> ScoredPair:
        if len(f) < 7:
            raise DataError(path, line, f"expected >= 7 tab-separated columns (genre, file, year, id, score, "
                                        f"sentence1, sentence2), found {len(f)}")
        return ScoredPair(f[5], f[6], _score(f[4], 0.0, 5.0, path, line, "score"))

    return _rows(path, parse, skip_bad=skip_bad, header=False)


SICK_LABELS = ("ENTAILMENT", "NEUTRAL", "CONTRADICTION")


def read_sick(path, *, skip_bad: bool = False) -> list[NLIPair]:
    """SICK files (header; pair_ID, sentence_A, sentence_B, relatedness_score 1-5, entailment_judgment)."""
    path = Path(path)

    def parse(line: int, f: list[str]) -> NLIPair:
        if len(f) < 5:
            raise DataError(path, line, f"expected 5 tab-separated columns (pair_ID, sentence_A, sentence_B, "
                                        f"relatedness_score, entailment_judgment), found {len(f)}")
        label = f[4].strip().upper()
        if label not in SICK_LABELS:
            raise DataError(path, line, f"entailment_judgment {f[4]!r} is not one of {SICK_LABELS}")
        return NLIPair(f[1], f[2], _score(f[3], 1.0, 5.0, path, line, "relatedness_score"), label)

    return _rows(path, parse, skip_bad=skip_bad, header=True)
