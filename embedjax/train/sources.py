"""Config ``data`` section -> training records.

``data.kind`` says what the training file holds:

    stsb           STS benchmark file (scores 0-5)           -> ScoredPair
    sick           SICK file, relatedness scores 1-5          -> ScoredPair
    sick_triplets  SICK premise / entailment / contradiction  -> Triplet (supervised SimCSE)
    sentences      one text per line (unsupervised SimCSE)    -> str
    stsb_sentences both sentences of an STS-B file, as a corpus  -> str
    pairs | triplets | scored   generic tsv/csv/jsonl files (data.format, data.columns, data.score_range)
    distill        jsonl (or tsv/csv) of text_a, text_b, text_n (one or a list of k negatives) and teacher
                   scores [s(a, b), s(a, n_1), ...], e.g. written by scripts/mine.py -> DistillRecord
    tfds           any TFDS dataset by name (data.tfds_name, data.tfds_split, data.columns, data.tfds_data_dir)

``data.columns`` maps fields (text_a, text_b, text_n, score) to a file's columns (header names
or JSON keys, or 0-based indexes) or to a TFDS dataset's features; ``{}`` = the defaults.
On the command line: ``--config.data.columns="{'text_a': 'sentence1', 'score': 'label'}"``.

Evaluation data is not here: ``config.evals`` names evaluators and their files
(``embedjax.eval.suite``).
"""

from __future__ import annotations

from typing import Any, Mapping

from embedjax.data import pipeline, readers

KINDS = ("stsb", "stsb_sentences", "sick", "sick_triplets", "sentences", "pairs", "triplets", "scored", "distill",
         "tfds")


def _columns(data: Mapping[str, Any]) -> dict[str, str | int] | None:
    """``data.columns`` ({field: column}; {} = the defaults) as the readers take it."""
    columns = dict(data["columns"] or {})
    return columns or None


def train_source(data: Mapping[str, Any]):
    """The training records (a random-access sequence) described by ``data``.

    Every key is read by item access: configs/base.py declares them all, so a missing
    one is a KeyError, not a silent default.
    """
    kind, skip_bad = data["kind"], bool(data["skip_bad"])
    if kind == "stsb":
        return readers.read_stsb(data["train"], skip_bad=skip_bad)
    if kind == "stsb_sentences":
        return [t for p in readers.read_stsb(data["train"], skip_bad=skip_bad) for t in (p.text_a, p.text_b)]
    if kind == "sick":
        return readers.read_sick(data["train"], skip_bad=skip_bad)
    if kind == "sick_triplets":
        return readers.read_sick_triplets(data["train"], skip_bad=skip_bad)
    if kind in ("sentences", "pairs", "triplets", "scored", "distill"):
        score_range = tuple(data["score_range"] or ())
        if score_range and len(score_range) != 2:
            raise ValueError(f"data.score_range must be () or (lo, hi), got {score_range}")
        return readers.read_records(
            data["train"], kind, format=data["format"] or None, columns=_columns(data),
            score_range=score_range or None, skip_bad=skip_bad)
    if kind == "tfds":
        from embedjax.data.tfds_builders import tfds_source

        if not data["tfds_name"]:
            raise ValueError("data.kind='tfds' needs data.tfds_name (e.g. --config.data.tfds_name=glue/stsb)")
        return tfds_source(data["tfds_name"], data["tfds_split"], _columns(data),
                           data_dir=data["tfds_data_dir"] or None)
    raise ValueError(f"unknown data.kind {kind!r}; choose one of {KINDS}")


def scores_of(source) -> list[float] | None:
    """Every record's score (for ``objective.check_objective_data``), or None when the records
    have no score. Reads the whole source once."""
    if "score" not in pipeline.fields_of(source):
        return None
    return [float(pipeline.as_record(r)["score"]) for r in source]
