"""Input data: file readers (and, later, TFDS builders and grain pipelines)."""

from embedjax.data.readers import DataError, NLIPair, ScoredPair, read_sick, read_stsb

__all__ = ["DataError", "NLIPair", "ScoredPair", "read_sick", "read_stsb"]
