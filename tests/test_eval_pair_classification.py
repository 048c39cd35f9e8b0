"""Pair classification: metrics vs brute force and hand arithmetic, the evaluator vs
sentence-transformers' BinaryClassificationEvaluator, and the labelled-pair reader."""

import numpy as np
import pytest

from embedjax.data.pair_readers import LabelledPair, read_labelled_pairs, read_sick_binary
from embedjax.data.readers import DataError
from embedjax.eval import pair_classification as pc

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

# ---------------------------------------------------------------- naive references (brute force)


def naive_cuts(scores):
    """Every distinct threshold t ("positive iff score >= t"), strictest first, plus +inf (none)."""
    return [np.inf] + sorted(set(scores.tolist()), reverse=True)


def naive_best(scores, labels, value):
    """The strictest threshold maximising value(predicted, labels), by trying every one."""
    best_t, best_v = None, -1.0
    for t in naive_cuts(scores):
        v = value(scores >= t, labels)
        if v > best_v:
            best_t, best_v = t, v
    return best_v, best_t


def accuracy(pred, labels):
    return float(np.mean(pred == labels.astype(bool)))


def prf(pred, labels):
    tp = int(np.sum(pred & (labels == 1)))
    if tp == 0:
        return 0.0, 0.0, 0.0
    p, r = tp / int(pred.sum()), tp / int(labels.sum())
    return 2 * p * r / (p + r), p, r


def naive_ap(scores, labels):
    """Mean over positives of the precision among pairs scoring at least as high."""
    return float(np.mean([np.mean(labels[scores >= s]) for s in scores[labels == 1]]))


def check_threshold(scores, threshold, t_naive):
    """The reported threshold predicts exactly what the brute-force one does, and lies at the
    midpoint of the cut (or at the lowest score / just above the highest at the ends)."""
    np.testing.assert_array_equal(scores >= threshold, scores >= t_naive)
    below = scores[scores < t_naive]
    if np.isinf(t_naive):
        assert scores.max() < threshold < scores.max() + 1e-6
    elif below.size:
        assert threshold == pytest.approx((t_naive + below.max()) / 2, rel=1e-6, abs=1e-7)
    else:
        assert threshold == t_naive


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_brute_force(ties):
    rng = np.random.default_rng(1 + ties)
    for _ in range(150):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]  # both classes present
        # Many tied scores in one case (a coarse grid), none in the other.
        scores = (rng.integers(0, 5, n) / 4.0 if ties else rng.normal(size=n)).astype(np.float32)

        acc, t_acc = pc.best_accuracy(scores, labels)
        acc_naive, t_naive = naive_best(scores, labels, accuracy)
        assert acc == pytest.approx(acc_naive, abs=1e-12)
        check_threshold(scores, np.float32(t_acc), t_naive)

        f1, p, r, t_f1 = pc.best_f1(scores, labels)
        f1_naive, t_naive = naive_best(scores, labels, lambda pred, y: prf(pred, y)[0])
        assert (f1, p, r) == pytest.approx(prf(scores >= t_naive, labels), abs=1e-12)
        assert f1 == pytest.approx(f1_naive, abs=1e-12)
        check_threshold(scores, np.float32(t_f1), t_naive)

        assert pc.average_precision(scores, labels) == pytest.approx(naive_ap(scores, labels), abs=1e-12)


def test_hand_computed_with_ties():
    # sorted best first: 0.9 (1) | 0.8 (1), 0.8 (0) | 0.6 (1) | 0.3 (0), 0.3 (0); 3 positives, 3 negatives
    scores = np.array([0.8, 0.3, 0.9, 0.6, 0.3, 0.8], np.float32)
    labels = np.array([1, 0, 1, 1, 0, 0])
    # accuracy = (tp + tn) / 6 after each tie group: none 3/6; 0.9: (1+3)/6; 0.8: (2+2)/6;
    # 0.6: (3+2)/6 = 5/6 (best); 0.3: (3+0)/6. Threshold between 0.6 and 0.3: 0.45.
    acc, t = pc.best_accuracy(scores, labels)
    assert acc == pytest.approx(5 / 6)
    assert t == pytest.approx(0.45, rel=1e-6)
    # F1 = 2pr/(p+r): 0.9: p=1, r=1/3 -> 1/2; 0.8: p=2/3, r=2/3 -> 2/3; 0.6: p=3/4, r=1 -> 6/7 (best);
    # 0.3: p=1/2, r=1 -> 2/3. The tie at 0.8 is never split (it would give p=1, r=2/3 -> 0.8).
    f1, p, r, t = pc.best_f1(scores, labels)
    assert (f1, p, r) == pytest.approx((6 / 7, 3 / 4, 1.0))
    assert t == pytest.approx(0.45, rel=1e-6)
    # AP = sum of recall gain x precision per tie group: 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/4 + 0 = 29/36
    assert pc.average_precision(scores, labels) == pytest.approx(29 / 36)

    # The same as distances d = 1 - score (positive iff d <= threshold): thresholds as distances.
    d = 1 - scores
    m = pc.binary_metrics(-d, labels, distance=True)
    assert m["accuracy"] == pytest.approx(5 / 6) and m["f1"] == pytest.approx(6 / 7)
    assert m["accuracy_threshold"] == pytest.approx(0.55, rel=1e-6)  # between d = 0.4 and 0.7
    assert m["f1_threshold"] == pytest.approx(0.55, rel=1e-6)
    assert m["ap"] == pytest.approx(29 / 36)


def test_hand_computed_ends():
    # sorted: 0.9 (0) | 0.5 (0) | 0.1 (1). Accuracy: none 2/3; 0.9: 1/3; 0.5: 0/3; 0.1: 1/3 ->
    # predicting all negative is best, threshold just above the top score.
    scores = np.array([0.9, 0.1, 0.5], np.float32)
    labels = np.array([0, 1, 0])
    acc, t = pc.best_accuracy(scores, labels)
    assert acc == pytest.approx(2 / 3)
    assert t == np.nextafter(np.float32(0.9), np.float32(np.inf))
    # F1 > 0 only with all three positive: p = 1/3, r = 1 -> 2 * (1/3) / (4/3) = 1/2, threshold 0.1.
    f1, p, r, t = pc.best_f1(scores, labels)
    assert (f1, p, r) == pytest.approx((0.5, 1 / 3, 1.0))
    assert t == pytest.approx(0.1)
    # AP: the one positive ranks last, precision 1/3 there.
    assert pc.average_precision(scores, labels) == pytest.approx(1 / 3)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="both 0 and 1"):
        pc.best_accuracy([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        pc.best_f1([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="same length"):
        pc.average_precision([0.1, 0.2, 0.3], [0, 1])


# ---------------------------------------------------------------- the evaluator


@pytest.fixture(scope="module")
def sick_trial(sick_dir):
    """The first 200 pairs of SICK trial (both labels occur; the parity needs no more)."""
    return read_sick_binary(sick_dir / "SICK_trial.txt")[:200]


def test_evaluator_matches_sentence_transformers(minilm, st_minilm, sick_trial):
    from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator

    ev = pc.PairClassificationEvaluator(sick_trial, name="sick_trial")
    ours = dict(ev.run(minilm))
    st = BinaryClassificationEvaluator([p.text_a for p in sick_trial], [p.text_b for p in sick_trial],
                                       [p.label for p in sick_trial], name="sick_trial", write_csv=False,
                                       similarity_fn_names=["cosine", "dot", "euclidean", "manhattan"])(st_minilm)
    keys = ["accuracy", "accuracy_threshold", "f1", "precision", "recall", "f1_threshold", "ap"]
    for metric in ("cosine", "dot", "euclidean", "manhattan"):
        for key in keys:
            name = f"sick_trial_{metric}_{key}"
            assert ours[f"sick_trial/{metric}_{key}"] == pytest.approx(st[name], rel=1e-4, abs=1e-6), name
    for key in ("ap", "accuracy", "f1"):
        assert ours[f"sick_trial/max_{key}"] == pytest.approx(st[f"sick_trial_max_{key}"], rel=1e-4)
    assert {p.label for p in sick_trial} == {0, 1}
    assert ev.main_metric == "max_ap" and st[f"sick_trial_{'max_ap'}"] > 0.5  # a real signal, not chance
    assert len(ours) == 4 * len(keys) + 3


def test_score_int8_and_binary_embeddings():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 16)).astype(np.float32), rng.normal(size=(40, 16)).astype(np.float32)
    labels = (np.sum(a * b, axis=1) + rng.normal(size=40) > 0).astype(int)
    pairs = [LabelledPair(f"a{i}", f"b{i}", int(y)) for i, y in enumerate(labels)]
    ev = pc.PairClassificationEvaluator(pairs, metrics=("dot", "manhattan"))

    # int8 is scored as floats: same numbers as the float32 copy of the same values.
    q_a, q_b = np.round(a * 20).astype(np.int8), np.round(b * 20).astype(np.int8)
    as_int = ev.score({"a": q_a, "b": q_b})
    as_float = ev.score({"a": q_a.astype(np.float32), "b": q_b.astype(np.float32)})
    assert as_int == pytest.approx(as_float)
    assert as_int["dot_ap"] == pytest.approx(naive_ap(np.sum(q_a.astype(np.float32) * q_b, axis=1), labels))

    # Packed sign bits: hamming only, thresholds as (positive) bit distances.
    bits_a, bits_b = np.packbits(a > 0, axis=1), np.packbits(b > 0, axis=1)
    out = ev.score({"a": bits_a, "b": bits_b})
    assert sorted(out) == sorted([f"hamming_{k}" for k in ("accuracy", "accuracy_threshold", "f1", "precision",
                                                           "recall", "f1_threshold", "ap")]
                                 + ["max_ap", "max_accuracy", "max_f1"])
    hamming = np.sum((a > 0) != (b > 0), axis=1)  # unpacked, by hand
    acc, t_naive = naive_best(-hamming.astype(np.float64), labels, accuracy)
    assert out["hamming_accuracy"] == pytest.approx(acc)
    np.testing.assert_array_equal(hamming <= out["hamming_accuracy_threshold"], -hamming >= t_naive)
    assert out["hamming_ap"] == pytest.approx(naive_ap(-hamming.astype(np.float64), labels))
    assert out["max_ap"] == out["hamming_ap"]


def test_evaluator_rejects_bad_pairs():
    with pytest.raises(ValueError, match="both present"):
        pc.PairClassificationEvaluator([LabelledPair("a", "b", 1)] * 3)
    with pytest.raises(ValueError, match="no pairs"):
        pc.PairClassificationEvaluator([])
    with pytest.raises(ValueError, match="metrics"):
        pc.PairClassificationEvaluator([LabelledPair("a", "b", 1), LabelledPair("a", "c", 0)], metrics=("angle",))


def test_from_spec(tmp_path, sick_dir):
    f = tmp_path / "pairs.csv"
    f.write_text("first,second,dup\nA cat sits.,A cat is sitting.,true\nA cat sits.,Stocks fell.,0\n")
    ev = pc.from_spec("dups", {"path": str(f), "columns": {"text_a": "first", "text_b": "second", "label": "dup"},
                               "metrics": ["cosine"], "batch_size": 8})
    assert ev.name == "dups" and ev.metrics == ("cosine",) and ev.batch_size == 8
    assert ev.pairs == [LabelledPair("A cat sits.", "A cat is sitting.", 1), LabelledPair("A cat sits.", "Stocks fell.", 0)]
    sick = pc.from_spec("sick", {"path": sick_dir / "SICK_trial.txt", "reader": "sick"})
    assert len(sick.pairs) == 500
    with pytest.raises(ValueError, match=r"unknown keys \['pth'\]; allowed: \['path', 'format'"):
        pc.from_spec("x", {"pth": str(f)})
    with pytest.raises(ValueError, match="'path' is required"):
        pc.from_spec("x", {})
    with pytest.raises(ValueError, match="reader must be"):
        pc.from_spec("x", {"path": str(f), "reader": "nli"})


# ---------------------------------------------------------------- the reader


def test_read_labelled_pairs_formats(tmp_path):
    expected = [LabelledPair("a b", "c", 1), LabelledPair("d", "e f", 0), LabelledPair("g", "h", 1)]
    (tmp_path / "p.tsv").write_text("a b\tc\t1\n\nd\te f\t0\ng\th\tTrue\n")
    (tmp_path / "p.csv").write_text('a b,c,1\nd,"e f",false\r\ng,h,1.0\n')
    (tmp_path / "p.jsonl").write_text('{"text_a": "a b", "text_b": "c", "label": 1}\n'
                                      '{"text_a": "d", "text_b": "e f", "label": false}\n'
                                      '{"text_a": "g", "text_b": "h", "label": "true"}\n')
    for name in ("p.tsv", "p.csv", "p.jsonl"):
        assert list(read_labelled_pairs(tmp_path / name)) == expected, name
    rows = read_labelled_pairs(tmp_path / "p.tsv")
    assert rows.lines == [1, 3, 4]
    (tmp_path / "h.tsv").write_text("id\ts1\ts2\tis_dup\n7\tx\ty\t0\n8\tx\tz\t1\n")
    got = read_labelled_pairs(tmp_path / "h.tsv", columns={"text_a": "s1", "text_b": "s2", "label": "is_dup"})
    assert list(got) == [LabelledPair("x", "y", 0), LabelledPair("x", "z", 1)]


@pytest.mark.parametrize("name, text, line, message", [
    ("bad_label.tsv", "a\tb\t1\nc\td\t2\n", 2, "label (column 2) '2' is not a binary label"),
    ("yes.tsv", "a\tb\tyes\n", 1, "'yes' is not a binary label"),
    ("cols.tsv", "a\tb\t1\nc\td\te\t0\n", 2, "expected 3 tab-separated columns (as on line 1, the first row), found 4"),
    ("short.csv", "x,y,label\na,b,1\n\nc,0\n", 4, "expected 3 comma-separated columns"),
    ("empty_text.tsv", "a\tb\t1\n \tb\t0\n", 2, "text_a (column 0) is empty"),
    ("json.jsonl", '{"text_a": "a", "text_b": "b", "label": 1}\n{"text_a": "a", "label": 0}\n', 2,
     "missing key 'text_b'"),
    ("float.jsonl", '{"text_a": "a", "text_b": "b", "label": 0.5}\n', 1, "0.5 is not a binary label"),
    ("broken.jsonl", '{"text_a": "a", "text_b": "b", "label": 1}\n\n{"text_a": \n', 3, "invalid JSON"),
])
def test_read_labelled_pairs_errors(tmp_path, name, text, line, message):
    path = tmp_path / name
    path.write_text(text)
    header = name == "short.csv"
    with pytest.raises(DataError) as err:
        read_labelled_pairs(path, header=header or None)
    assert err.value.line == line and err.value.path == path
    assert f"{path}:{line}: " in str(err.value) and message in str(err.value)


def test_read_labelled_pairs_skip_bad_and_header_errors(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("a\tb\t1\nc\td\tmaybe\ne\tf\t0\n")
    rows = read_labelled_pairs(path, skip_bad=True)
    assert list(rows) == [LabelledPair("a", "b", 1), LabelledPair("e", "f", 0)] and rows.skipped == 1
    with pytest.raises(DataError, match=r":1: missing column 'label'"):
        read_labelled_pairs(path, columns={"text_a": "a", "text_b": "b", "label": "label"})
    with pytest.raises(ValueError, match="exactly"):
        read_labelled_pairs(path, columns={"text_a": 0, "text_b": 1})
    with pytest.raises(ValueError, match="tsv, csv or jsonl"):
        read_labelled_pairs(tmp_path / "p.txt")


def test_read_sick_binary(sick_dir):
    path = sick_dir / "SICK_trial.txt"
    pairs = read_sick_binary(path)
    fields = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    assert len(pairs) == len(fields) == 500
    assert [p.label for p in pairs] == [int(f[4].strip() == "ENTAILMENT") for f in fields]
    assert (pairs[0].text_a, pairs[0].text_b) == (fields[0][1], fields[0][2])
    assert all(type(p.label) is int for p in pairs)
