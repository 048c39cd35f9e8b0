"""Config ``data`` section -> training records.

``data.kind`` (``DATA_KINDS``) says what the training file holds:

    stsb           STS benchmark file (scores 0-5)           -> ScoredPair
    sick           SICK file, relatedness scores 1-5          -> ScoredPair
    sick_triplets  SICK premise / entailment / contradiction  -> Triplet (supervised SimCSE)
    sentences      one text per line (unsupervised SimCSE)    -> str
    stsb_sentences both sentences of an STS-B file, as a corpus  -> str
    pairs | triplets | scored   generic tsv/csv/jsonl files (data.format, data.columns, data.score_range),
                   Parquet files or Arrow datasets (data.format parquet | arrow, or from the suffix / a folder)
    distill        jsonl (or tsv/csv) of text_a, text_b, text_n (one or a list of k negatives) and teacher
                   scores [s(a, b), s(a, n_1), ...], e.g. written by scripts/mine.py -> DistillRecord
    beir           a BEIR directory (data.train) and qrels split (data.split): one record per query with every
                   relevant document (data.min_grade, data.positives / every_positive per step, data.hard_negatives mined by
                   scripts/mine.py --beir, data.num_negatives per step) -> RetrievalRecords
    csts           a C-STS CSV file (data.train) and its split (data.split: train | dev | all, carved by
                   sentence pair as the csts evaluator carves it), as data.csts_records says: each
                   sentence written with its condition ("{sentence} {condition}"), scored 1-5 -> ScoredPair;
                   or the tri-encoder's records, or either family's quadruplets (embedjax.data.csts)
    beir_corpus    a BEIR directory's corpus.jsonl (data.train), each document (title + " " + text) -> str
    tfds           any TFDS dataset by name (data.tfds_name, data.tfds_split, data.columns, data.tfds_data_dir)

Single texts (sentences, stsb_sentences, beir_corpus) may be cut into sentences
(``data.split_sentences``) and damaged (``data.noise="delete"``: each becomes a Pair of its copy
with words deleted and itself, TSDAE's input; ``embedjax.data.noise``).

Files of any size: sentences, pairs, triplets, scored and distill records are read one at a time
through an index (``embedjax.data.streaming.open_records``, the same records as the readers'),
never all held in memory, from Parquet and Arrow always and from tsv/csv/jsonl/txt with
``data.streaming=True``; the index (or Parquet's Arrow copy) is kept beside the file, or under
``data.index_dir`` (default ``$EMBEDJAX_CACHE/index``) when that folder is read-only. A bad row
stops the run when it is read, unless ``data.skip_bad``: then every record is checked once before
training and the bad ones are left out, as the in-memory readers leave them out.

``data.columns`` maps fields (text_a, text_b, text_n, score) to a file's columns (header names
or JSON keys, or 0-based indexes) or to a TFDS dataset's features; ``{}`` = the defaults.
On the command line: ``--config.data.columns="{'text_a': 'sentence1', 'score': 'label'}"``.

Evaluation data is not here: ``config.evals`` names evaluators and their files
(``embedjax.eval.suite``).
"""

from __future__ import annotations

from embedjax.data import pipeline, readers, streaming
from embedjax.train.config import DataConfig

DATA_KINDS = ("stsb", "stsb_sentences", "sick", "sick_triplets", "sentences", "pairs", "triplets", "scored", "distill",
              "beir", "beir_corpus", "csts", "tfds")
SINGLE_TEXT_KINDS = ("sentences", "stsb_sentences", "beir_corpus")
STREAMING_KINDS = ("sentences", "pairs", "triplets", "scored", "distill")  # what data.streaming / parquet / arrow read


def train_source(data: DataConfig, *, seed: int = 0):
    """The training records (a random-access sequence) a data section describes; ``seed`` draws
    the noise of ``data.noise``."""
    if (data.split_sentences or data.noise) and data.kind not in SINGLE_TEXT_KINDS:
        raise ValueError(f"data.split_sentences and data.noise apply to single texts (data.kind one of "
                         f"{SINGLE_TEXT_KINDS}), not data.kind={data.kind!r}")
    records = _records(data)
    if data.split_sentences:
        from embedjax.tsdae import split_sentences

        records = [s.strip() for text in records for s in split_sentences(text)]
    if data.noise:
        from embedjax.data.noise import with_noise

        records = with_noise(records, data.noise, ratio=data.noise_ratio, seed=seed)
    return records


def _records(data: DataConfig):
    kind, skip_bad, columns = data.kind, data.skip_bad, data.columns or None
    if kind not in STREAMING_KINDS and (data.streaming or data.format in streaming.COLUMNAR_FORMATS):
        raise ValueError(f"data.streaming and data.format parquet / arrow read data.kind one of {STREAMING_KINDS}, "
                         f"not {kind!r}")
    if kind in STREAMING_KINDS and (data.streaming or streaming.is_columnar(data.train, data.format)):
        return streaming.open_records(data.train, kind, format=data.format, columns=columns,
                                      score_range=data.score_range, index_dir=data.index_dir, skip_bad=skip_bad)
    if kind == "stsb":
        return readers.read_stsb(data.train, skip_bad=skip_bad)
    if kind == "stsb_sentences":
        return [t for p in readers.read_stsb(data.train, skip_bad=skip_bad) for t in (p.text_a, p.text_b)]
    if kind == "sick":
        return readers.read_sick(data.train, skip_bad=skip_bad)
    if kind == "sick_triplets":
        return readers.read_sick_triplets(data.train, skip_bad=skip_bad)
    if kind in ("sentences", "pairs", "triplets", "scored", "distill"):
        return readers.read_records(data.train, kind, format=data.format, columns=columns,
                                    score_range=data.score_range, skip_bad=skip_bad)
    if kind == "beir":
        from embedjax.data.retrieval_training import read_beir_training

        return read_beir_training(data.train, data.split, min_grade=data.min_grade, positives=data.positives,
                                  hard_negatives=data.hard_negatives, num_negatives=data.num_negatives)
    if kind == "beir_corpus":
        from embedjax.data.retrieval_readers import read_corpus_texts

        return list(read_corpus_texts(data.train))
    if kind == "csts":
        from embedjax.data.csts import training_records
        from embedjax.eval.csts import examples_of

        return training_records(examples_of({"path": data.train, "split": data.split}), data.csts_records)
    from embedjax.data.tfds_builders import tfds_source  # kind == "tfds"

    return tfds_source(data.tfds_name, data.tfds_split, columns, data_dir=data.tfds_data_dir)


def scores_of(source) -> list[float] | None:
    """Every record's score (for ``loss_specs.check_objective_data``), or None when the records
    have no score. Reads the whole source once (a streaming source: ``scores()``, an array; Parquet
    and Arrow read only the score column)."""
    if "score" not in pipeline.fields_of(source):
        return None
    if isinstance(source, (streaming.TextRecords, streaming.ArrowRecords)):
        return source.scores()
    return [float(pipeline.as_record(r)["score"]) for r in source]
