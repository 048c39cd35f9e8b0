"""Config ``data`` section -> training records and dev pairs.

``data.kind`` says what the training file holds:

    stsb           STS benchmark file (scores 0-5)           -> ScoredPair
    sick           SICK file, relatedness scores 1-5          -> ScoredPair
    sick_triplets  SICK premise / entailment / contradiction  -> Triplet (supervised SimCSE)
    sentences      one text per line (unsupervised SimCSE)    -> str
    stsb_sentences both sentences of an STS-B file, as a corpus  -> str
    pairs | triplets | scored   generic tsv/csv/jsonl files (data.format, data.columns, data.score_range)
    tfds           any TFDS dataset by name (data.tfds_name, data.tfds_split, data.columns, data.tfds_data_dir)

``data.dev`` is an STS-B-format file (``data.dev_format='sick'`` for SICK) used for
evaluation and best-checkpoint selection.
"""

from __future__ import annotations

from typing import Any, Mapping

from embedjax.data import readers

KINDS = ("stsb", "stsb_sentences", "sick", "sick_triplets", "sentences", "pairs", "triplets", "scored", "tfds")


def train_source(data: Mapping[str, Any]):
    """The training records (a random-access sequence) described by ``data``."""
    kind, skip_bad = data["kind"], bool(data.get("skip_bad", False))
    if kind == "stsb":
        return readers.read_stsb(data["train"], skip_bad=skip_bad)
    if kind == "stsb_sentences":
        return [t for p in readers.read_stsb(data["train"], skip_bad=skip_bad) for t in (p.text_a, p.text_b)]
    if kind == "sick":
        return readers.read_sick(data["train"], skip_bad=skip_bad)
    if kind == "sick_triplets":
        return readers.read_sick_triplets(data["train"], skip_bad=skip_bad)
    if kind in ("sentences", "pairs", "triplets", "scored"):
        score_range = data.get("score_range")
        return readers.read_records(
            data["train"], kind, format=data.get("format"), columns=dict(data.get("columns") or {}) or None,
            score_range=tuple(score_range) if score_range else None, skip_bad=skip_bad)
    if kind == "tfds":
        from embedjax.data.tfds_builders import tfds_source

        return tfds_source(data["tfds_name"], data.get("tfds_split", "train"), dict(data.get("columns") or {}) or None,
                           data_dir=data.get("tfds_data_dir"))
    raise ValueError(f"unknown data.kind {kind!r}; choose one of {KINDS}")


def dev_pairs(data: Mapping[str, Any]) -> list:
    """Scored dev pairs for evaluation and checkpoint selection."""
    reader = readers.read_sick if data.get("dev_format", "stsb") == "sick" else readers.read_stsb
    return reader(data["dev"])
