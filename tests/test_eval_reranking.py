"""Reranking: MTEB jsonl reader, MAP / MRR@10 / nDCG@10 and the RerankingEvaluator.

References: naive loops written here, scikit-learn's average_precision_score / ndcg_score,
and sentence-transformers' RerankingEvaluator on the same model and data.
"""

import json
import math

import numpy as np
import pytest

from embedjax.data.readers import DataError
from embedjax.data.retrieval_readers import RerankingSample, read_reranking
from embedjax.eval import quantize, ranking_metrics as rm, reranking


def naive_reranking(scores, relevant, k=10):
    """Loops over ranks: AP over all candidates, MRR@k, nDCG@k with binary gains."""
    aps, mrrs, ndcgs = [], [], []
    for s, rel in zip(scores, relevant):
        order = sorted(range(len(s)), key=lambda i: -s[i])
        ranked = [rel[i] for i in order]
        hits, ap, mrr = 0, 0.0, 0.0
        for r, is_rel in enumerate(ranked, start=1):
            if is_rel:
                hits += 1
                ap += hits / r
                if mrr == 0.0 and r <= k:
                    mrr = 1 / r
        n_pos = int(sum(rel))
        dcg = sum(1 / math.log2(r + 1) for r, is_rel in enumerate(ranked[:k], start=1) if is_rel)
        idcg = sum(1 / math.log2(r + 1) for r in range(1, min(n_pos, k) + 1))
        aps.append(ap / n_pos), mrrs.append(mrr), ndcgs.append(dcg / idcg)
    return {"map": np.mean(aps), f"mrr@{k}": np.mean(mrrs), f"ndcg@{k}": np.mean(ndcgs)}


def random_sets(rng, n=40):
    scores, relevant = [], []
    for _ in range(n):
        m = int(rng.integers(2, 30))
        rel = np.zeros(m)
        rel[rng.choice(m, int(rng.integers(1, m)), replace=False)] = 1
        scores.append(rng.normal(size=m)), relevant.append(rel)
    return scores, relevant


def test_reranking_metrics_hand_computed():
    # Candidates (score, relevant): (0.6, 1), (0.8, 1), (0.9, 0), (0.7, 0) -> ranked relevance 0 1 0 1.
    got = rm.reranking_scores([np.array([0.6, 0.8, 0.9, 0.7])], [np.array([1, 1, 0, 0])])
    # AP = (1/2 + 2/4) / 2 = 0.5;  MRR@10 = 1/2
    assert got["map"] == pytest.approx(0.5) and got["mrr@10"] == pytest.approx(0.5)
    # nDCG@10 = (1/log2(3) + 1/log2(5)) / (1 + 1/log2(3)) = (0.630930 + 0.430677) / 1.630930 = 0.650920
    assert got["ndcg@10"] == pytest.approx(0.650920, abs=1e-6)
    # at_k=1: the first candidate is irrelevant -> MRR@1 = nDCG@1 = 0; MAP does not depend on k.
    assert rm.reranking_scores([np.array([0.6, 0.8, 0.9, 0.7])], [np.array([1, 1, 0, 0])], at_k=1) == \
        {"map": pytest.approx(0.5), "mrr@1": 0.0, "ndcg@1": 0.0}


def test_reranking_metrics_equal_naive_and_sklearn():
    from sklearn.metrics import average_precision_score, ndcg_score

    scores, relevant = random_sets(np.random.default_rng(0))
    got = rm.reranking_scores(scores, relevant)
    ref = naive_reranking(scores, relevant)
    assert got == pytest.approx(ref, abs=1e-12)
    assert got["map"] == pytest.approx(np.mean([average_precision_score(r, s) for s, r in zip(scores, relevant)]),
                                       abs=1e-12)
    assert got["ndcg@10"] == pytest.approx(np.mean([ndcg_score([r], [s], k=10) for s, r in zip(scores, relevant)]),
                                           abs=1e-12)


# ------------------------------------------------------------------ reader


def test_read_reranking(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"query": "q", "positive": ["a", "b"], "negative": ["c"]}\n\n'
                    '{"query": "r", "positive": "a", "negative": []}\n')
    assert read_reranking(path) == [RerankingSample("q", ("a", "b"), ("c",)), RerankingSample("r", ("a",), ())]


@pytest.mark.parametrize("line2, message", [
    ('{"query": "q", "positive": ["a"]', "invalid JSON"),
    ('{"positive": ["a"], "negative": ["b"]}', "missing key 'query'"),
    ('{"query": 3, "positive": ["a"], "negative": ["b"]}', "query must be a string"),
    ('{"query": "q", "negative": ["b"]}', "missing key 'positive'"),
    ('{"query": "q", "positive": [], "negative": ["b"]}', "positive is empty"),
    ('{"query": "q", "positive": ["a"], "negative": ["b", 1]}', "negative must be a list of strings"),
    ('["q", ["a"], ["b"]]', "expected a JSON object"),
])
def test_read_reranking_errors_name_the_line(tmp_path, line2, message):
    path = tmp_path / "r.jsonl"
    path.write_text('{"query": "q", "positive": ["a"], "negative": ["b"]}\n' + line2 + "\n")
    with pytest.raises(DataError, match=message) as err:
        read_reranking(path)
    assert err.value.line == 2 and err.value.path == path


# ------------------------------------------------------------------ evaluator on given embeddings


def test_evaluator_scores_equal_naive_and_skip_queries_without_negatives():
    rng = np.random.default_rng(1)
    texts = [f"t{i}" for i in range(30)]
    samples = [RerankingSample(f"q{i}", tuple(rng.choice(texts, 2, replace=False)),
                               tuple(rng.choice(texts, 5, replace=False))) for i in range(12)]
    samples = [RerankingSample(s.query, s.positive, tuple(t for t in s.negative if t not in s.positive))
               for s in samples] + [RerankingSample("lonely", ("t0",), ())]
    ev = reranking.RerankingEvaluator(samples, name="r")
    assert len(ev.documents) == len(set(t for s in samples[:-1] for t in s.positive + s.negative))  # embedded once
    assert ev.main_metric == "map"
    doc_vecs = {t: rng.normal(size=16) for t in texts}
    q = rng.normal(size=(12, 16)).astype(np.float32)
    d = np.stack([doc_vecs[t] for t in ev.documents]).astype(np.float32)

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    scores = [[cos(q[i], doc_vecs[t]) for t in s.positive + s.negative] for i, s in enumerate(samples[:-1])]
    relevant = [[1] * len(s.positive) + [0] * len(s.negative) for s in samples[:-1]]
    assert ev.score({"queries": q, "documents": d}) == pytest.approx(naive_reranking(scores, relevant), abs=1e-6)

    # Packed bits: Hamming distance; with the float reference, float query . (+-1 bits).
    qb, db = quantize.binary(q), quantize.binary(d)
    signs = {t: np.where(doc_vecs[t] > 0, 1.0, -1.0) for t in texts}
    ham = [[-float(np.sum((q[i] > 0) != (signs[t] > 0))) for t in s.positive + s.negative]
           for i, s in enumerate(samples[:-1])]
    got = rm.rank_candidates(ev.candidate_scores({"queries": qb, "documents": db}), ev._relevant)
    np.testing.assert_array_equal(got, rm.rank_candidates([np.array(h) for h in ham], relevant))
    dots = [[float(q[i] @ signs[t]) for t in s.positive + s.negative] for i, s in enumerate(samples[:-1])]
    assert ev.score({"queries": qb, "documents": db}, reference={"queries": q, "documents": d}) == \
        pytest.approx(naive_reranking(dots, relevant), abs=1e-6)


def test_evaluator_options(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"query": "q", "positive": ["a"], "negative": ["b"]}\n')
    ev = reranking.from_spec("askubuntu", {"path": str(path), "query_prompt": "query: ", "at_k": 5})
    assert ev.name == "askubuntu" and ev.query_prompt == "query: " and ev.at_k == 5
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['split'\]; allowed: \[.*'at_k'"):
        reranking.from_spec("x", {"path": str(path), "split": "test"})
    with pytest.raises(ValueError, match="no query has both"):
        reranking.RerankingEvaluator([RerankingSample("q", ("a",), ())])
    with pytest.raises(ValueError, match="metric"):
        reranking.RerankingEvaluator(read_reranking(path), metric="angle")


# ------------------------------------------------------------------ against sentence-transformers


@pytest.fixture(scope="module")
def stsb_reranking(stsb_dir, tmp_path_factory):
    """40 STS-B dev pairs: query = sentence1, positives = its sentence2 (plus, for every third query,
    the next pair's sentence2), negatives = 4 other sentence2s; all of a query's candidates distinct
    (no exact score ties, where tie-breaking would differ)."""
    from embedjax.data import read_stsb

    pairs = read_stsb(stsb_dir / "sts-dev.csv")[:150]
    seconds = list(dict.fromkeys(p.text_b for p in pairs))
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("rerank") / "stsb.jsonl"
    lines = []
    for i, p in enumerate(pairs[:40]):
        positive = [p.text_b] + ([pairs[i + 1].text_b] if i % 3 == 0 and pairs[i + 1].text_b != p.text_b else [])
        others = [t for t in seconds if t not in positive]
        negative = [others[j] for j in rng.choice(len(others), 4, replace=False)]
        lines.append(json.dumps({"query": p.text_a, "positive": positive, "negative": negative}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reranking_equals_sentence_transformers(stsb_reranking, minilm, st_minilm):
    from sentence_transformers.sentence_transformer.evaluation import RerankingEvaluator as STReranking

    samples = read_reranking(stsb_reranking)
    ours = reranking.RerankingEvaluator(samples, name="stsb")(minilm)
    st = STReranking([{"query": s.query, "positive": list(s.positive), "negative": list(s.negative)}
                      for s in samples], name="st", write_csv=False)(st_minilm)
    for key in ("map", "mrr@10", "ndcg@10"):
        assert ours[f"stsb/{key}"] == pytest.approx(st[f"st_{key}"], abs=1e-9), key
    assert 0.5 < ours["stsb/map"] < 1  # non-trivial: some queries rank a negative first
