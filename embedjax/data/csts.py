"""C-STS: conditional semantic textual similarity (Deshpande et al., arXiv:2305.15093).

Two sentences and a condition in natural language ("the number of people") with a 1-5 score
of how similar the sentences are under that condition; each sentence pair comes under two
conditions with different scores. ``read_csts`` reads the CSV layout the task ships in
(``sentence1, sentence2, condition, label``, a header naming them, any column order), with
file:line errors; ``split_by_pair`` carves a dev split so that both conditions of a pair fall
on the same side; ``conditioned_pairs`` turns the examples into scored text pairs, each
sentence written with its condition (``template``), which the STS evaluators and losses take:
the bi-encoder family of the paper. ``training_records`` builds the other families' records: the
tri-encoder's (sentences and condition apart) and the quadruplets of a pair's two conditions.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from embedjax.data.readers import DataError, Rows, ScoredPair, _score

log = logging.getLogger(__name__)

COLUMNS = ("sentence1", "sentence2", "condition", "label")
DEFAULT_TEMPLATE = "{sentence} {condition}"


@dataclasses.dataclass(frozen=True)
class CSTSExample:
    """One C-STS row: the similarity ``label`` (1-5) of the two sentences under ``condition``."""

    sentence1: str
    sentence2: str
    condition: str
    label: float


def read_csts(path, *, skip_bad: bool = False) -> Rows:
    """``CSTSExample`` rows of a C-STS CSV file (header ``sentence1,sentence2,condition,label``).

    Quoted fields may span lines (the released files have such sentences); ``Rows.lines`` holds
    the line each row starts on. A missing column in the header, a row without four fields, an
    empty text or a label outside 1..5 raises ``DataError`` naming the file and line
    (``skip_bad``: bad rows are counted and skipped; a bad header or broken quoting never is).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out, skipped, first_bad = Rows(), 0, None
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, strict=True)
        number = 1

        def next_row():
            nonlocal number
            number = reader.line_num + 1
            try:
                return next(reader)
            except csv.Error as err:
                raise DataError(path, number, f"malformed CSV ({err}): expected comma-separated fields, "
                                              "quoted fields closed by a matching double quote") from None
            except UnicodeDecodeError as err:
                raise DataError(path, number, f"undecodable bytes ({err.reason}): expected UTF-8 text") from None

        try:
            names = [c.strip().lower() for c in next_row()]
        except StopIteration:
            raise DataError(path, None, "file is empty (expected a header and rows)") from None
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DataError(path, number, f"header {names} lacks the column(s) {missing} (expected {', '.join(COLUMNS)})")
        where = {c: names.index(c) for c in COLUMNS}
        while True:
            try:
                cells = next_row()
            except StopIteration:
                break
            if not any(c.strip() for c in cells):
                continue  # a blank line
            try:
                out.append(_example(cells, where, path, number))
                out.lines.append(number)
            except DataError as err:
                if not skip_bad:
                    raise
                skipped, first_bad = skipped + 1, first_bad or err
    out.skipped = skipped
    if skipped:
        log.warning("%s: skipped %d bad row(s); the first: %s", path, skipped, first_bad)
    if not out:
        raise DataError(path, None, "no usable rows (expected at least one after the header)")
    return out


def _example(cells: list[str], where: dict[str, int], path: Path, number: int) -> CSTSExample:
    if len(cells) <= max(where.values()):
        raise DataError(path, number, f"{len(cells)} field(s), expected {len(where)} ({', '.join(COLUMNS)})")
    texts = {c: cells[where[c]].strip() for c in COLUMNS[:3]}
    empty = [c for c, t in texts.items() if not t]
    if empty:
        raise DataError(path, number, f"empty {empty[0]} (expected text)")
    return CSTSExample(**texts, label=_score(cells[where["label"]], 1.0, 5.0, path, number, "label"))


def _pair_key(example: CSTSExample) -> tuple[str, str]:
    return tuple(sorted((example.sentence1, example.sentence2)))


def split_by_pair(examples: Sequence[CSTSExample], *, dev_fraction: float = 0.1, seed: int = 0
                  ) -> tuple[list[CSTSExample], list[CSTSExample]]:
    """(train, dev): a seeded ``dev_fraction`` of the distinct sentence pairs (in either order)
    goes to dev with all its conditions; both lists keep the input order."""
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    keys = list(dict.fromkeys(_pair_key(e) for e in examples))
    if len(keys) < 2:
        raise ValueError(f"cannot split {len(keys)} distinct sentence pair(s) into train and dev")
    n_dev = min(max(1, math.ceil(dev_fraction * len(keys))), len(keys) - 1)
    chosen = np.random.default_rng(seed).permutation(len(keys))[:n_dev]
    dev_keys = {keys[i] for i in chosen}
    train = [e for e in examples if _pair_key(e) not in dev_keys]
    dev = [e for e in examples if _pair_key(e) in dev_keys]
    return train, dev


def conditioned_pairs(examples: Sequence[CSTSExample], template: str = DEFAULT_TEMPLATE) -> list[ScoredPair]:
    """Each example as a ``ScoredPair`` of its two sentences written with the condition
    (``template.format(sentence=..., condition=...)``), scored by its label."""
    _check_template(template)
    return [ScoredPair(template.format(sentence=e.sentence1, condition=e.condition),
                       template.format(sentence=e.sentence2, condition=e.condition), e.label) for e in examples]


RECORDS = ("conditioned", "tri", "conditioned_quadruplets", "tri_quadruplets")


def _check_template(template: str) -> None:
    try:
        template.format(sentence="", condition="")
    except (KeyError, IndexError) as err:
        raise ValueError(f"template {template!r} may only use the fields {{sentence}} and {{condition}}") from err


def tri_records(examples: Sequence[CSTSExample]) -> list[dict]:
    """The tri-encoder's training records: ``{text_a: sentence1, text_b: sentence2, text_n:
    condition, score: label}`` (side n carries the condition; ``embedjax.tri_head``)."""
    return [{"text_a": e.sentence1, "text_b": e.sentence2, "text_n": e.condition, "score": e.label} for e in examples]


def condition_pairs(examples: Sequence[CSTSExample]) -> list[tuple[CSTSExample, CSTSExample]]:
    """``(higher, lower)``: each sentence pair's two conditions, the higher-scored first (the
    quadruplet objective's unit). Pairs whose conditions score alike, or that come with one
    condition or more than two, are left out (counted in the log)."""
    by_pair: dict[tuple[str, str], list[CSTSExample]] = {}
    for e in examples:
        by_pair.setdefault(_pair_key(e), []).append(e)
    out, skipped = [], 0
    for group in by_pair.values():
        if len(group) != 2 or group[0].label == group[1].label:
            skipped += 1
            continue
        high, low = sorted(group, key=lambda e: -e.label)
        out.append((high, low))
    if skipped:
        log.info("C-STS condition pairs: %d sentence pairs kept, %d left out (not two conditions of different "
                 "scores)", len(out), skipped)
    return out


def quadruplet_records(examples: Sequence[CSTSExample], *, separate: bool,
                       template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """One record per sentence pair for ``objective.loss="quadruplet"`` (``condition_pairs``):
    ``text_a`` / ``text_b`` the two sentences under the higher-scored condition, ``text_n`` the
    lower-scored side. Conditioned (``separate=False``, the bi-encoder family): each text written
    with its condition, ``text_n`` = (sentence1 | low, sentence2 | low). Separate (the tri-encoder):
    the bare sentences, ``text_n`` = (condition high, condition low). Sentences are taken from the
    higher-scored row (the two rows of a pair may list them in either order)."""
    _check_template(template)
    records = []
    for high, low in condition_pairs(examples):
        s1, s2 = high.sentence1, high.sentence2
        if separate:
            records.append({"text_a": s1, "text_b": s2, "text_n": (high.condition, low.condition)})
        else:
            put = lambda s, e: template.format(sentence=s, condition=e.condition)  # noqa: E731
            records.append({"text_a": put(s1, high), "text_b": put(s2, high),
                            "text_n": (put(s1, low), put(s2, low))})
    return records


def training_records(examples: Sequence[CSTSExample], records: str = "conditioned",
                     template: str = DEFAULT_TEMPLATE) -> list:
    """The C-STS training records of one of ``RECORDS`` (``data.csts_records``): ``conditioned``
    scored pairs (bi-encoder, cross-encoder), ``tri`` records (tri-encoder), or either family's
    quadruplets."""
    if records == "conditioned":
        return conditioned_pairs(examples, template)
    if records == "tri":
        return tri_records(examples)
    if records in ("conditioned_quadruplets", "tri_quadruplets"):
        return quadruplet_records(examples, separate=records == "tri_quadruplets", template=template)
    raise ValueError(f"data.csts_records must be one of {RECORDS}, got {records!r}")
