"""Load time and peak memory of BEIR training records (``data.kind="beir"``) on a large synthetic corpus.

    python benchmarks/beir_load.py [--docs 1000000] [--queries 100000] [--dir /tmp/beir_synth]

Writes (once; reused when present) a BEIR directory of ``--docs`` documents of about 350
characters (an MS MARCO passage's length), ``--queries`` queries and train qrels with 1-5
graded judgments per query, then, in a fresh process each, measures:

* ``read_beir_training``: the records training reads (documents held once, positives, relevant
  sets and hashes), and one pass of ``record_at`` over every query;
* ``read_beir``: the evaluator's reader of the same files, for scale.

Prints wall seconds and peak RSS (``ru_maxrss``) of each, and the corpus file's size.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("protein cell gene expression patients risk study effect disease treatment clinical trial dose "
         "increase decrease level blood brain heart cancer tumor receptor pathway model analysis data "
         "association vitamin diet sleep exercise therapy infection immune response mice human").split()


def write_corpus(d: Path, docs: int, queries: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    (d / "qrels").mkdir(parents=True, exist_ok=True)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    with (d / "corpus.jsonl").open("w") as f:
        for i in range(docs):
            f.write(json.dumps({"_id": f"d{i}", "title": text(6), "text": text(rng.randint(35, 55))}) + "\n")
    with (d / "queries.jsonl").open("w") as f:
        for i in range(queries):
            f.write(json.dumps({"_id": f"q{i}", "text": text(rng.randint(5, 12))}) + "\n")
    with (d / "qrels" / "train.tsv").open("w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(queries):
            for j in rng.sample(range(docs), rng.randint(1, 5)):
                f.write(f"q{i}\td{j}\t{rng.choice((1, 1, 2))}\n")


MEASURE = r"""
import resource, sys, time
sys.path.insert(0, {repo!r})
from embedjax.data.retrieval_readers import read_beir
from embedjax.data.retrieval_training import read_beir_training
t = time.perf_counter()  # after the imports: the readers' own time
if {what!r} == "training":
    records = read_beir_training({d!r}, "train")
    loaded = time.perf_counter() - t
    for i in range(len(records)):
        records.record_at(i, 1, 0)
    print(len(records), len(records.documents), loaded, time.perf_counter() - t - loaded,
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
else:
    data = read_beir({d!r}, "train")
    print(len(data.query_ids), len(data.corpus_ids), time.perf_counter() - t, 0.0,
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def measure(what: str, d: Path) -> tuple[int, int, float, float, float]:
    code = MEASURE.format(repo=str(Path(__file__).resolve().parents[1]), what=what, d=str(d))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    queries, docs, load_s, draw_s, rss_kib = int(out[0]), int(out[1]), float(out[2]), float(out[3]), int(out[4])
    return queries, docs, load_s, draw_s, rss_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/beir_synth"))
    args = parser.parse_args()
    d = args.dir / f"{args.docs}x{args.queries}"
    if not (d / "qrels" / "train.tsv").is_file():
        t = time.perf_counter()
        write_corpus(d, args.docs, args.queries)
        print(f"wrote {d} in {time.perf_counter() - t:.0f} s")
    size = (d / "corpus.jsonl").stat().st_size / 2**20
    print(f"corpus.jsonl {size:.0f} MiB, {args.docs:,} documents; {args.queries:,} queries")
    print("| reader | queries | documents | load s | one epoch of record_at s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for what, name in (("training", "read_beir_training (data.kind=beir)"), ("eval", "read_beir (evaluator)")):
        queries, docs, load_s, draw_s, rss = measure(what, d)
        draw = f"{draw_s:.1f}" if what == "training" else "-"
        print(f"| {name} | {queries:,} | {docs:,} | {load_s:.1f} | {draw} | {rss:,.0f} |")


if __name__ == "__main__":
    main()
