"""Mine hard negatives for (query, positive) pairs, or for a BEIR split, with an embedding model.

    python scripts/mine.py --pairs train.tsv --output mined.jsonl [--model DIR_OR_HUB_ID] \
        [--corpus candidates.txt] [--num_negatives 5] [--range_min 0 --range_max 100] \
        [--relative_margin 0.95 | --margin 0.05] [--seed 0] [--flat]
    python scripts/mine.py --beir DATA/beir/scifact --split train --output scifact_negatives.jsonl \
        [--min_grade 1] [same options]

With --beir the corpus is the BEIR corpus, the queries those of the split with a document of
relevance >= --min_grade, and every document judged relevant to a query (relevance > 0, or the
same text as one) is left out of its ranking. The output is one line per query,
{"query_id", "negatives": [corpus ids, best first], "scores": [...]}: what data.kind="beir" reads
as data.hard_negatives.

Each query's corpus ranking (its positives left out, rank 0 = the closest other text) is cut to
ranks [range_min, range_max); candidates scoring too close to the positive are dropped as likely
false negatives (NV-Retriever, arXiv:2407.15831: --margin drops score > pos - margin,
--relative_margin drops score > relative_margin * pos); --num_negatives are drawn from the rest
(deterministic for a --seed). The corpus defaults to the distinct positives.

Output (jsonl): one record per (query, positive): {"text_a", "text_b", "text_n": [...], "teacher":
[score(q, p), score(q, n_1), ...]} (the model's scores, for distillation; with --cross_encoder DIR, that
cross-encoder's logits: MarginMSE / listwise-KL targets from a reranker); with --flat one plain
triplet {"text_a", "text_b", "text_n"} per negative (``kind=triplets``). Bad input is one line on
stderr and exit status 2 (--debug: the traceback).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from embedjax import cli, hf  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "checkpoint directory or hub id (default: all-MiniLM-L6-v2)")
_PAIRS = flags.DEFINE_string("pairs", None, "tsv/csv/jsonl file of (query, positive) pairs; a query on several "
                                            "lines has several positives")
_BEIR = flags.DEFINE_string("beir", None, "a BEIR directory (corpus.jsonl, queries.jsonl, qrels/): mine its corpus "
                                          "for the queries of --split (instead of --pairs)")
_SPLIT = flags.DEFINE_string("split", "train", "--beir: the qrels split whose queries are mined")
_MIN_GRADE = flags.DEFINE_integer("min_grade", 1, "--beir: relevance >= min_grade is a positive (every relevance > 0 "
                                                  "is excluded from the negatives)")
_QUERY_COL = flags.DEFINE_string("query_column", None, "the query column of --pairs: a header name / JSON key or "
                                                       "a 0-based index (default: column 0, or key text_a)")
_POSITIVE_COL = flags.DEFINE_string("positive_column", None, "the positive column of --pairs (default: column 1, "
                                                             "or key text_b)")
_CORPUS = flags.DEFINE_string("corpus", None, "candidate texts: one per line (txt), or a column of a tsv/csv/jsonl "
                                              "file (--corpus_column); default: the distinct positives")
_CORPUS_COL = flags.DEFINE_string("corpus_column", None, "the text column of --corpus: a name or a 0-based index")
_OUTPUT = flags.DEFINE_string("output", None, "jsonl file to write")
_NUM_NEG = flags.DEFINE_integer("num_negatives", 5, "negatives per query")
_RANGE_MIN = flags.DEFINE_integer("range_min", 0, "first rank sampled (0-based, positives not counted)")
_RANGE_MAX = flags.DEFINE_integer("range_max", 100, "ranks sampled are < range_max")
_MARGIN = flags.DEFINE_float("margin", None, "drop candidates with score > positive score - margin")
_RELATIVE = flags.DEFINE_float("relative_margin", None,
                               "drop candidates with score > relative_margin * positive score (e.g. 0.95)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the sampling")
_SKIP_SHORT = flags.DEFINE_bool("skip_short", False, "leave out queries with fewer than --num_negatives negatives "
                                                     "(default: keep them with what there is)")
_FLAT = flags.DEFINE_bool("flat", False, "one (query, positive, negative) triplet per line")
_BATCH = flags.DEFINE_integer("batch_size", 128, "texts per forward pass")
_QUERY_PROMPT = flags.DEFINE_string("query_prompt", None, "instruction prefixed to every query")
_CORPUS_PROMPT = flags.DEFINE_string("corpus_prompt", None, "instruction prefixed to every candidate text")
_CROSS = flags.DEFINE_string("cross_encoder", None, "--pairs: a cross-encoder checkpoint whose logits become the "
                                                    "records' teacher scores (embedjax.load_cross_encoder)")
_DEBUG = flags.DEFINE_bool("debug", False, "on an error, show the full traceback instead of one line")
flags.mark_flags_as_required(["output"])


def _column(value: str | None):
    """A column flag as a 0-based index (digits) or a name."""
    return int(value) if value is not None and value.isdigit() else value


def _read_inputs():
    """(queries, positives per query, corpus or None) from the flags; raises on bad input."""
    from embedjax.data.readers import read_records
    from embedjax.mine import read_pairs_for_mining

    q_col, p_col = _column(_QUERY_COL.value), _column(_POSITIVE_COL.value)
    columns = None
    if q_col is not None or p_col is not None:
        if q_col is None or p_col is None:
            raise ValueError("--query_column and --positive_column go together (give both or neither)")
        columns = {"text_a": q_col, "text_b": p_col}
    queries, positives = read_pairs_for_mining(_PAIRS.value, columns=columns)
    corpus = None
    if _CORPUS.value is not None:
        col = _column(_CORPUS_COL.value)
        corpus = read_records(_CORPUS.value, "sentences", columns=None if col is None else {"text_a": col})
    return queries, positives, corpus


def main(argv) -> dict:
    """Mines, writes --output and prints a summary; returns the counts."""
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]} (all options are --flags)")
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("embedjax").setLevel(logging.INFO)
    import embedjax
    from embedjax.mine import check_options, mine_hard_negatives, write_jsonl

    options = dict(num_negatives=_NUM_NEG.value, rank_window=(_RANGE_MIN.value, _RANGE_MAX.value),
                   margin=_MARGIN.value, relative_margin=_RELATIVE.value, seed=_SEED.value,
                   on_short="skip" if _SKIP_SHORT.value else "keep")
    check_options(**options)  # bad input fails before the model loads
    if _BATCH.value < 1:
        raise ValueError(f"--batch_size must be >= 1, got {_BATCH.value}")
    if (_PAIRS.value is None) == (_BEIR.value is None):
        raise ValueError("give one of --pairs (a file of query, positive pairs) or --beir (a BEIR directory)")
    if _BEIR.value is not None:
        return _mine_beir(options)
    if _CROSS.value is not None and _FLAT.value:
        raise ValueError("--cross_encoder writes teacher scores, which --flat triplets do not carry")
    queries, positives, corpus = _read_inputs()
    cross_encoder = embedjax.load_cross_encoder(_CROSS.value) if _CROSS.value else None  # fails before mining
    encoder = embedjax.load_pretrained(_MODEL.value or hf.minilm_l6())
    stats = {}
    records = mine_hard_negatives(encoder, queries, positives, corpus, batch_size=_BATCH.value,
                                  query_prompt=_QUERY_PROMPT.value, corpus_prompt=_CORPUS_PROMPT.value,
                                  show_progress=None, stats=stats, **options)
    if cross_encoder is not None:
        from embedjax.mine import cross_encoder_teacher

        records = cross_encoder_teacher(records, cross_encoder, batch_size=_BATCH.value)
    stats["lines"] = write_jsonl(records, _OUTPUT.value, flat=_FLAT.value)
    short = f"{stats['short']} queries short of {_NUM_NEG.value} negatives"
    print(f"{stats['queries']} queries, {stats['corpus']} corpus texts: {stats['negatives']} negatives written "
          f"({stats['lines']} lines -> {_OUTPUT.value}); {short}"
          f"{' (skipped)' if _SKIP_SHORT.value and stats['short'] else ''}; dropped as false negatives: "
          f"{stats['filtered_margin']} by margin, {stats['filtered_relative']} by relative margin")
    return stats


def _mine_beir(options) -> dict:
    """--beir: mines the split's queries against the corpus, writes one line per query."""
    import embedjax
    from embedjax.data.retrieval_training import read_beir_training, write_hard_negatives
    from embedjax.mine import mine_beir

    if _FLAT.value or _CORPUS.value or _QUERY_COL.value or _POSITIVE_COL.value or _CROSS.value:
        raise ValueError("--flat, --corpus, --cross_encoder and the column flags are for --pairs; --beir reads the "
                         "BEIR files")
    read_beir_training(_BEIR.value, _SPLIT.value, min_grade=_MIN_GRADE.value)  # bad files fail before the model loads
    encoder = embedjax.load_pretrained(_MODEL.value or hf.minilm_l6())
    stats = {}
    query_ids, negatives, scores = mine_beir(encoder, _BEIR.value, _SPLIT.value, min_grade=_MIN_GRADE.value,
                                             batch_size=_BATCH.value, query_prompt=_QUERY_PROMPT.value,
                                             corpus_prompt=_CORPUS_PROMPT.value, show_progress=None, stats=stats,
                                             **options)
    stats["lines"] = write_hard_negatives(_OUTPUT.value, query_ids, negatives, scores)
    print(f"{stats['queries']} queries of {_BEIR.value} ({_SPLIT.value}), {stats['corpus']} documents: "
          f"{stats['negatives']} negatives written ({stats['lines']} lines -> {_OUTPUT.value}); {stats['short']} "
          f"queries short of {_NUM_NEG.value} negatives{' (skipped)' if _SKIP_SHORT.value and stats['short'] else ''}; "
          f"dropped as false negatives: {stats['filtered_margin']} by margin, {stats['filtered_relative']} by "
          "relative margin")
    return stats


def _absl_main(argv) -> None:
    cli.run(main, argv, debug=_DEBUG.value)  # returns None: absl exits with main's return value


if __name__ == "__main__":
    app.run(_absl_main)
