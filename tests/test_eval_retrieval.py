"""Retrieval: BEIR reader, ranking metrics, sharded exact top-k and the RetrievalEvaluator.

References are independent: naive loops written here, pytrec_eval, and sentence-transformers'
InformationRetrievalEvaluator on the same model and data.
"""

import json
import math

import jax
import numpy as np
import pytest

from embedjax.data.readers import DataError
from embedjax.data.retrieval_readers import BeirData, read_beir
from embedjax.eval import quantize, ranking_metrics as rm, retrieval, search

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

# ------------------------------------------------------------------ naive references (loops over ranks)


def naive_metrics(ranked, judged, k):
    """One query: ranked doc ids, judged {doc: relevance}; pytrec_eval's definitions."""
    top = ranked[:k]
    rel = [judged.get(d, 0) for d in top]
    n_rel = sum(1 for r in judged.values() if r > 0)
    dcg = sum(max(r, 0) / math.log2(i + 2) for i, r in enumerate(rel))
    ideal = sorted(judged.values(), reverse=True)[:k]
    idcg = sum(max(r, 0) / math.log2(i + 2) for i, r in enumerate(ideal))
    mrr, hits, ap = 0.0, 0, 0.0
    for i, r in enumerate(rel):
        if r > 0:
            hits += 1
            ap += hits / (i + 1)
            if mrr == 0.0:
                mrr = 1 / (i + 1)
    return {"ndcg": dcg / idcg if idcg else 0.0, "mrr": mrr, "recall": hits / n_rel if n_rel else 0.0,
            "precision": hits / k, "map": ap / n_rel if n_rel else 0.0, "accuracy": float(hits > 0)}


def naive_scores(ranked_lists, qrels_list, ks):
    out = {}
    for k in ks:
        per_query = [naive_metrics(r, j, k) for r, j in zip(ranked_lists, qrels_list)]
        for name in rm.RETRIEVAL_METRICS:
            out[f"{name}@{k}"] = float(np.mean([m[name] for m in per_query]))
    return out


def naive_topk(scores, k):
    """Best k per row of a full score matrix; ties to the lower index (stable sort)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def numpy_cosine(q, c):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    return q.astype(np.float64) @ c.astype(np.float64).T


def random_run(rng, n_queries=40, n_docs=60, depth=25):
    """Ranked lists (distinct docs) and graded qrels 0..3, every query with >= 1 relevant doc."""
    docs = [f"d{i}" for i in range(n_docs)]
    ranked, qrels = [], []
    for _ in range(n_queries):
        ranked.append(list(rng.choice(docs, depth, replace=False)))
        judged_docs = rng.choice(docs, rng.integers(1, 12), replace=False)
        judged = {d: int(rng.integers(0, 4)) for d in judged_docs}
        judged[judged_docs[0]] = int(rng.integers(1, 4))
        qrels.append(judged)
    return ranked, qrels


def scores_of(ranked, qrels, ks):
    rels = rm.ranked_relevance(ranked, qrels, max(ks))
    ideal, n_rel = rm.ideal_relevance(qrels)
    return rm.retrieval_scores(rels, ideal, n_rel, ks)


# ------------------------------------------------------------------ metrics


def test_metrics_hand_computed():
    ranked = [["a", "x", "b", "y"], ["x", "y", "z", "w"]]
    qrels = [{"a": 2, "b": 1, "c": 1}, {"z": 1, "x": 0}]
    s = scores_of(ranked, qrels, (2, 3))
    # q1: rels (2, 0, 1, 0), judged (2, 1, 1), R = 3.  q2: rels (0, 0, 1, 0), R = 1.
    # ndcg@3 q1: DCG = 2/log2(2) + 0 + 1/log2(4) = 2.5; IDCG = 2 + 1/log2(3) + 1/log2(4) = 3.130930
    #   -> 0.798486;  q2: DCG = 1/log2(4) = 0.5, IDCG = 1 -> 0.5.  mean = 0.649243
    assert s["ndcg@3"] == pytest.approx((2.5 / (2 + 1 / math.log2(3) + 0.5) + 0.5) / 2, abs=1e-12)
    assert s["ndcg@3"] == pytest.approx(0.649243, abs=1e-6)
    # ndcg@2 q1: DCG = 2, IDCG = 2 + 1/log2(3) = 2.630930 -> 0.760188; q2: 0 -> mean 0.380094
    assert s["ndcg@2"] == pytest.approx(0.380094, abs=1e-6)
    # mrr@3: q1 1/1, q2 1/3 -> 2/3;  mrr@2: q1 1, q2 0 -> 1/2
    assert s["mrr@3"] == pytest.approx(2 / 3) and s["mrr@2"] == pytest.approx(0.5)
    # recall@3: q1 2/3, q2 1/1 -> 5/6;  precision@3: q1 2/3, q2 1/3 -> 1/2
    assert s["recall@3"] == pytest.approx(5 / 6) and s["precision@3"] == pytest.approx(0.5)
    # map@3: q1 (1/1 + 2/3) / 3 = 5/9, q2 (1/3) / 1 -> (5/9 + 1/3) / 2 = 4/9
    assert s["map@3"] == pytest.approx(4 / 9)
    # map@2: q1 (1/1) / 3 = 1/3, q2 0 -> 1/6;  accuracy@2: q1 yes, q2 no -> 1/2
    assert s["map@2"] == pytest.approx(1 / 6) and s["accuracy@2"] == pytest.approx(0.5)
    # precision@k beyond the list still divides by k: q1 2/5, q2 1/5 (lists of 4 padded)
    assert scores_of(ranked, qrels, (5,))["precision@5"] == pytest.approx(0.3)


def test_metrics_equal_naive_on_random_runs():
    rng = np.random.default_rng(0)
    ranked, qrels = random_run(rng)
    ks = (1, 3, 5, 10, 25, 30)
    ours, ref = scores_of(ranked, qrels, ks), naive_scores(ranked, qrels, ks)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert 0 < ours["ndcg@10"] < 1  # a non-trivial case


def test_metrics_equal_pytrec_eval():
    import pytrec_eval

    rng = np.random.default_rng(1)
    ranked, qrels = random_run(rng, n_queries=50, depth=30)
    ks = (1, 3, 5, 10, 30)
    qrels_t = {f"q{i}": j for i, j in enumerate(qrels)}
    # Distinct decreasing scores: trec_eval's own ordering (and tie-breaking) plays no part.
    run = {f"q{i}": {d: float(len(r) - rank) for rank, d in enumerate(r)} for i, r in enumerate(ranked)}
    measures = {f"{m}.{','.join(map(str, ks))}" for m in ("ndcg_cut", "map_cut", "recall", "P")} | {"recip_rank"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels_t, measures).evaluate(run)
    ref = lambda m: np.mean([per_query[f"q{i}"][m] for i in range(len(ranked))])  # noqa: E731
    ours = scores_of(ranked, qrels, ks)
    for k in ks:
        assert ours[f"ndcg@{k}"] == pytest.approx(ref(f"ndcg_cut_{k}"), abs=1e-9)
        assert ours[f"map@{k}"] == pytest.approx(ref(f"map_cut_{k}"), abs=1e-9)
        assert ours[f"recall@{k}"] == pytest.approx(ref(f"recall_{k}"), abs=1e-9)
        assert ours[f"precision@{k}"] == pytest.approx(ref(f"P_{k}"), abs=1e-9)
    # recip_rank is uncut: equal to MRR at the full depth.
    assert ours["mrr@30"] == pytest.approx(ref("recip_rank"), abs=1e-9)


# ------------------------------------------------------------------ sharded top-k


def one_device_mesh():
    return jax.make_mesh((1,), ("corpus",), devices=jax.devices()[:1])


@pytest.mark.parametrize("n", [64, 101])
def test_sharded_topk_8_devices_equals_1_and_numpy(n):
    assert len(jax.devices()) == 8
    rng = np.random.default_rng(n)
    q, c = rng.normal(size=(37, 24)).astype(np.float32), rng.normal(size=(n, 24)).astype(np.float32)
    c[n // 2] = c[3]  # an exact tie: the lower index must win
    s8, i8 = search.sharded_topk(q, c, 20, chunk_size=5, query_chunk_size=16)
    s1, i1 = search.sharded_topk(q, c, 20, mesh=one_device_mesh())
    np.testing.assert_array_equal(i8, i1)
    np.testing.assert_allclose(s8, s1, atol=1e-6)
    full = numpy_cosine(q, c)
    np.testing.assert_array_equal(i8, naive_topk(full, 20))
    np.testing.assert_allclose(s8, np.take_along_axis(full, i8, 1), atol=1e-6)


def test_sharded_topk_ties_go_to_lower_index():
    c = np.tile(np.eye(4, 8, dtype=np.float32), (5, 1))  # rows i and i+4, i+8, ... are identical
    q = np.eye(4, 8, dtype=np.float32)
    _, idx = search.sharded_topk(q, c, 5)
    np.testing.assert_array_equal(idx, np.arange(4)[:, None] + 4 * np.arange(5)[None, :])


def test_sharded_topk_padding_never_wins():
    # Every real cosine is negative, so a zero padding row (cosine 0) would win if not masked.
    rng = np.random.default_rng(3)
    c = np.abs(rng.normal(size=(13, 8))).astype(np.float32) + 0.1
    q = -np.abs(rng.normal(size=(5, 8))).astype(np.float32) - 0.1
    s, i = search.sharded_topk(q, c, 13)  # 13 rows on 8 devices: 3 padding rows
    assert (i < 13).all() and (s < 0).all()
    np.testing.assert_array_equal(np.sort(i, axis=1), np.tile(np.arange(13), (5, 1)))
    np.testing.assert_array_equal(i, naive_topk(numpy_cosine(q, c), 13))


def test_sharded_topk_hamming():
    rng = np.random.default_rng(4)
    q = quantize.binary(rng.normal(size=(21, 64)))
    c = quantize.binary(rng.normal(size=(99, 64)))
    s8, i8 = search.sharded_topk(q, c, 30, metric="hamming", chunk_size=7)
    s1, i1 = search.sharded_topk(q, c, 30, metric="hamming", mesh=one_device_mesh())
    np.testing.assert_array_equal(i8, i1)
    np.testing.assert_array_equal(s8, s1)
    # numpy: -popcount(xor), ties (many with 64 bits) to the lower index
    dist = np.unpackbits(q[:, None, :] ^ c[None, :, :], axis=-1).sum(-1).astype(np.int64)
    np.testing.assert_array_equal(i8, naive_topk(-dist, 30))
    np.testing.assert_array_equal(s8, -np.take_along_axis(dist, i8, 1))


def naive_hamming(a, b):
    """Bit by bit: the number of differing sign bits of every pair of packed rows."""
    out = np.zeros((len(a), len(b)), np.int64)
    for i in range(len(a)):
        for j in range(len(b)):
            for x, y in zip(a[i], b[j]):
                out[i, j] += sum(((int(x) >> s) & 1) != ((int(y) >> s) & 1) for s in range(8))
    return out


@pytest.mark.parametrize("dim", [24, 64, 70])  # 3, 8, 9 bytes: whole uint32 words or zero-padded ones
def test_hamming_on_words_equals_a_bit_loop(dim):
    from embedjax import similarity

    rng = np.random.default_rng(dim)
    a, b = quantize.binary(rng.normal(size=(5, dim))), quantize.binary(rng.normal(size=(7, dim)))
    want = naive_hamming(a, b)
    np.testing.assert_array_equal(-np.asarray(similarity.hamming_matrix(a, b)), want)
    np.testing.assert_array_equal(-np.asarray(similarity.hamming_pairwise(a[:, None], b[None])), want)


def test_binary_rescored_topk():
    rng = np.random.default_rng(8)
    q, c = rng.normal(size=(23, 32)).astype(np.float32), rng.normal(size=(150, 32)).astype(np.float32)
    c[77] = c[5]  # an exact tie: the lower index must win after rescoring too
    qb, cb = quantize.binary(q), quantize.binary(c)
    hamming = naive_hamming(qb, cb)
    for metric, full in (("cosine", numpy_cosine(q, c)), ("euclidean", -np.linalg.norm(q[:, None] - c[None], axis=-1))):
        # a shortlist of the whole corpus: the exact search, 8 devices or 1
        s8, i8 = search.binary_rescored_topk(q, c, 10, rescore_multiplier=15, metric=metric)
        s1, i1 = search.binary_rescored_topk(q, c, 10, rescore_multiplier=15, metric=metric, mesh=one_device_mesh())
        np.testing.assert_array_equal(i8, naive_topk(full, 10))
        np.testing.assert_array_equal(i8, i1)
        np.testing.assert_allclose(s8, np.take_along_axis(full, i8, 1), atol=1e-5)
        # a short list: the 20 nearest by Hamming distance (ties to the lower index), re-ranked exactly
        _, idx = search.binary_rescored_topk(q, c, 10, rescore_multiplier=2, metric=metric)
        shortlist = naive_topk(-hamming.astype(float), 20)
        masked = np.full(full.shape, -np.inf)
        np.put_along_axis(masked, shortlist, np.take_along_axis(full, shortlist, 1), 1)
        np.testing.assert_array_equal(idx, naive_topk(masked, 10))
    s0, i0 = search.binary_rescored_topk(q, c, 10, rescore_multiplier=0)  # no rescoring: the Hamming ranking
    np.testing.assert_array_equal(i0, naive_topk(-hamming.astype(float), 10))
    np.testing.assert_array_equal(s0, -np.take_along_axis(hamming, i0, 1))
    with pytest.raises(ValueError, match="corpus_bits"):
        search.binary_rescored_topk(q, c, 10, corpus_bits=cb[:, :2])


def test_sharded_topk_rejects_bad_input():
    x = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match="k <= corpus size"):
        search.sharded_topk(x, x, 4)
    with pytest.raises(ValueError, match="hamming"):
        search.sharded_topk(x, x, 2, metric="hamming")
    with pytest.raises(ValueError, match=r"\(Q, D\)"):
        search.sharded_topk(x, np.ones((3, 4), np.float32), 2)


# ------------------------------------------------------------------ BEIR reader


def write_beir(directory, corpus, queries, qrels, split="test"):
    """corpus: [(id, title, text)], queries: [(id, text)], qrels: [(qid, did, score)]."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n" for i, t, x in corpus))
    (directory / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in queries))
    (directory / "qrels").mkdir(exist_ok=True)
    (directory / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return directory


@pytest.fixture
def beir_dir(tmp_path):
    return write_beir(tmp_path / "beir", [("d1", "Title", "body one"), ("d2", "", "body two"), ("d3", " ", "three")],
                      [("q1", "first?"), ("q2", "second?")], [("q1", "d1", 2), ("q1", "d2", 0), ("q2", "d3", 1)])


def test_read_beir(beir_dir):
    data = read_beir(beir_dir)
    assert data.corpus_ids == ("d1", "d2", "d3")
    assert data.corpus_texts == ("Title body one", "body two", "three")  # empty / blank title: text alone
    assert data.query_ids == ("q1", "q2") and data.query_texts == ("first?", "second?")
    assert data.qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d3": 1}}


def test_read_beir_missing_split_lists_the_others(beir_dir):
    with pytest.raises(DataError, match=r"no qrels for split 'dev'.*\['test'\]"):
        read_beir(beir_dir, split="dev")


@pytest.mark.parametrize("file, content, line, message", [
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d2", "text": "b"\n', 2, "invalid JSON"),
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n\n{"text": "b"}\n', 3, "missing key '_id'"),
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d2", "title": "t"}\n', 2, "missing key 'text'"),
    ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n', 2, r"duplicate _id 'd1' \(first on line 1\)"),
    ("corpus.jsonl", '{"_id": "d1", "text": 5}\n', 1, "text must be a string"),
    ("queries.jsonl", '{"_id": "q1", "text": "a"}\n[1, 2]\n', 2, "expected a JSON object"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\n", 2, "expected 3 tab-separated columns"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t0.5\n", 3, "not an integer"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq9\td1\t1\n", 2, "query-id 'q9' is not in queries.jsonl"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td9\t1\n", 2, "corpus-id 'd9' is not in corpus.jsonl"),
    ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t2\n", 3, "duplicate judgment"),
    ("qrels/test.tsv", "q1\td1\t1\n", 1, "expected the header"),
])
def test_read_beir_errors_name_file_and_line(beir_dir, file, content, line, message):
    (beir_dir / file).write_text(content)
    with pytest.raises(DataError, match=message) as err:
        read_beir(beir_dir)
    assert err.value.line == line and err.value.path.name == file.split("/")[-1]


# ------------------------------------------------------------------ evaluator on given embeddings


def synthetic(rng, n_queries=30, n_docs=90, dim=32, shared_ids=False):
    """BeirData whose query i is also document i when shared_ids (its own embedding: a self-hit)."""
    corpus_ids = [f"{i}" if shared_ids else f"d{i}" for i in range(n_docs)]
    query_ids = [f"{i}" if shared_ids else f"q{i}" for i in range(n_queries)]
    qrels = {}
    for qid in query_ids:
        docs = [d for d in rng.choice(corpus_ids, 5, replace=False) if d != qid][:4]
        qrels[qid] = {d: int(rng.integers(0, 3)) for d in docs} | {docs[0]: 2}  # graded, >= 1 relevant
    qrels[query_ids[-1]] = {corpus_ids[-1]: 0}  # no relevant judgment: skipped
    data = BeirData(tuple(corpus_ids), tuple(f"doc {i}" for i in corpus_ids), tuple(query_ids),
                    tuple(f"query {i}" for i in query_ids), qrels)
    c = rng.normal(size=(n_docs, dim)).astype(np.float32)
    q = rng.normal(size=(n_queries, dim)).astype(np.float32)
    if shared_ids:
        q = c[:n_queries] + 0.01 * q  # each query is closest to itself
    return data, q, c


def naive_evaluation(data, q_scores, ks, query_ids):
    """Rank by the given (Q, N) scores (stable), drop self-hits, naive metrics."""
    qrels = [data.qrels[qid] for qid in query_ids]
    ranked = []
    for row, qid in zip(q_scores, query_ids):
        ids = [data.corpus_ids[i] for i in np.argsort(-row, kind="stable")]
        ranked.append([d for d in ids if d != qid][: max(ks)])
    return naive_scores(ranked, qrels, ks)


@pytest.mark.parametrize("shared_ids", [False, True])
def test_evaluator_float_equals_naive(shared_ids):
    rng = np.random.default_rng(5)
    data, q, c = synthetic(rng, shared_ids=shared_ids)
    ev = retrieval.RetrievalEvaluator(data, k_values=(1, 3, 10, 100))
    assert ev.query_ids == data.query_ids[:-1]  # the query without a relevant doc is skipped
    scores = ev.score({"queries": q[:-1], "corpus": c})
    ref = naive_evaluation(data, numpy_cosine(q[:-1], c), (1, 3, 10, 100), ev.query_ids)
    assert scores.keys() == ref.keys() and ev.main_metric == "ndcg@10"
    for key in ref:
        assert scores[key] == pytest.approx(ref[key], abs=1e-12), key
    if shared_ids:  # no query retrieves itself, although it is its own nearest neighbour
        assert all(qid not in ranked for qid, ranked in zip(ev.query_ids, ev.retrieve({"queries": q[:-1], "corpus": c})))
        assert len(ev.retrieve({"queries": q[:-1], "corpus": c})[0]) == 89  # depth capped at N, minus itself


def test_evaluator_int8_and_binary_rescoring_equal_naive():
    rng = np.random.default_rng(6)
    data, q, c = synthetic(rng, n_docs=120, dim=64)
    q = q[:-1]
    ks = (1, 5, 10)
    ev = retrieval.RetrievalEvaluator(data, k_values=ks, rescore_multiplier=3)
    ranges = quantize.int8_ranges(c)
    q8, c8 = quantize.int8(q, ranges), quantize.int8(c, ranges)
    got = ev.score({"queries": q8, "corpus": c8})
    ref = naive_evaluation(data, numpy_cosine(q8.astype(np.float32), c8.astype(np.float32)), ks, ev.query_ids)
    assert got == pytest.approx(ref, abs=1e-12)

    qb, cb = quantize.binary(q), quantize.binary(c)
    hamming = -np.unpackbits(qb[:, None, :] ^ cb[None, :, :], axis=-1).sum(-1).astype(np.int64)
    got = ev.score({"queries": qb, "corpus": cb})  # no reference: Hamming ranking
    assert got == pytest.approx(naive_evaluation(data, hamming.astype(float), ks, ev.query_ids), abs=1e-12)

    # Rescoring: top 10 * 3 by Hamming, re-ranked by float query . (+-1 bits), best 10 kept.
    signs = np.where(c > 0, 1.0, -1.0)
    cand = naive_topk(hamming.astype(float), 30)
    rescored = np.full(hamming.shape, -np.inf)
    for i, row in enumerate(cand):
        rescored[i, row] = [float(q[i].astype(np.float64) @ signs[j]) for j in row]
    got = ev.score({"queries": qb, "corpus": cb}, reference={"queries": q, "corpus": c})
    ref = naive_evaluation(data, rescored, ks, ev.query_ids)
    assert got == pytest.approx(ref, abs=1e-12)
    assert got != ev.score({"queries": qb, "corpus": cb})  # rescoring changed something


def test_evaluator_binary_first_stage():
    rng = np.random.default_rng(9)
    data, q, c = synthetic(rng, n_docs=120, dim=64, shared_ids=True)  # self-hits are dropped after rescoring too
    q, ks = q[:-1], (1, 5, 10)
    exact = retrieval.RetrievalEvaluator(data, k_values=ks).score({"queries": q, "corpus": c})
    wide = retrieval.RetrievalEvaluator(data, k_values=ks, binary_first_stage=True, rescore_multiplier=12)
    assert wide.score({"queries": q, "corpus": c}) == pytest.approx(exact, abs=1e-12)  # shortlist = the corpus
    hamming = -naive_hamming(quantize.binary(q), quantize.binary(c)).astype(float)
    full = numpy_cosine(q, c)
    shortlist = naive_topk(hamming, 11 * 2)  # depth 10, one more for the self-hit, times 2
    masked = np.full(full.shape, -np.inf)
    np.put_along_axis(masked, shortlist, np.take_along_axis(full, shortlist, 1), 1)
    ev = retrieval.RetrievalEvaluator(data, k_values=ks, binary_first_stage=True, rescore_multiplier=2)
    got = ev.score({"queries": q, "corpus": c})
    assert got == pytest.approx(naive_evaluation(data, masked, ks, ev.query_ids), abs=1e-12)
    with pytest.raises(ValueError, match="binary_first_stage"):
        retrieval.RetrievalEvaluator(data, binary_first_stage="yes")


def test_evaluator_rejects_bad_options_and_embeddings(beir_dir):
    data = read_beir(beir_dir)
    with pytest.raises(ValueError, match="k_values"):
        retrieval.RetrievalEvaluator(data, k_values=(0, 10))
    with pytest.raises(ValueError, match="metric"):
        retrieval.RetrievalEvaluator(data, metric="hamming")
    ev = retrieval.RetrievalEvaluator(data)
    with pytest.raises(ValueError, match="expected 2 query and 3 corpus"):
        ev.score({"queries": np.ones((2, 4)), "corpus": np.ones((2, 4))})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['top_k'\]; allowed: \[.*'k_values'"):
        retrieval.from_spec("x", {"path": str(beir_dir), "top_k": 5})
    with pytest.raises(ValueError, match="missing 'path'"):
        retrieval.from_spec("x", {"split": "test"})
    ev = retrieval.from_spec("scifact", {"path": str(beir_dir), "split": "test", "k_values": [1, 2],
                                         "query_prompt": "query: ", "binary_first_stage": True})
    assert ev.name == "scifact" and ev.k_values == (1, 2) and ev.main_metric == "ndcg@2" and ev.binary_first_stage
    assert ev.query_ids == ("q1", "q2")


# ------------------------------------------------------------------ against sentence-transformers


@pytest.fixture(scope="module")
def stsb_retrieval(stsb_dir, tmp_path_factory):
    """Queries: sentence1 of 60 STS-B dev pairs scored >= 4; corpus: the distinct sentence2s of the
    first 200 pairs; the relevant document: the query's own sentence2 (one per query)."""
    from embedjax.data import read_stsb

    pairs = read_stsb(stsb_dir / "sts-dev.csv")[:200]
    doc_ids: dict[str, str] = {}
    for p in pairs:
        doc_ids.setdefault(p.text_b, f"d{len(doc_ids):04d}")  # id order == file order: same tie-breaking as ST
    good = [p for p in pairs if p.score >= 4][:60]
    queries = [(f"q{i:04d}", p.text_a) for i, p in enumerate(good)]
    qrels = [(qid, doc_ids[p.text_b], 1) for (qid, _), p in zip(queries, good)]
    corpus = [(i, "", t) for t, i in doc_ids.items()]
    return write_beir(tmp_path_factory.mktemp("stsb_beir"), corpus, queries, qrels)


def test_retrieval_equals_sentence_transformers(stsb_retrieval, minilm, st_minilm):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    data = read_beir(stsb_retrieval)
    ks = (1, 3, 5, 10)
    ours = retrieval.RetrievalEvaluator(data, name="stsb", k_values=ks)(minilm)
    st = InformationRetrievalEvaluator(
        dict(zip(data.query_ids, data.query_texts)), dict(zip(data.corpus_ids, data.corpus_texts)),
        {q: {d for d, r in j.items() if r > 0} for q, j in data.qrels.items()}, name="st",
        mrr_at_k=ks, ndcg_at_k=ks, accuracy_at_k=ks, precision_recall_at_k=ks, map_at_k=ks,
        write_csv=False)(st_minilm)
    # ST's MAP@k divides by min(k, R), pytrec_eval's (ours) by R: with R = 1 relevant doc
    # per query, as here, the two are the same.
    for k in ks:
        for metric in ("accuracy", "precision", "recall", "mrr", "ndcg", "map"):
            assert ours[f"stsb/{metric}@{k}"] == pytest.approx(st[f"st_cosine_{metric}@{k}"], abs=1e-9), (metric, k)
    assert 0.5 < ours["stsb/ndcg@10"] < 1  # a real, non-trivial task


class StubEncoder:
    """Records every encode call; embeds a text as a fixed random vector of (prefix + text)."""

    prompts = {"query": "query: ", "document": "passage: ", "short": "q: "}

    def __init__(self):
        self.calls = []

    def encode(self, texts, *, prompt=None, **kw):
        self.calls.append((prompt, len(texts)))
        full = [(prompt or "") + t for t in texts]
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in full]).astype(np.float32)


def test_embed_prompts_and_corpus_chunks(beir_dir):
    data = read_beir(beir_dir)
    enc = StubEncoder()
    # Defaults: the checkpoint's "query" / "document" prompts (as ST's encode_query / encode_document).
    one = retrieval.RetrievalEvaluator(data).embed(enc)
    assert enc.calls == [("query: ", 2), ("passage: ", 3)]
    enc.calls.clear()
    chunked = retrieval.RetrievalEvaluator(data, corpus_chunk_size=2).embed(enc)
    assert enc.calls == [("query: ", 2), ("passage: ", 2), ("passage: ", 1)]  # the corpus in chunks of 2
    np.testing.assert_array_equal(chunked["corpus"], one["corpus"])
    enc.calls.clear()
    retrieval.RetrievalEvaluator(data, query_prompt_name="short", document_prompt="").embed(enc)
    assert enc.calls == [("q: ", 2), ("", 3)]
    with pytest.raises(KeyError, match="'nope' not in this checkpoint's prompts"):
        retrieval.RetrievalEvaluator(data, query_prompt_name="nope").embed(enc)
    with pytest.raises(ValueError, match="not both"):
        retrieval.RetrievalEvaluator(data, query_prompt="x", query_prompt_name="short").embed(enc)
