"""STS pairs that know which subset they come from.

STS benchmarks are unions of subsets (genres / source files / years), and the protocols
differ in how they use them (``embedjax.eval.sts``): the "all" setting as SimCSE reports it
(arXiv:2104.08821) pools every pair of a task into one correlation, the original SentEval
toolkit (arXiv:1803.05449) averages one correlation per subset. So every reader
here returns ``STSPair`` records (a ``ScoredPair`` plus ``subset`` and ``year``):

* ``read_stsb_sts``: the STS benchmark's files; subset ``"{file}/{year}"`` (``"MSRvid/2012test"``),
  year the first four digits of the year column (``"2012"``);
* ``read_sick_sts``: SICK-R (relatedness), one subset (``"SICK"``);
* ``read_senteval_sts``: SentEval's STS12-16 layout, a directory of ``STS.input.<subset>.txt``
  (tab-separated sentence pairs) beside ``STS.gs.<subset>.txt`` (one gold score per line; a
  blank gold line marks an unscored pair, skipped as SentEval does).

Bad input raises ``DataError`` naming the file and the 1-based line.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Iterable

from embedjax.data.readers import DataError, Rows, ScoredPair, _decode, _raw_lines, _rows, _score, read_sick

STSB_COLUMNS = "genre, file, year, id, score, sentence1, sentence2"
SENTEVAL_INPUT, SENTEVAL_GOLD = "STS.input.{}.txt", "STS.gs.{}.txt"


@dataclasses.dataclass(frozen=True)
class STSPair(ScoredPair):
    """A scored pair with its ``subset`` (what per-subset protocols group by) and ``year``."""

    subset: str = ""
    year: str = ""


def subsets_of(pairs: Iterable[ScoredPair]) -> list[str]:
    """The subset of every pair (``""`` for a plain ``ScoredPair``)."""
    return [getattr(p, "subset", "") for p in pairs]


def regroup(pairs: Iterable[STSPair], key: Callable[[STSPair], str]) -> list[STSPair]:
    """The same pairs with ``subset = key(pair)``; e.g. ``regroup(pairs, lambda p: p.year)``
    groups STS-B by year, as SentEval's STS12-16 tasks group their subsets."""
    return [dataclasses.replace(p, subset=str(key(p))) for p in pairs]


def _year(text: str) -> str:
    found = re.match(r"\d{4}", text.strip())
    return found.group(0) if found else text.strip()


def read_stsb_sts(path, *, skip_bad: bool = False) -> Rows:
    """STS-B (tab-separated genre, file, year, id, score 0-5, s1, s2[, extra...]) as ``STSPair``s
    with ``subset = "{file}/{year}"`` (``"MSRvid/2012test"``) and ``year = "2012"``."""
    path = Path(path)

    def parse(line: int, text: str) -> STSPair:
        f = text.split("\t")
        if len(f) < 7:
            raise DataError(path, line, f"expected >= 7 tab-separated columns ({STSB_COLUMNS}), found {len(f)}")
        score = _score(f[4], 0.0, 5.0, path, line, "score")
        return STSPair(f[5], f[6], score, subset=f"{f[1]}/{f[2]}", year=_year(f[2]))

    return _rows(path, parse, skip_bad=skip_bad)


def read_sick_sts(path, *, subset: str = "SICK", skip_bad: bool = False) -> Rows:
    """SICK-R: ``read_sick``'s pairs (relatedness 1-5) as ``STSPair``s of one ``subset``."""
    rows = read_sick(path, skip_bad=skip_bad)
    out = Rows(STSPair(p.text_a, p.text_b, p.score, subset=subset) for p in rows)
    out.lines, out.skipped = rows.lines, rows.skipped
    return out


def _year_of_directory(directory: Path) -> str:
    """``"2012"`` for SentEval's ``STS12-en-test``; ``""`` when the name says nothing."""
    found = re.match(r"STS(\d\d)(?!\d)", directory.name, re.IGNORECASE)
    return f"20{found.group(1)}" if found else ""


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    """Every line of ``path`` (blank ones included, as ``""``), decoded, with its number."""
    return [(number, _decode(path, number, raw)) for number, raw in _raw_lines(path, keep_blank=True)]


def _senteval_subset(inputs: Path, gold: Path, subset: str, year: str) -> list[STSPair]:
    pairs_lines, gold_lines = _numbered_lines(inputs), _numbered_lines(gold)
    if len(pairs_lines) != len(gold_lines):
        # Point at the first line that has no partner in the other file.
        longer, shorter = (inputs, gold) if len(pairs_lines) > len(gold_lines) else (gold, inputs)
        n_short = min(len(pairs_lines), len(gold_lines))
        raise DataError(longer, n_short + 1, f"has no counterpart in {shorter.name} ({n_short} lines); expected "
                                             f"{inputs.name} and {gold.name} to have the same number of lines")
    out = []
    for (number, pair), (_, score) in zip(pairs_lines, gold_lines):
        if not score.strip():
            continue  # unscored pair: SentEval drops it
        fields = pair.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise DataError(inputs, number, f"expected two tab-separated non-empty sentences, found {len(fields)} "
                                            f"field(s) (its gold score is on line {number} of {gold.name})")
        value = _score(score.strip(), None, None, gold, number, "gold score")
        out.append(STSPair(fields[0], fields[1], value, subset=subset, year=year))
    return out  # not empty: a gold file of blank lines only is an empty file (DataError)


def read_senteval_sts(directory, *, year: str | None = None) -> Rows:
    """SentEval's STS12-16 layout: every ``STS.input.<subset>.txt`` in ``directory`` with its
    ``STS.gs.<subset>.txt``, subsets in name order.

    ``year`` defaults to the one in the directory name (``STS12-en-test`` -> ``"2012"``).
    Pairs whose gold line is blank are skipped (as SentEval does); input lines may carry
    extra tab-separated columns after the two sentences (ignored). Errors name the file
    and line: a missing gold file, different line counts, a non-numeric score, a line
    without two sentences.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory (expected SentEval's STS.input.*.txt files)")
    year = _year_of_directory(directory) if year is None else str(year)
    inputs = sorted(directory.glob(SENTEVAL_INPUT.format("*")))
    if not inputs:
        raise DataError(directory, None, f"no {SENTEVAL_INPUT.format('<subset>')} files (SentEval's STS layout)")
    out = Rows()
    for path in inputs:
        subset = path.name[len("STS.input."):-len(".txt")]
        gold = directory / SENTEVAL_GOLD.format(subset)
        if not gold.is_file():
            raise DataError(path, None, f"no gold file {gold.name} beside it")
        out.extend(_senteval_subset(path, gold, subset, year))
    return out
