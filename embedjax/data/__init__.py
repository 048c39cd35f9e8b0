"""Input data: file readers, TFDS builders and grain pipelines.

Readers are pure Python: training files (``embedjax.data.readers``) and evaluation files
(``sts_readers``: STS with subsets; ``retrieval_readers``: BEIR and reranking; ``pair_readers``:
binary-labelled pairs), all with the same file:line errors. The TFDS builders
(``embedjax.data.tfds_builders``) and grain pipelines (``embedjax.data.pipeline``) are
imported on first use, so ``import embedjax.data`` stays light.
"""

import importlib

from embedjax.data.readers import (
    DataError,
    DistillRecord,
    NLIPair,
    Pair,
    Rows,
    ScoredPair,
    Triplet,
    read_distill,
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
from embedjax.data.pair_readers import LabelledPair, read_labelled_pairs, read_sick_binary
from embedjax.data.retrieval_readers import BeirData, RerankingSample, read_beir, read_reranking
from embedjax.data.sts_readers import STSPair, read_senteval_sts, read_sick_sts, read_stsb_sts

__all__ = [
    "BeirData",
    "DataError",
    "DistillRecord",
    "LabelledPair",
    "NLIPair",
    "Pair",
    "RerankingSample",
    "Rows",
    "STSPair",
    "ScoredPair",
    "Triplet",
    "read_beir",
    "read_distill",
    "read_labelled_pairs",
    "read_reranking",
    "read_senteval_sts",
    "read_sick_binary",
    "read_sick_sts",
    "read_stsb_sts",
    "read_pairs",
    "read_records",
    "read_scored_pairs",
    "read_sentences",
    "read_sick",
    "read_sick_triplets",
    "read_stsb",
    "read_triplets",
    "sick_triplets",
    # embedjax.data.batch (imports jax on first use)
    "Batch",
    "PackedRows",
    "Side",
    # embedjax.data.pipeline (imports grain on first use)
    "DataIterator",
    "as_record",
    "eval_pipeline",
    "steps_per_epoch",
    "text_hash",
    "train_pipeline",
    # embedjax.data.tfds_builders (imports tensorflow_datasets on first use)
    "TextFilesConfig",
    "build_text_files",
    "prepare",
    "tfds_source",
    # embedjax.data.download (local copies of STS-B / SICK, else the original archives)
    "sick_files",
    "stsb_files",
    # embedjax.data.streaming (files of any size read through an index; Parquet / Arrow import pyarrow on use)
    "open_records",
]

_LAZY = {
    **dict.fromkeys(("Batch", "PackedRows", "Side"), "batch"),
    **dict.fromkeys(("DataIterator", "as_record", "eval_pipeline", "steps_per_epoch", "text_hash",
                     "train_pipeline"), "pipeline"),
    **dict.fromkeys(("TextFilesConfig", "build_text_files", "prepare", "tfds_source"), "tfds_builders"),
    **dict.fromkeys(("sick_files", "stsb_files"), "download"),
    "open_records": "streaming",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"embedjax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'embedjax.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
