"""Data readers: the real STS-B / SICK files parse fully; every kind of bad input is reported
with the file, the 1-based line and what was expected, or skipped and counted."""

import logging

import pytest

from embedjax.data import readers as R
from embedjax.data.readers import DataError


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def raw_rows(path, skip_header=False):
    """The file split by tabs, independently of the code under test."""
    lines = [l for l in path.read_text(encoding="utf-8-sig").split("\n") if l.strip()]
    return [l.rstrip("\r").split("\t") for l in lines[1 if skip_header else 0:]]


def expect_error(fn, path, line, *expected):
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert path.name in msg
    assert info.value.line == line
    if line is not None:
        assert f"{path.name}:{line}:" in msg
    for text in expected:
        assert text in msg, f"{text!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------- real files


@pytest.mark.parametrize("split,count", [("sts-train.csv", 5749), ("sts-dev.csv", 1500)])
def test_stsb_real_files_parse_fully(stsb_dir, split, count):
    path = stsb_dir / split
    rows = R.read_stsb(path)
    raw = raw_rows(path)
    assert len(rows) == len(raw) == count and rows.skipped == 0
    for got, cols in zip(rows, raw):
        assert (got.text_a, got.text_b, got.score) == (cols[5], cols[6], float(cols[4]))


def test_stsb_dev_lines_with_extra_columns_are_read(stsb_dir):
    path = stsb_dir / "sts-dev.csv"
    raw = raw_rows(path)
    extra = [i for i, cols in enumerate(raw) if len(cols) > 7]
    assert extra, "sts-dev.csv is expected to hold lines with extra columns"
    rows = R.read_stsb(path)
    for i in extra:
        assert rows[i] == R.ScoredPair(raw[i][5], raw[i][6], float(raw[i][4]))
    # the generic reader, being strict about the column count, flags exactly those lines
    generic = R.read_scored_pairs(path, format="tsv", columns={"text_a": 5, "text_b": 6, "score": 4},
                                  score_range=(0, 5), skip_bad=True)
    assert generic.skipped == len(extra) and len(generic) == len(raw) - len(extra)


@pytest.mark.parametrize("split,count", [("SICK_train.txt", 4500), ("SICK_trial.txt", 500)])
def test_sick_real_files_parse_fully(sick_dir, split, count):
    path = sick_dir / split
    rows = R.read_sick(path)
    raw = raw_rows(path, skip_header=True)
    assert len(rows) == len(raw) == count
    for got, cols in zip(rows, raw):
        assert (got.text_a, got.text_b, got.score, got.label) == (cols[1], cols[2], float(cols[3]), cols[4])


# ---------------------------------------------------------------------------- STS-B / SICK bad input


def test_stsb_bad_rows(tmp_path):
    good = "g\tf\t2012\t1\t4.0\tA man.\tA person.\n"
    p = write(tmp_path, "few.csv", good + "g\tf\t2012\t2\t4.0\tonly one sentence\n")
    expect_error(lambda: R.read_stsb(p), p, 2, "expected >= 7 tab-separated columns", "found 6")
    p = write(tmp_path, "nan.csv", good + good + "g\tf\t2012\t3\tfour\ta\tb\n")
    expect_error(lambda: R.read_stsb(p), p, 3, "'four' is not a number", "0.0..5.0")
    p = write(tmp_path, "range.csv", "g\tf\t2012\t3\t5.5\ta\tb\n" + good)
    expect_error(lambda: R.read_stsb(p), p, 1, "5.5 is out of range", "0.0..5.0")


def test_sick_bad_rows(tmp_path):
    head = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
    p = write(tmp_path, "label.txt", head + "1\ta\tb\t3.0\tNEUTRAL\n2\ta\tb\t3.0\tMAYBE\n")
    expect_error(lambda: R.read_sick(p), p, 3, "'MAYBE' is not one of", "ENTAILMENT")
    p = write(tmp_path, "range.txt", head + "1\ta\tb\t0.5\tNEUTRAL\n")
    expect_error(lambda: R.read_sick(p), p, 2, "out of range", "1.0..5.0")
    p = write(tmp_path, "cols.txt", head + "1\ta\tb\n")
    expect_error(lambda: R.read_sick(p), p, 2, "expected 5 tab-separated columns", "found 3")
    p = write(tmp_path, "headonly.txt", head)
    expect_error(lambda: R.read_sick(p), p, None, "no usable rows", "header but no rows")


# ---------------------------------------------------------------------------- generic readers: good input


def test_generic_formats_and_column_mapping(tmp_path):
    tsv = write(tmp_path, "p.tsv", "x\tanchor\tpositive\n1\tA cat.\tA kitten.\n2\tA dog.\tA puppy.\n")
    assert R.read_pairs(tsv, columns={"text_a": "anchor", "text_b": "positive"}) == [
        R.Pair("A cat.", "A kitten."), R.Pair("A dog.", "A puppy.")]
    assert R.read_pairs(tsv, columns={"text_a": 2, "text_b": 1}, header=True)[1] == R.Pair("A puppy.", "A dog.")

    csv_ = write(tmp_path, "t.csv", 'a,"b, with a comma","say ""hi"""\n"x",y,z\n')
    assert R.read_triplets(csv_) == [R.Triplet("a", "b, with a comma", 'say "hi"'), R.Triplet("x", "y", "z")]

    jsonl = write(tmp_path, "s.jsonl", '{"s1": "a", "s2": "b", "label": 0.25}\n\n{"s1": "c", "s2": "d", "label": "1"}\n')
    rows = R.read_scored_pairs(jsonl, columns={"text_a": "s1", "text_b": "s2", "score": "label"}, score_range=(0, 1))
    assert rows == [R.ScoredPair("a", "b", 0.25), R.ScoredPair("c", "d", 1.0)]
    arrays = write(tmp_path, "arr.jsonl", '["a", "b", "c"]\n')
    assert R.read_triplets(arrays, columns={"text_a": 0, "text_b": 1, "text_n": 2}) == [R.Triplet("a", "b", "c")]
    default = write(tmp_path, "d.jsonl", '{"text_a": "a", "text_b": "b"}\n')
    assert R.read_pairs(default) == [R.Pair("a", "b")]

    txt = write(tmp_path, "s.txt", b"\xef\xbb\xbfFirst sentence.\r\n  Second one. \n\n")
    assert R.read_sentences(txt) == ["First sentence.", "Second one."]
    assert R.read_sentences(tsv, columns={"text_a": "anchor"}) == ["A cat.", "A dog."]


def test_generic_reader_argument_errors(tmp_path):
    p = write(tmp_path, "p.tsv", "a\tb\n")
    with pytest.raises(ValueError, match="missing"):
        R.read_pairs(p, columns={"text_a": 0})
    with pytest.raises(ValueError, match="header=True"):
        R.read_pairs(p, columns={"text_a": "a", "text_b": "b"}, header=False)
    with pytest.raises(ValueError, match="cannot tell the format"):
        R.read_pairs(write(tmp_path, "p.dat", "a\tb\n"))
    with pytest.raises(ValueError, match="one sentence per line"):
        R.read_pairs(p, format="txt")


# ---------------------------------------------------------------------------- generic readers: bad input

TSV_ROWS = "a1\tb1\n" "a2\tb2\n"


@pytest.mark.parametrize(
    "name,content,read,line,expected",
    [
        ("cols.tsv", TSV_ROWS + "a3\tb3\textra\n", R.read_pairs, 3,
         ["expected 2 tab-separated columns", "as on line 1", "found 3"]),
        ("cols_header.tsv", "q\tp\n" + TSV_ROWS + "lonely\n",
         lambda p: R.read_pairs(p, columns={"text_a": "q", "text_b": "p"}), 4,
         ["expected 2 tab-separated columns", "header on line 1", "found 1"]),
        ("cols.csv", "a,b\nc,d,e\n", R.read_pairs, 2, ["expected 2 comma-separated columns", "found 3"]),
        ("fixed.tsv", TSV_ROWS, lambda p: R.read_pairs(p, num_columns=3), 1,
         ["expected 3 tab-separated columns (num_columns)", "found 2"]),
        ("quote.csv", 'a,b\n"c,d\ne,f\n', R.read_pairs, 2, ["malformed CSV", "closed by a matching double quote"]),
        ("quote2.csv", 'a,b\nc,"d"e\n', R.read_pairs, 2, ["malformed CSV", "double quote"]),
        ("json.jsonl", '{"text_a": "a", "text_b": "b"}\n{"text_a": "a", "text_b": }\n', R.read_pairs, 2,
         ["invalid JSON", "expected one JSON object per line"]),
        ("scalar.jsonl", '"just a string"\n', R.read_pairs, 1, ["expected a JSON object (or array)", "found str"]),
        ("key.jsonl", '{"text_a": "a", "text_b": "b"}\n{"text_a": "a"}\n', R.read_pairs, 2,
         ["missing key 'text_b'", "expected a JSON object with keys ['text_a', 'text_b']"]),
        ("index.tsv", TSV_ROWS, lambda p: R.read_pairs(p, columns={"text_a": 0, "text_b": 4}), 1,
         ["missing column 5 (for text_b)", "expected at least 5 columns"]),
        ("header.tsv", "q\tp\n" + TSV_ROWS, lambda p: R.read_pairs(p, columns={"text_a": "q", "text_b": "pos"}), 1,
         ["missing column 'pos' (for text_b)", "expected it in the header", "['q', 'p']"]),
        ("notnum.tsv", "a\tb\t0.5\nc\td\thigh\n", lambda p: R.read_scored_pairs(p, score_range=(0, 1)), 2,
         ["score (column 2) 'high' is not a number", "expected a number in 0.0..1.0"]),
        ("nullscore.jsonl", '{"text_a": "a", "text_b": "b", "score": null}\n', R.read_scored_pairs, 1,
         ["None is not a number", "expected a finite number"]),
        ("range.tsv", "a\tb\t0.5\nc\td\t1.5\n", lambda p: R.read_scored_pairs(p, score_range=(0, 1)), 2,
         ["1.5 is out of range", "expected a number in 0.0..1.0"]),
        ("inf.tsv", "a\tb\tinf\n", R.read_scored_pairs, 1, ["inf is out of range", "expected a finite number"]),
        ("emptytext.tsv", "a\tb\n \tb\n", lambda p: R.read_pairs(p, num_columns=2), 2,
         ["text_a (column 0) is empty", "expected non-empty text"]),
        ("type.jsonl", '{"text_a": "a", "text_b": 3}\n', R.read_pairs, 1, ["text_b must be a string", "found int"]),
        ("utf8.tsv", b"a1\tb1\na2\t\xff\xfeb2\n", R.read_pairs, 2, ["undecodable bytes at column 4", "expected UTF-8"]),
        ("utf8.txt", b"fine\n\nbad \xc3\x28\n", R.read_sentences, 3, ["undecodable bytes", "expected UTF-8"]),
        ("utf8.jsonl", b'{"text_a": "\xe9", "text_b": "b"}\n', R.read_pairs, 1, ["undecodable bytes"]),
        ("empty.tsv", "", R.read_pairs, None, ["file is empty", "expected at least one row"]),
        ("blank.txt", " \n\n\t\n", R.read_sentences, None, ["file is empty"]),
        ("empty.jsonl", b"", R.read_triplets, None, ["file is empty"]),
    ],
)
def test_generic_bad_input_names_file_line_and_expectation(tmp_path, name, content, read, line, expected):
    path = write(tmp_path, name, content)
    expect_error(lambda: read(path), path, line, *expected)


def test_skip_bad_counts_and_logs(tmp_path, caplog):
    path = write(tmp_path, "mixed.tsv",
                 b"a\tb\t1\n"          # ok
                 b"c\td\n"             # wrong column count
                 b"e\tf\tlots\n"       # non-numeric score
                 b"g\th\t9\n"          # out of range
                 b"i\t\xff\t2\n"       # undecodable
                 b"j\tk\t3\n")         # ok
    with pytest.raises(DataError):
        R.read_scored_pairs(path, score_range=(0, 5))
    with caplog.at_level(logging.WARNING, logger="embedjax.data.readers"):
        rows = R.read_scored_pairs(path, score_range=(0, 5), skip_bad=True)
    assert rows == [R.ScoredPair("a", "b", 1.0), R.ScoredPair("j", "k", 3.0)]
    assert rows.skipped == 4
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "mixed.tsv" in logged and "skipped 4 bad row(s)" in logged and "mixed.tsv:2:" in logged


def test_skip_bad_on_every_reader(tmp_path):
    stsb = write(tmp_path, "s.csv", "g\tf\ty\t1\t3.0\ta\tb\ng\tf\ty\t2\tx\ta\tb\n")
    assert R.read_stsb(stsb, skip_bad=True).skipped == 1
    sick = write(tmp_path, "k.txt", "header\nshort\n1\ta\tb\t3\tNEUTRAL\n2\ta\tb\t3\tNOPE\n")
    rows = R.read_sick(sick, skip_bad=True)
    assert len(rows) == 1 and rows.skipped == 2
    jsonl = write(tmp_path, "t.jsonl", '{"text_a":"a","text_b":"b","text_n":"c"}\n{oops\n')
    assert R.read_triplets(jsonl, skip_bad=True).skipped == 1
    txt = write(tmp_path, "u.txt", b"one\n\xff\ntwo\n")
    rows = R.read_sentences(txt, skip_bad=True)
    assert rows == ["one", "two"] and rows.skipped == 1


def test_skip_bad_with_nothing_left_raises(tmp_path):
    path = write(tmp_path, "allbad.csv", 'a,"b\nc,"d\n')
    expect_error(lambda: R.read_pairs(path, skip_bad=True), path, None, "no usable rows", "all 2 row(s) were bad")


def test_bad_header_is_not_skippable(tmp_path):
    path = write(tmp_path, "h.tsv", "q\tp\na\tb\n")
    with pytest.raises(DataError, match="missing column 'x'"):
        R.read_pairs(path, columns={"text_a": "q", "text_b": "x"}, skip_bad=True)


# ---------------------------------------------------------------------------- SICK -> SimCSE triplets


def test_sick_triplets_rule():
    E, C, N = "ENTAILMENT", "CONTRADICTION", "NEUTRAL"
    pairs = [
        R.NLIPair("a", "a+", 4.0, E),
        R.NLIPair("a", "a-", 1.0, C),
        R.NLIPair("a2+", "a", 4.0, E),      # entails a only in the B -> A direction
        R.NLIPair("a", "x", 3.0, N),
        R.NLIPair("b", "b+", 4.0, E),       # b has no contradiction partner
        R.NLIPair("c", "both", 4.0, E),     # conflicting labels for (c, both)
        R.NLIPair("c", "both", 1.0, C),
        R.NLIPair("c", "c+", 4.0, E),
        R.NLIPair("c-", "c", 1.0, C),
    ]
    assert R.sick_triplets(pairs, symmetric=False) == [R.Triplet("a", "a+", "a-")]
    assert R.sick_triplets(pairs) == [
        R.Triplet("a", "a+", "a-"),
        R.Triplet("a", "a2+", "a-"),
        R.Triplet("c", "c+", "c-"),
    ]


def test_sick_triplets_on_real_data_follow_the_labels(sick_dir):
    path = sick_dir / "SICK_train.txt"
    labels = {}
    for cols in raw_rows(path, skip_header=True):
        labels[(cols[1], cols[2])] = labels[(cols[2], cols[1])] = cols[4]
    triplets = R.read_sick_triplets(path)
    assert len(triplets) > 100
    for t in triplets:
        assert labels[(t.text_a, t.text_b)] == "ENTAILMENT"
        assert labels[(t.text_a, t.text_n)] == "CONTRADICTION"
        assert len({t.text_a, t.text_b, t.text_n}) == 3
    assert len(set(triplets)) == len(triplets)
    directional = R.read_sick_triplets(path, symmetric=False)
    assert 0 < len(directional) < len(triplets)


def test_rows_record_their_line_numbers(tmp_path):
    path = write(tmp_path, "lines.tsv", "q\tp\n\na\tb\nbad\n\nc\td\n")
    rows = R.read_pairs(path, columns={"text_a": "q", "text_b": "p"}, skip_bad=True)
    assert rows == [R.Pair("a", "b"), R.Pair("c", "d")]
    assert rows.lines == [3, 6] and rows.skipped == 1
