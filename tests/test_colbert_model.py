"""ColbertEncoder (embedjax/colbert_model.py) against PyLate (run in its own virtualenv by
tests/pylate_oracle.py): a tiny ColBERT that PyLate builds and saves encodes to the same token
vectors here and scores the same by MaxSim (our exports load in PyLate and encode the same:
tests/test_colbert_train.py, after a training run)."""

import numpy as np
import pytest

from conftest import pylate_oracle
from embedjax import similarity
from embedjax.colbert_model import load_colbert
from embedjax.encoders.statedict import CheckpointError

pytestmark = pytest.mark.fast_compile  # checks logic, not speed (conftest.py)

QUERIES = ["How many legs has a spider?", "flute", "a very long query " * 8]
DOCUMENTS = ["A spider has eight legs, and most have eight eyes.", "Hi!", "The man plays the flute; " * 10]


@pytest.fixture(scope="module")
def beir(small_beir, tmp_path_factory):
    """A small BEIR task: 60 documents, 24 queries (tests/test_sparse_model.py's)."""
    from embedjax.data.retrieval_readers import read_beir
    from test_sparse_model import smaller_beir

    path = smaller_beir(small_beir, tmp_path_factory.mktemp("colbert_beir") / "beir")
    return path, read_beir(path, "dev")


@pytest.fixture(scope="module")
def pylate_model(tiny_masked_lm, beir, tmp_path_factory):
    """PyLate's ColBERT on the tiny MLM's backbone (16-wide projection, queries of 12 tokens,
    documents of 24), saved, and its encodings and scores of the texts, then of the BEIR task's
    queries and documents, the documents pooled by 2 too (one oracle run)."""
    _, data = beir
    d = tmp_path_factory.mktemp("colbert")
    answer = pylate_oracle({"model": str(d / "model"), "queries": QUERIES + list(data.query_texts),
                            "documents": DOCUMENTS + list(data.corpus_texts),
                            "create": {"base": str(tiny_masked_lm), "embedding_size": 16, "query_length": 12,
                                       "document_length": 24}, "pool_factor": 2}, d)
    return d / "model", answer


def test_colbert_encodes_and_scores_like_pylate(pylate_model):
    path, theirs = pylate_model
    model = load_colbert(path)
    assert (model.query_length, model.document_length, model.dim) == (12, 24, 16)
    queries, documents = model.encode_queries(QUERIES), model.encode_documents(DOCUMENTS)
    for i, q in enumerate(queries):
        assert q.shape == (12, 16)  # mask-token expansion to query_length
        np.testing.assert_allclose(q, theirs[f"q{i}"], atol=1e-5)
    for j, d in enumerate(documents):
        assert d.shape == theirs[f"d{j}"].shape  # the same tokens kept (skiplist, truncation)
        np.testing.assert_allclose(d, theirs[f"d{j}"], atol=1e-5)
    for text, d in zip(DOCUMENTS[1:], documents[1:]):  # the marker in, punctuation out, 24 tokens at most
        ids = model.document_tokenizer.encode([text])[0].ids
        assert len(ids) <= 23 and len(d) == len(ids) + 1 - sum(i in model.skiplist_ids for i in ids) < len(ids) + 1
    assert len(model.document_tokenizer.encode([DOCUMENTS[2]])[0].ids) == 23  # truncated

    # PyLate pads every document it encoded (the BEIR task's too) to the longest, with zeros
    width = max(len(theirs[f"d{j}"]) for j in range(theirs["scores"].shape[1]))
    padded = np.stack([np.pad(d, ((0, width - len(d)), (0, 0))) for d in documents])
    mask = np.stack([np.arange(width) < len(d) for d in documents]).astype(np.int32)
    zeroed = np.asarray(similarity.maxsim_matrix(np.stack(queries), padded, None, mask, masked_as_zero=True))
    np.testing.assert_allclose(zeroed, theirs["scores"][: len(QUERIES), : len(DOCUMENTS)], rtol=1e-5, atol=1e-5)
    exact = np.asarray(similarity.maxsim_matrix(np.stack(queries), padded, None, mask))
    for j, d in enumerate(documents):  # exact MaxSim: each document alone, no padding
        np.testing.assert_allclose(exact[:, j], [float(np.sum(np.max(q @ d.T, axis=1))) for q in queries], rtol=1e-5)


def test_a_plain_backbone_starts_a_colbert_model_laid_out_as_pylate_starts_one(pylate_model, tiny_masked_lm):
    """PyLate's model above was built on the same backbone: the same vocabulary with the markers
    appended, the same marker, mask and skiplist ids and the same query and document rows; only the
    projection (random) and the markers' embeddings (PyLate draws them around the mean) differ."""
    path, _ = pylate_model
    theirs, ours = load_colbert(path), load_colbert(tiny_masked_lm, query_length=12, document_length=24, dim=16)
    assert ours.cfg.vocab_size == theirs.cfg.vocab_size and ours.dim == 16
    assert (ours.query_marker_id, ours.document_marker_id, ours.mask_token_id, ours.skiplist_ids) == \
        (theirs.query_marker_id, theirs.document_marker_id, theirs.mask_token_id, theirs.skiplist_ids)
    for text in QUERIES + DOCUMENTS:
        for side in ("query", "document"):
            rows = [getattr(m.batch_format(), f"{side}_row")(getattr(m, f"{side}_tokenizer").encode([text])[0].ids)
                    for m in (ours, theirs)]
            for a, b in zip(*rows):
                np.testing.assert_array_equal(a, b)
    word = np.asarray(ours.params["embeddings"]["word"])
    np.testing.assert_allclose(word[ours.query_marker_id], word[:ours.query_marker_id].mean(axis=0), atol=1e-6)


def test_load_colbert_refuses_a_projection_it_cannot_read(pylate_model, tmp_path):
    import json
    import shutil

    path, _ = pylate_model
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "1_Dense" / "config.json").read_text())
    (tmp_path / "m" / "1_Dense" / "config.json").write_text(json.dumps({**config, "bias": True}))
    with pytest.raises(CheckpointError, match="a projection with a bias"):
        load_colbert(tmp_path / "m")


def test_colbert_retrieval_evaluator_ranks_by_maxsim(pylate_model, beir):
    """The evaluator's ranking is the brute-force MaxSim ranking (NumPy) of PyLate's own token
    vectors, and its metrics are what that ranking scores."""
    from embedjax.eval import ranking_metrics, suite
    from embedjax.eval.late_retrieval import LateRetrievalEvaluator

    path, theirs = pylate_model
    beir, data = beir
    model = load_colbert(path)
    evaluator = LateRetrievalEvaluator(data, name="tiny", k_values=(1, 10), chunk_size=7, query_chunk_size=5)
    embeddings = evaluator.embed(model)
    got = evaluator.score(embeddings)

    position = {text: i for i, text in enumerate(data.query_texts)}  # the scored queries, in the oracle's order
    their_queries = [theirs[f"q{len(QUERIES) + position[t]}"] for t in evaluator._queries.query_texts]
    docs = [theirs[f"d{len(DOCUMENTS) + j}"] for j in range(len(data.corpus_ids))]
    brute = np.array([[np.sum(np.max(q @ d.T, axis=1)) for d in docs] for q in their_queries])
    ranked = [[data.corpus_ids[j] for j in np.argsort(-row, kind="stable")[:10]] for row in brute]
    assert evaluator.retrieve(embeddings, depth=10) == ranked
    qrels = evaluator._queries._qrels
    ideal, n_relevant = ranking_metrics.ideal_relevance(qrels)
    want = ranking_metrics.retrieval_scores(ranking_metrics.ranked_relevance(ranked, qrels, 10), ideal, n_relevant, (1, 10))
    assert got["ndcg@10"] == pytest.approx(want["ndcg@10"]) and got["recall@10"] == pytest.approx(want["recall@10"])
    assert got["document_tokens"] == pytest.approx(np.mean([len(d) for d in docs]))
    [built] = suite.from_config({"c": {"type": "colbert_retrieval", "path": str(beir), "split": "dev", "chunk_size": 8}})
    assert built.chunk_size == 8
    with pytest.raises(ValueError, match="scores a ColBERT model"):
        suite.for_training({"c": {"type": "colbert_retrieval", "path": str(beir)}}, batch_size=8, enc_cfg=None)


def test_token_pooling_is_pylates(pylate_model):
    """pool_factor=2: the [CLS] kept, the other tokens clustered (Ward) into half as many means."""
    path, theirs = pylate_model
    model = load_colbert(path)
    full = model.encode_documents(DOCUMENTS)
    pooled = model.encode_documents(DOCUMENTS, pool_factor=2)
    for j, (d, p) in enumerate(zip(full, pooled)):
        assert p.shape == theirs[f"p{j}"].shape
        np.testing.assert_allclose(p, theirs[f"p{j}"], atol=1e-5)
        if len(d) > 3:
            assert len(p) == 1 + (len(d) - 1) // 2 and np.allclose(p[0], d[0])
    with pytest.raises(ValueError, match="pool_factor must be >= 1"):
        model.encode_documents(DOCUMENTS, pool_factor=0)


def test_colbert_reranks_a_dense_first_stage(pylate_model, beir, tiny_model):
    """first_stage: the ColBERT model orders each query's top 10 dense candidates by MaxSim (NumPy
    brute force over the same candidates), and the first stage's own figures are reported beside."""
    from embedjax import load_pretrained
    from embedjax.eval import ranking_metrics
    from embedjax.eval.late_retrieval import LateRetrievalEvaluator
    from embedjax.eval.retrieval import RetrievalEvaluator

    path, _ = pylate_model
    _, data = beir
    model, dense = load_colbert(path), load_pretrained(tiny_model)
    evaluator = LateRetrievalEvaluator(data, name="r", k_values=(1, 10), first_stage=dense, rerank_depth=10)
    embeddings = evaluator.embed(model)
    first = RetrievalEvaluator(data, k_values=(1, 10))
    candidates = first.retrieve(first.embed(dense), depth=10)
    assert evaluator.first_stage_ranking() == candidates
    assert sum(v is not None for v in embeddings["corpus"]) == len({d for row in candidates for d in row})
    position = {doc: i for i, doc in enumerate(data.corpus_ids)}
    want = []
    for q, row in zip(embeddings["queries"], candidates):
        scores = [float(np.sum(np.max(q @ embeddings["corpus"][position[d]].T, axis=1))) for d in row]
        want.append([row[i] for i in np.argsort(-np.array(scores), kind="stable")])
    assert evaluator.retrieve(embeddings) == want
    got = evaluator.score(embeddings)
    assert got["first_stage/ndcg@10"] == pytest.approx(first.score(first.embed(dense))["ndcg@10"])
    qrels = evaluator._queries._qrels
    ideal, n_relevant = ranking_metrics.ideal_relevance(qrels)
    rels = ranking_metrics.ranked_relevance(want, qrels, 10)
    assert got["ndcg@10"] == pytest.approx(ranking_metrics.retrieval_scores(rels, ideal, n_relevant, (1, 10))["ndcg@10"])


def test_fused_retrieval_ranks_the_union_by_weighted_scores_and_by_rrf(pylate_model, beir, tiny_model,
                                                                         tiny_masked_lm):
    """A dense, a SPLADE and a ColBERT model on one BEIR task: each reported alone as its own
    evaluator reports it, and the union of their top 10 ranked by 1*cos + 0.1*dot + 0.5*MaxSim and by
    RRF, both recomputed here in NumPy from the members' own encodings."""
    from embedjax import load_pretrained, load_sparse_encoder
    from embedjax.eval.fusion import FusedRetrievalEvaluator
    from embedjax.eval.retrieval import RetrievalEvaluator

    path, _ = pylate_model
    _, data = beir
    models = {"dense": load_pretrained(tiny_model), "sparse": load_sparse_encoder(tiny_masked_lm),
              "late": load_colbert(path)}
    weights = {"dense": 1.0, "sparse": 0.1, "late": 0.5}
    fused = FusedRetrievalEvaluator(data, name="f", weights=weights, k_values=(1, 10), depth=10)
    got = fused.score(models)
    dense_alone = RetrievalEvaluator(data, name="d", k_values=(1, 10))(models["dense"])
    assert got["dense/ndcg@10"] == pytest.approx(dense_alone["d/ndcg@10"])

    queries = list(fused._queries.query_texts)
    corpus = list(data.corpus_texts)
    q_dense, d_dense = models["dense"].encode(queries), models["dense"].encode(corpus)
    q_sparse, d_sparse = models["sparse"].encode(queries).toarray(), models["sparse"].encode(corpus).toarray()
    q_late, d_late = models["late"].encode_queries(queries), models["late"].encode_documents(corpus)
    scores = {"dense": q_dense @ d_dense.T / np.outer(np.linalg.norm(q_dense, axis=1), np.linalg.norm(d_dense, axis=1)),
              "sparse": q_sparse @ d_sparse.T,
              "late": np.array([[np.sum(np.max(q @ d.T, axis=1)) for d in d_late] for q in q_late])}
    want_sum, want_rrf = [], []
    for i in range(len(queries)):
        tops = {m: [int(j) for j in np.argsort(-scores[m][i], kind="stable")[:10]] for m in scores}
        union = list(dict.fromkeys(j for m in scores for j in tops[m]))
        total = [sum(weights[m] * scores[m][i, j] for m in scores) for j in union]
        rrf = [sum(1 / (60 + tops[m].index(j) + 1) for m in scores if j in tops[m]) for j in union]
        want_sum.append([data.corpus_ids[union[k]] for k in np.argsort(-np.array(total), kind="stable")])
        want_rrf.append([data.corpus_ids[union[k]] for k in np.argsort(-np.array(rrf), kind="stable")])
    ev = fused._queries
    assert got["sum/ndcg@10"] == pytest.approx(_ndcg(ev, want_sum), abs=1e-6)
    assert got["rrf/ndcg@10"] == pytest.approx(_ndcg(ev, want_rrf), abs=1e-6)
    dense_top = [[data.corpus_ids[j] for j in np.argsort(-scores["dense"][i], kind="stable")[:10]]
                 for i in range(len(queries))]
    assert any(s[:10] != d for s, d in zip(want_sum, dense_top))  # the fusion is not one member's ranking
    with pytest.raises(ValueError, match="weights name"):
        FusedRetrievalEvaluator(data, weights={"dense": 1.0}).score(models)


def _ndcg(evaluator, ranked):
    from embedjax.eval import ranking_metrics

    qrels = evaluator._qrels
    ideal, n_relevant = ranking_metrics.ideal_relevance(qrels)
    rels = ranking_metrics.ranked_relevance(ranked, qrels, 10)
    return ranking_metrics.retrieval_scores(rels, ideal, n_relevant, (1, 10))["ndcg@10"]
