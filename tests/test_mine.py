"""Hard-negative mining (embedjax.mine, scripts/mine.py) against a brute-force NumPy miner."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from embedjax import mine
from embedjax.data.readers import Triplet, read_records

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mine.py"


def brute_force(query, corpus, positives, *, n, lo, hi, margin=None, relative=None, seed=0, metric="dot"):
    """The documented rule, written out with float64 NumPy: full ranking (ties: lower index first),
    positives out, ranks [lo, hi), false negatives out, then sorted positions drawn by
    default_rng([seed, i]).choice(m, min(n, m), replace=False). Returns (negatives, found, dropped)."""
    q, c = np.asarray(query, np.float64), np.asarray(corpus, np.float64)
    if metric == "cosine":
        q, c = q / np.linalg.norm(q, axis=1, keepdims=True), c / np.linalg.norm(c, axis=1, keepdims=True)
    s = q @ c.T
    out = np.full((len(q), n), -1)
    found, dropped_m, dropped_r = [], [], []
    for i in range(len(q)):
        order = [j for j in np.argsort(-s[i], kind="stable") if j not in set(positives[i])][lo:hi]
        pos = min(s[i, j] for j in positives[i])
        bad_m = [margin is not None and s[i, j] > pos - margin for j in order]
        bad_r = [relative is not None and s[i, j] > relative * pos for j in order]
        cands = [j for j, a, b in zip(order, bad_m, bad_r) if not (a or b)]
        rng = np.random.default_rng([seed, i])
        picks = sorted(rng.choice(len(cands), size=min(n, len(cands)), replace=False))
        out[i, : len(picks)] = [cands[p] for p in picks]
        found.append(len(picks))
        dropped_m.append(sum(bad_m))
        dropped_r.append(sum(bad_r))
    return out, np.array(found), np.array(dropped_m), np.array(dropped_r)


def integer_case(seed=0, q=24, n=160, d=6):
    """Small-integer embeddings: dot scores are exact in float32 and full of ties."""
    rng = np.random.default_rng(seed)
    query = rng.integers(-3, 4, (q, d)).astype(np.float32)
    corpus = rng.integers(-3, 4, (n, d)).astype(np.float32)
    positives = [list(rng.choice(n, size=rng.integers(1, 4), replace=False)) for _ in range(q)]
    return query, corpus, positives


def one_device_mesh():
    return jax.make_mesh((1,), ("corpus",), devices=jax.devices()[:1])


@pytest.mark.parametrize("margin, relative", [(None, None), (2.0, None), (None, 0.75), (1.0, 0.5)])
def test_matches_brute_force_on_any_device_count(margin, relative):
    query, corpus, positives = integer_case()
    kw = dict(num_negatives=5, rank_window=(3, 40), margin=margin, relative_margin=relative, seed=7, metric="dot")
    want, found, dropped_m, dropped_r = brute_force(query, corpus, positives, n=5, lo=3, hi=40, margin=margin,
                                                    relative=relative, seed=7)
    assert len(jax.devices()) == 8
    got = mine.mine_from_embeddings(query, corpus, positives, **kw)  # corpus over 8 devices
    np.testing.assert_array_equal(got.negatives, want)
    np.testing.assert_array_equal(got.num_found, found)
    np.testing.assert_array_equal(got.filtered_margin, dropped_m)
    np.testing.assert_array_equal(got.filtered_relative, dropped_r)
    np.testing.assert_array_equal(got.query_ids, np.arange(len(query)))
    scores = query.astype(np.float64) @ corpus.T.astype(np.float64)
    rows = np.arange(len(query))[:, None]
    real = want >= 0
    np.testing.assert_array_equal(got.scores[real], scores[rows, np.maximum(want, 0)][real])
    assert np.all(got.scores[~real] == -np.inf)
    np.testing.assert_array_equal(got.positive_scores, [scores[i, p].min() for i, p in enumerate(positives)])
    if margin is not None or relative is not None:
        assert dropped_m.sum() + dropped_r.sum() > 0  # the case trips the filters
    one = mine.mine_from_embeddings(query, corpus, positives, mesh=one_device_mesh(), **kw)
    np.testing.assert_array_equal(one.negatives, got.negatives)


def test_seed_changes_the_draw_and_fixes_it():
    query, corpus, positives = integer_case(1)
    kw = dict(num_negatives=4, rank_window=(0, 60), metric="dot")
    a = mine.mine_from_embeddings(query, corpus, positives, seed=0, **kw).negatives
    b = mine.mine_from_embeddings(query, corpus, positives, seed=1, **kw).negatives
    again = mine.mine_from_embeddings(query, corpus, positives, seed=0, **kw).negatives
    np.testing.assert_array_equal(a, again)
    assert (a != b).any(axis=1).mean() > 0.8  # most queries draw other negatives
    # a query's draw depends on its index, not on the other queries: mining a prefix changes nothing
    head = mine.mine_from_embeddings(query[:5], corpus, positives[:5], seed=0, **kw).negatives
    np.testing.assert_array_equal(head, a[:5])


def test_window_bounds_count_ranks_without_the_positives():
    query, corpus, positives = integer_case(2, q=6, n=50)
    lo, hi = 4, 9
    got = mine.mine_from_embeddings(query, corpus, positives, num_negatives=hi - lo, rank_window=(lo, hi),
                                    metric="dot")
    s = query.astype(np.float64) @ corpus.T.astype(np.float64)
    for i in range(len(query)):
        ranking = [j for j in np.argsort(-s[i], kind="stable") if j not in positives[i]]
        np.testing.assert_array_equal(got.negatives[i], ranking[lo:hi])  # all of the window, in rank order


def _at_cosine(c, sign):
    """A unit vector in 3-D at cosine c to e1 (sign and a third axis keep the texts apart)."""
    return np.array([c, sign * np.sqrt(1 - c * c) * 0.8, np.sqrt(1 - c * c) * 0.6])


def test_filters_drop_near_duplicates_of_the_positive():
    """Query e1; positive at cosine 0.8; candidates above, near and below it."""
    cosines = [0.95, 0.79, 0.78, 0.74, 0.72, 0.69, 0.5, 0.2, -0.3]
    corpus = np.stack([_at_cosine(0.8, 1)] + [_at_cosine(c, (-1) ** k) for k, c in enumerate(cosines)])
    query = np.array([[1.0, 0.0, 0.0]])
    everything = dict(num_negatives=len(cosines), rank_window=(0, len(corpus)))

    def kept(**kw):
        res = mine.mine_from_embeddings(query, corpus, [[0]], **everything, **kw)
        negs = res.negatives[0][res.negatives[0] >= 0]
        assert 0 not in negs  # the positive is never a negative
        return sorted(cosines[j - 1] for j in negs), res

    assert kept()[0] == sorted(cosines)
    got, res = kept(margin=0.05)  # drop cos > 0.75
    assert got == [-0.3, 0.2, 0.5, 0.69, 0.72, 0.74]
    assert res.filtered_margin[0] == 3 and res.filtered_relative[0] == 0
    assert res.positive_scores[0] == pytest.approx(0.8, abs=1e-6)
    assert kept(margin=0.1)[0] == [-0.3, 0.2, 0.5, 0.69]  # drop cos > 0.7
    got, res = kept(relative_margin=0.95)  # drop cos > 0.76
    assert got == [-0.3, 0.2, 0.5, 0.69, 0.72, 0.74]
    assert res.filtered_relative[0] == 3 and res.filtered_margin[0] == 0
    assert kept(relative_margin=0.875)[0] == [-0.3, 0.2, 0.5, 0.69]  # drop cos > 0.7
    # several positives (cosines 0.8 and 0.72): the lowest sets the bound, drop cos > 0.67
    res = mine.mine_from_embeddings(query, corpus, [[0, 5]], margin=0.05, **everything)
    negs = res.negatives[0][res.negatives[0] >= 0]
    assert sorted(cosines[j - 1] for j in negs) == [-0.3, 0.2, 0.5]
    assert res.positive_scores[0] == pytest.approx(0.72, abs=1e-6)


def test_short_queries_are_reported_kept_or_skipped(caplog):
    query, corpus, positives = integer_case(3, q=8, n=30)
    positives[2] = list(range(20))  # leaves 10 candidates: short of 12
    with caplog.at_level(logging.WARNING, logger="embedjax.mine"):
        res = mine.mine_from_embeddings(query, corpus, positives, num_negatives=12, rank_window=(0, 100),
                                        metric="dot")
    assert res.num_short == 1 and res.num_found[2] == 10 and (res.num_found[np.arange(8) != 2] == 12).all()
    assert (res.negatives[2, 10:] == -1).all() and not set(res.negatives[2, :10]) & set(positives[2])
    assert "1 of 8 queries got fewer than 12 negatives" in caplog.text
    skipped = mine.mine_from_embeddings(query, corpus, positives, num_negatives=12, rank_window=(0, 100),
                                        metric="dot", on_short="skip")
    np.testing.assert_array_equal(skipped.query_ids, [0, 1, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(skipped.negatives, res.negatives[skipped.query_ids])
    assert skipped.num_short == 1


@pytest.mark.parametrize("kw, message", [
    (dict(rank_window=(5, 5)), "0 <= lo < hi"),
    (dict(rank_window=5), "pair (lo, hi)"),
    (dict(relative_margin=1.5), "relative_margin must be in (0, 1]"),
    (dict(margin=-0.1), "margin must be a finite number >= 0"),
    (dict(num_negatives=0), "num_negatives must be an int >= 1"),
    (dict(on_short="drop"), "on_short must be one of"),
    (dict(positive_ids=[[0], [99]]), "positive_ids[1] holds corpus index 99"),
    (dict(positive_ids=[[0]]), "one list of corpus indices per query (2)"),
    (dict(positive_ids=[[0], []], margin=0.1), "positive_ids[1] is empty"),
])
def test_bad_arguments_are_named(kw, message):
    args = {"positive_ids": [[0], [1]], "num_negatives": 2, **kw}
    with pytest.raises(ValueError) as err:
        mine.mine_from_embeddings(np.ones((2, 4)), np.eye(6, 4), **args)
    assert message in str(err.value)


# ---------------------------------------------------------------------------- texts and files


QUERIES = ["how do plants make food", "what is the capital of france", "how many legs does a spider have"]
POSITIVES = [["photosynthesis turns light into sugar"], ["paris is the capital of france", "paris"],
             ["a spider has eight legs"]]
CORPUS = ["the eiffel tower is in paris", "insects have six legs", "cooking pasta takes ten minutes",
          "what is the capital of france",  # a query's own text: never its negative
          "café au lait is coffee with milk", "the sun is a star", "insects have six legs", "paris"]


def test_text_mining_records_and_flat_triplets(tiny_model, tiny_cross_encoder, tmp_path):
    import embedjax
    from embedjax import sharding

    enc = embedjax.load_pretrained(tiny_model)
    stats = {}
    records = mine.mine_hard_negatives(enc, QUERIES, POSITIVES, CORPUS, num_negatives=20, rank_window=(0, 50),
                                       batch_size=4, stats=stats)
    assert [(r["text_a"], r["text_b"]) for r in records] == [(q, p) for q, ps in zip(QUERIES, POSITIVES) for p in ps]
    corpus = list(dict.fromkeys(CORPUS)) + ["photosynthesis turns light into sugar", "paris is the capital of france",
                                            "a spider has eight legs"]
    assert stats == dict(queries=3, records=4, negatives=sum(len(corpus) - len(p) - (q in corpus)
                                                              for q, p in zip(QUERIES, POSITIVES)),
                         short=3, filtered_margin=0, filtered_relative=0, corpus=len(corpus))
    mesh = sharding.local_mesh()  # as mine_hard_negatives encodes (no second compile)
    q_emb, c_emb = enc.encode(QUERIES, mesh=mesh), enc.encode(corpus, mesh=mesh)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    cos = unit(q_emb.astype(np.float64)) @ unit(c_emb.astype(np.float64)).T
    for r in records:
        i = QUERIES.index(r["text_a"])
        # the window holds the whole corpus: every text but the positives and the query itself
        assert sorted(r["text_n"]) == sorted(t for t in corpus if t not in POSITIVES[i] and t != r["text_a"])
        want = [cos[i, corpus.index(r["text_b"])]] + [cos[i, corpus.index(t)] for t in r["text_n"]]
        np.testing.assert_allclose(r["teacher"], want, atol=2e-5)
        assert r["teacher"][1:] == sorted(r["teacher"][1:], reverse=True)  # best-ranked first

    out = tmp_path / "sub" / "mined.jsonl"
    assert mine.write_jsonl(records, out) == 4
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records
    assert "café" in out.read_text(encoding="utf-8")  # not \u-escaped
    flat = tmp_path / "flat.jsonl"
    n_lines = mine.write_jsonl(records, flat, flat=True)
    triplets = read_records(flat, "triplets")
    assert n_lines == len(triplets) == sum(len(r["text_n"]) for r in records)
    assert triplets == [Triplet(r["text_a"], r["text_b"], n) for r in records for n in r["text_n"]]

    # a cross-encoder's raw logits as the teacher: sentence-transformers' CrossEncoder without activation
    import torch
    from sentence_transformers import CrossEncoder

    rescored = mine.cross_encoder_teacher(records, embedjax.load_cross_encoder(tiny_cross_encoder), batch_size=3)
    st = CrossEncoder(str(tiny_cross_encoder), device="cpu", activation_fn=torch.nn.Identity())
    for r, new in zip(records, rescored):
        assert {k: v for k, v in new.items() if k != "teacher"} == {k: v for k, v in r.items() if k != "teacher"}
        want = st.predict([(r["text_a"], t) for t in [r["text_b"], *r["text_n"]]])
        np.testing.assert_allclose(new["teacher"], want, atol=1e-5)
        assert np.ptp(new["teacher"]) > 0.1

    default = mine.mine_hard_negatives(enc, QUERIES, POSITIVES, num_negatives=2)  # corpus = the positives
    assert all(len(r["text_n"]) == 2 and len(r["teacher"]) == 3 for r in default)
    pool = {p for ps in POSITIVES for p in ps}
    assert all(set(r["text_n"]) <= pool - set(POSITIVES[QUERIES.index(r["text_a"])]) for r in default)


def test_read_pairs_groups_positives_per_query(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("q1\tp1\nq2\tp2\nq1\tp3\nq1\tp1\n")
    assert mine.read_pairs_for_mining(path) == (["q1", "q2"], [["p1", "p3"], ["p2"]])
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "a", "pos": "b"}\n{"query": "a", "pos": "c"}\n')
    assert mine.read_pairs_for_mining(path, columns={"text_a": "query", "text_b": "pos"}) == (["a"], [["b", "c"]])


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_script_end_to_end_and_bad_input(tiny_model, tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{q}\t{p}\n" for q, ps in zip(QUERIES, POSITIVES) for p in ps))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    out = tmp_path / "mined.jsonl"
    proc = _run("--model", tiny_model, "--pairs", pairs, "--corpus", corpus, "--output", out, "--num_negatives", 2,
                "--range_min", 1, "--range_max", 6, "--seed", 3, "--flat")
    assert proc.returncode == 0, proc.stderr[-3000:]
    triplets = read_records(out, "triplets")
    assert len(triplets) == 8  # 4 (query, positive) pairs x 2 negatives
    assert "3 queries" in proc.stdout and "6 negatives written (8 lines" in proc.stdout, proc.stdout
    assert "0 queries short" in proc.stdout

    proc = _run("--model", tiny_model, "--pairs", pairs, "--output", out, "--flat", "--cross_encoder", tiny_model)
    assert proc.returncode == 2 and "--flat triplets do not carry" in proc.stderr, proc.stderr[-3000:]

    missing = tmp_path / "nope.tsv"
    proc = _run("--model", tiny_model, "--pairs", missing, "--output", out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(missing) in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
