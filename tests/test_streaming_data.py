"""Streaming sources (embedjax/data/streaming.py): records read one at a time through an index equal
``read_records``' record for record (jsonl, tsv, csv, txt, Parquet, Arrow datasets), bad rows raise
the same file:line ``DataError`` when read, the index is rebuilt when the file changes, and the
training pipeline yields the same batches and resumes exactly (in process, and after SIGKILL on a
Parquet source). Reference values come from ``readers.read_records`` and, for Parquet / Arrow,
from ``read_records`` of a jsonl file holding the same rows."""

import json
import os
import pickle
import signal
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedjax.data import pipeline as P
from embedjax.data import readers as R
from embedjax.data import streaming as S
from embedjax.data.readers import DataError

pytestmark = pytest.mark.fast_compile  # the SIGKILL test compares with the shared straight run, compiled so

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def lines_of(source) -> list[int]:
    return [source.line(i) for i in range(len(source))]


# ---------------------------------------------------------------------------- text files

# Blank and whitespace-only lines, CRLF endings, a BOM, no final newline: read_records' rules.
TEXT_CASES = {
    "pairs.jsonl": ("pairs", {}, "\ufeff" + '{"text_a": "q1", "text_b": "p1"}\n\n  \t\r\n'
                    '{"text_a": "q2 \\u00e9", "text_b": "p2"}\r\n{"text_b": "p3", "text_a": "q3"}'),
    "triplets.jsonl": ("triplets", {}, jsonl([{"text_a": f"q{i}", "text_b": f"p{i}", "text_n": [f"n{i}", f"m{i}"]}
                                              for i in range(5)]) + "\n\n"),
    "distill.tsv": ("distill", {}, "q1\tp1\t[\"n1\", \"m1\"]\t[0.9, 0.1, 0.2]\n\n"
                    "q2\tp2\t[\"n2\", \"m2\"]\t[0.8, 0.3, 0.0]\n"),
    "scored.tsv": ("scored", {"columns": {"text_a": "s1", "text_b": "s2", "score": "gold"}},
                   "\n\ns2\tgold\ts1\nB\t1.5\tA\n\r\nD\t2\tC\nF\t3\tE"),
    "scored.csv": ("scored", {"score_range": (0, 5)}, 'A,"B, quoted",1\r\nC,D,2.5\n \nE,F,5\n'),
    "sentences.txt": ("sentences", {}, "  one  \n\ntwo\n\t\nthree\n"),
    "long.jsonl": ("pairs", {}, jsonl([{"text_a": "a" * 5000, "text_b": "b " * 9000}, {"text_a": "c", "text_b": "d"}])
                   + json.dumps({"text_a": "e", "text_b": "f" * 20000})),  # lines past one read
}


@pytest.mark.parametrize("name", sorted(TEXT_CASES))
def test_text_records_equal_read_records(tmp_path, name):
    kind, options, content = TEXT_CASES[name]
    path = write(tmp_path / name, content)
    ref = R.read_records(path, kind, **options)
    source = S.open_records(path, kind, **options)
    assert isinstance(source, S.TextRecords) and len(source) == len(ref) > 1
    assert list(source) == list(ref)
    assert lines_of(source) == ref.lines
    assert source[-1] == ref[-1]
    again = pickle.loads(pickle.dumps(source))  # grain may pickle a source; reopened, not rebuilt
    assert [again[i] for i in reversed(range(len(ref)))] == list(reversed(ref)) and not again.index.built


def python_line_scan(path: Path):
    """(starts of non-blank lines, numbers of blank lines) by a plain Python loop over the lines."""
    starts, blanks, offset = [], [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            (starts.append(offset) if line.rstrip(b"\n").rstrip(b"\r").strip() else blanks.append(number))
            offset += len(line)
    return starts, blanks


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 23])
def test_line_scan_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    rng = np.random.default_rng(chunk)
    pieces = [b"", b" ", b"\t", b"\r", b"x", b"\xc3\xa9", b"\x0b", b"\x0c", b"ab c", b"\x1c"]
    lines = [b"".join(rng.choice(pieces, size=rng.integers(0, 4))) for _ in range(300)]
    path = write(tmp_path / "lines.txt", b"\n".join(lines) + (b"" if chunk % 2 else b"\n"))
    monkeypatch.setattr(S, "_CHUNK", chunk)
    starts, blanks = S.scan_lines(path)
    ref_starts, ref_blanks = python_line_scan(path)
    assert starts.tolist() == ref_starts and blanks.tolist() == ref_blanks
    assert len(ref_blanks) > 20 and len(ref_starts) > 100  # both kinds of line were exercised


def test_bad_rows_raise_when_read_naming_file_and_line(tmp_path):
    rows = [json.dumps({"text_a": f"q{i}", "text_b": f"p{i}"}) for i in range(6)]
    rows[3] = '{"text_a": "q3", "text_b": ""}'
    rows[4] = '{"text_a": "q4", "text_b": "p4"'
    path = write(tmp_path / "bad.jsonl", "\n".join(rows[:2]) + "\n\n" + "\n".join(rows[2:]) + "\n")
    source = S.open_records(path, "pairs")  # opening reads the header and the first row only
    assert source[2] == R.Pair("q2", "p2")
    for i, line in ((3, 5), (4, 6)):
        with pytest.raises(DataError) as got:
            source[i]
        assert got.value.line == line and str(got.value).startswith(f"{path}:{line}: ")
        with pytest.raises(DataError) as ref:  # read_records on the bad row alone, at the same line
            R.read_records(write(tmp_path / "one.jsonl", "\n" * (line - 1) + rows[i] + "\n"), "pairs")
        assert got.value.message == ref.value.message
    assert source[5] == R.Pair("q5", "p5")  # the rows after a bad one still read

    # the whole-file errors read_records raises, on opening; a row's, on reading it
    cases = [("bad.tsv", "pairs", "a\tb\nc\td\te\n", {}, "expected 2 tab-separated columns (as on line 1, the first row)"),
             ("empty.jsonl", "pairs", "\n \n", {}, "file is empty"),
             ("head.tsv", "pairs", "x\ty\n\n", {"columns": {"text_a": "x", "text_b": "y"}}, "has a header but no rows"),
             ("first.tsv", "scored", "s1\ts2\tgold\na\tb\t1\n", {}, "If line 1 is a header, name the columns")]
    for name, kind, content, options, expected in cases:
        with pytest.raises(DataError) as ref:
            R.read_records(write(tmp_path / name, content), kind, **options)
        with pytest.raises(DataError) as got:
            S.open_records(tmp_path / name, kind, **options)[-1]
        assert str(got.value) == str(ref.value) and expected in str(got.value)


def test_index_is_stored_reused_and_rebuilt_when_the_file_changes(tmp_path):
    rows = [{"text_a": f"q{i}", "text_b": f"p{i}"} for i in range(4)]
    path = write(tmp_path / "d.jsonl", jsonl(rows))
    first = S.open_records(path, "pairs")
    assert first.index.built and first.index.file == tmp_path / "d.jsonl.index.npy"
    assert not S.open_records(path, "pairs").index.built  # reused

    write(path, jsonl(rows + [{"text_a": "new", "text_b": "row"}]))  # grows
    grown = S.open_records(path, "pairs")
    assert grown.index.built and list(grown) == list(R.read_records(path, "pairs"))

    write(path, "\n" + jsonl(rows)[:-1])  # the same size, another layout; and an older mtime
    os.utime(path, ns=(10**18, 10**18))
    same_size = S.open_records(path, "pairs")
    assert same_size.index.built and list(same_size) == list(R.read_records(path, "pairs"))
    assert lines_of(same_size) == [2, 3, 4, 5]


def test_index_goes_elsewhere_when_the_data_folder_takes_no_file(tmp_path, monkeypatch):
    path = write(tmp_path / "d.jsonl", jsonl([{"text_a": "a", "text_b": "b"}]))
    (tmp_path / "d.jsonl.index.npy").mkdir()  # nothing can be written there (as in a read-only folder)
    monkeypatch.setenv("EMBEDJAX_CACHE", str(tmp_path / "cache"))
    source = S.open_records(path, "pairs")
    assert source.index.file.parent == tmp_path / "cache" / "index" and source[0] == R.Pair("a", "b")
    assert not S.open_records(path, "pairs").index.built
    chosen = S.open_records(path, "pairs", index_dir=tmp_path / "idx")
    assert chosen.index.file.parent == tmp_path / "idx"


# ---------------------------------------------------------------------------- Parquet and Arrow

ROWS = {
    "pairs": [{"text_a": f"query {i}", "text_b": f"positive {i}", "extra": i} for i in range(40)],
    "scored": [{"text_a": f"a {i}", "text_b": f"b {i}", "score": i / 8} for i in range(40)],
    "distill": [{"text_a": f"q{i}", "text_b": f"p{i}", "text_n": [f"n{i}", f"m{i}"], "teacher": [0.9, i / 50, 0.1]}
                for i in range(40)],
    "sentences": [{"text_a": f"sentence {i}"} for i in range(40)],
}


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_parquet_and_arrow_dataset_equal_read_records_of_the_same_rows(tmp_path, kind):
    import datasets

    rows = ROWS[kind]
    ref = R.read_records(write(tmp_path / "ref.jsonl", jsonl(rows)), kind)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=7)
    parquet = S.open_records(tmp_path / "d.parquet", kind)
    assert isinstance(parquet, S.ArrowRecords) and list(parquet) == list(ref)
    datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]}).save_to_disk(
        str(tmp_path / "ds"), num_shards=3)
    arrow = S.open_records(tmp_path / "ds", kind)
    assert arrow.format == "arrow" and len(arrow.files) == 3 and list(arrow) == list(ref)
    assert pickle.loads(pickle.dumps(arrow))[17] == ref[17]


def test_columnar_column_mapping_by_name_and_position(tmp_path):
    rows = [{"id": i, "question": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    ref = R.read_records(write(tmp_path / "ref.jsonl", jsonl(rows)), "pairs",
                         columns={"text_a": "answer", "text_b": "question"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert list(S.open_records(tmp_path / "d.parquet", "pairs", columns={"text_a": "answer", "text_b": "question"})) \
        == list(ref)
    assert list(S.open_records(tmp_path / "d.parquet", "pairs", columns={"text_a": 2, "text_b": 1})) == list(ref)
    with pytest.raises(DataError, match=r"d\.parquet: missing column 'query' \(for text_a\)"):
        S.open_records(tmp_path / "d.parquet", "pairs", columns={"text_a": "query", "text_b": "answer"})


def test_parquet_bad_row_names_file_and_row(tmp_path):
    rows = [{"text_a": f"a {i}", "text_b": f"b {i}", "score": i / 5} for i in range(20)]
    rows[12]["score"] = 9.0
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet", row_group_size=5)
    source = S.open_records(tmp_path / "s.parquet", "scored", score_range=(0, 5))
    with pytest.raises(DataError) as got:
        source[12]
    with pytest.raises(DataError) as ref:  # read_records on the same row as jsonl, at line 13
        R.read_records(write(tmp_path / "one.jsonl", "\n" * 12 + json.dumps(rows[12]) + "\n"), "scored",
                       score_range=(0, 5))
    assert got.value.line == 13 and str(got.value).startswith(f"{tmp_path / 's.parquet'}:13: ")
    assert got.value.message == ref.value.message
    assert source[13].score == 13 / 5


def test_parquet_cache_is_rebuilt_when_the_file_changes(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS["pairs"][:10]), path)
    first = S.open_records(path, "pairs")
    cache = first.files[0]
    assert cache.parent == tmp_path and cache.suffix == ".arrow" and len(first) == 10
    mtime = cache.stat().st_mtime_ns
    assert S.open_records(path, "pairs").files[0].stat().st_mtime_ns == mtime  # reused
    pq.write_table(pa.Table.from_pylist(ROWS["pairs"][10:]), path)
    again = S.open_records(path, "pairs")
    assert len(again) == 30 and again[0] == R.Pair("query 10", "positive 10")


# ---------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def tok(minilm_path):
    from embedjax.tokenize import Tokenizer

    return Tokenizer.from_directory(minilm_path, 128, 0)  # MiniLM's tokenizer, no model


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(y)):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def files(tmp_path_factory, stsb_dir):
    """STS-B dev's first 61 pairs (7 batches of 8 and 5 left over) as tsv, jsonl and Parquet, and
    the in-memory records."""
    d = tmp_path_factory.mktemp("stream")
    pairs = R.read_stsb(stsb_dir / "sts-dev.csv")[:61]
    rows = [{"text_a": p.text_a, "text_b": p.text_b, "score": p.score} for p in pairs]
    write(d / "dev.tsv", "".join(f"{r['text_a']}\t{r['text_b']}\t{r['score']}\n" for r in rows))
    write(d / "dev.jsonl", jsonl(rows))
    pq.write_table(pa.Table.from_pylist(rows), d / "dev.parquet", row_group_size=16)
    return {"memory": list(R.read_records(d / "dev.jsonl", "scored")), "tsv": d / "dev.tsv",
            "jsonl": d / "dev.jsonl", "parquet": d / "dev.parquet"}


def train(source, tok, **kw):
    kw = {"global_batch_size": 8, "seed": 3, "shard_options": grain.sharding.ShardOptions(0, 1), **kw}
    return P.train_pipeline(source, tok, **kw)


@pytest.mark.parametrize("fmt", ["tsv", "jsonl", "parquet"])
def test_pipeline_batches_equal_the_in_memory_ones(files, tok, fmt):
    source = S.open_records(files[fmt], "scored")
    assert list(source) == files["memory"]
    packing = P.Packing(length=64)
    for host in range(2):  # host sharding and packing, over two epochs
        kw = dict(shard_options=grain.sharding.ShardOptions(host, 2), packing=packing)
        assert_batches_equal(take(train(source, tok, **kw), 10), take(train(files["memory"], tok, **kw), 10))


@pytest.mark.parametrize("fmt,stop", [("jsonl", 3), ("parquet", 10)])  # mid first epoch; mid second (7 a epoch)
def test_resume_on_a_streaming_source_is_exact(files, tok, fmt, stop):
    straight = take(train(files["memory"], tok), 16)
    first = train(S.open_records(files[fmt], "scored"), tok)
    assert_batches_equal(take(first, stop), straight[:stop])
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    del first
    resumed = train(S.open_records(files[fmt], "scored"), tok)  # a new process would reopen the file
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 16 - stop), straight[stop:])


# ---------------------------------------------------------------------------- training configs


def data_config(**overrides):
    sys.path.insert(0, str(REPO))
    from configs import base
    from embedjax.train.config import DataConfig

    return DataConfig.from_config({**base.base_config().data.to_dict(), **overrides})


def test_training_config_streams_parquet_arrow_and_text_on_request(files, tmp_path):
    from embedjax.train import sources

    scored = dict(kind="scored")
    in_memory = sources.train_source(data_config(train=str(files["jsonl"]), **scored))
    assert isinstance(in_memory, R.Rows) and list(in_memory) == files["memory"]  # the switch off: as before
    streamed = sources.train_source(data_config(train=str(files["jsonl"]), streaming=True, **scored))
    assert isinstance(streamed, S.TextRecords) and list(streamed) == files["memory"]
    parquet = sources.train_source(data_config(train=str(files["parquet"]), **scored))  # from the suffix
    assert isinstance(parquet, S.ArrowRecords) and list(parquet) == files["memory"]
    scores = sources.scores_of(parquet)
    assert sorted(scores) == sorted(r.score for r in files["memory"])
    assert sources.scores_of(streamed).tolist() == [r.score for r in files["memory"]]
    sentences = sources.train_source(data_config(kind="sentences", train=str(files["parquet"]), format="parquet",
                                                 columns={"text_a": "text_b"}, noise="delete"))
    assert [p.text_b for p in sentences] == [r.text_b for r in files["memory"]]  # noise is applied lazily

    checked = sources.train_source(data_config(train=str(files["parquet"]), skip_bad=True, **scored))
    assert isinstance(checked, S.WithoutBadRecords) and list(checked) == files["memory"] and checked.skipped == 0
    with pytest.raises(ValueError, match="data.streaming and data.format parquet / arrow read data.kind"):
        sources.train_source(data_config(streaming=True))  # kind stsb
    with pytest.raises(ValueError, match="data.format must be one of"):
        data_config(format="xlsx")
    with pytest.raises(ValueError, match="data.streaming must be True or False"):
        data_config(streaming="yes")


def test_streaming_keys_do_not_change_the_run():
    from embedjax.train.workdir import config_changes

    sys.path.insert(0, str(REPO))
    from configs import base

    old, new = base.base_config(), base.base_config()
    new.data.streaming, new.data.index_dir = True, "/tmp/idx"
    assert config_changes(old.to_dict(), new.to_dict()) == []
    legacy = old.to_dict()
    del legacy["data"]["streaming"], legacy["data"]["index_dir"]  # a workdir saved before these keys
    assert config_changes(legacy, new.to_dict()) == []


# ---------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_resume_after_sigkill_on_a_parquet_source_is_bitwise_exact(tiny_straight_run, tiny_train_overrides,
                                                                     stsb_dir, tmp_path):
    """tests/test_train.py's SIGKILL test with STS-B train as a Parquet file of scored pairs: the
    same records in the same order as the straight run's csv, so the killed-and-resumed run must
    give its loss curve and final parameters bit for bit."""
    from test_train import final_params, loss_curve, run_train

    train_rows = R.read_stsb(stsb_dir / "sts-train.csv")
    path = tmp_path / "sts-train.parquet"
    pq.write_table(pa.Table.from_pylist([{"text_a": p.text_a, "text_b": p.text_b, "score": p.score}
                                         for p in train_rows]), path, row_group_size=1000)
    overrides = {**tiny_train_overrides, "data.kind": "scored", "data.train": path}
    workdir = tmp_path / "killed"
    killed = run_train(workdir, overrides, check=False, kill_at=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed_run = run_train(workdir, overrides)  # from the newest complete checkpoint, the Parquet cache reopened
    assert "resumed from" in resumed_run.stdout + resumed_run.stderr
    straight, resumed = loss_curve(tiny_straight_run), loss_curve(workdir)
    assert sorted(straight) == sorted(resumed) == list(range(1, 9))
    assert straight == resumed
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(final_params(tiny_straight_run, 8)),
                         jax.tree.leaves(final_params(workdir, 8))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(p))


def test_skip_bad_streams_what_read_records_keeps(tmp_path):
    """``skip_bad=True``: the records, line numbers and skipped count of ``read_records(skip_bad=True)``,
    from a jsonl file (blank lines, broken JSON) and from a Parquet file of the same rows; picklable."""
    rows = [{"text_a": f"q{i}", "text_b": f"p{i}", "score": i / 10} for i in range(12)]
    rows[0]["text_a"] = ""  # the first row bad: what it would fix is fixed by the first good one
    rows[4]["score"] = float("nan")
    rows[5]["text_b"] = None
    rows[11]["text_a"] = "   "
    lines = [json.dumps(r) for r in rows]
    jsonl_path = write(tmp_path / "scored.jsonl", "\n".join(lines[:7]) + "\n\n" + '{"text_a": "x"' + "\n" +
                       "\n".join(lines[7:]) + "\n")
    ref = R.read_records(jsonl_path, "scored", skip_bad=True)
    assert ref.skipped == 5 and len(ref) == 8
    got = S.open_records(jsonl_path, "scored", skip_bad=True)
    assert isinstance(got, S.WithoutBadRecords) and got.skipped == ref.skipped
    assert list(got) == list(ref) and lines_of(got) == ref.lines and got[-1] == ref[-1]
    assert got.scores().tolist() == [r.score for r in ref]
    again = pickle.loads(pickle.dumps(got))  # the bad positions travel; the file is not checked again
    assert [again[i] for i in reversed(range(len(ref)))] == list(reversed(ref)) and again.skipped == 5
    with pytest.raises(DataError) as err:  # without skip_bad the bad first row fails on opening
        S.open_records(jsonl_path, "scored")
    assert err.value.line == 1

    parquet = tmp_path / "scored.parquet"  # the same rows as typed columns (a null text, a NaN score)
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in ("text_a", "text_b", "score")}), parquet)
    ref = R.read_records(write(tmp_path / "same.jsonl", "\n".join(lines) + "\n"), "scored", skip_bad=True)
    got = S.open_records(parquet, "scored", skip_bad=True, index_dir=tmp_path / "idx")
    assert list(got) == list(ref) and lines_of(got) == ref.lines and got.skipped == ref.skipped == 4

    # tsv: the first row (bad) fixes the column count, as in read_records
    tsv = write(tmp_path / "pairs.tsv", "\tb\nc\td\ne\tf\tg\nh\ti\n")
    ref = R.read_records(tsv, "pairs", skip_bad=True)
    got = S.open_records(tsv, "pairs", skip_bad=True)
    assert list(got) == list(ref) == [R.Pair("c", "d"), R.Pair("h", "i")] and lines_of(got) == ref.lines == [2, 4]

    every_row_bad = write(tmp_path / "bad.jsonl", '{"text_a": "", "text_b": "p"}\n{"text_a": "q"}\n')
    for read in (lambda: R.read_records(every_row_bad, "pairs", skip_bad=True),
                 lambda: S.open_records(every_row_bad, "pairs", skip_bad=True)):
        with pytest.raises(DataError, match=r"no usable rows \(all 2 row\(s\) were bad"):
            read()
