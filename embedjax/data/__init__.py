"""Input data: file readers, TFDS builders and grain pipelines.

Readers are pure Python (``embedjax.data.readers``). The TFDS builders
(``embedjax.data.tfds_builders``) and grain pipelines (``embedjax.data.pipeline``) are
imported on first use, so ``import embedjax.data`` stays light.
"""

from embedjax.data.readers import (
    DataError,
    NLIPair,
    Pair,
    Rows,
    ScoredPair,
    Triplet,
    read_pairs,
    read_records,
    read_scored_pairs,
    read_sentences,
    read_sick,
    read_sick_triplets,
    read_stsb,
    read_triplets,
    sick_triplets,
)

__all__ = [
    "DataError",
    "NLIPair",
    "Pair",
    "Rows",
    "ScoredPair",
    "Triplet",
    "read_pairs",
    "read_records",
    "read_scored_pairs",
    "read_sentences",
    "read_sick",
    "read_sick_triplets",
    "read_stsb",
    "read_triplets",
    "sick_triplets",
]
