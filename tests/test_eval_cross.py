"""Cross-encoder evaluation (embedjax/eval/cross.py): STS against sentence-transformers'
CrossEncoderCorrelationEvaluator, and reranking of the first stage's top-k against
sentence-transformers' CrossEncoder scores ordered here and scored by pytrec_eval."""

import numpy as np
import pytest
import pytrec_eval
from sentence_transformers import CrossEncoder as STCrossEncoder
from sentence_transformers.cross_encoder.evaluation import CrossEncoderCorrelationEvaluator

import embedjax
from embedjax.data import read_beir, read_stsb
from embedjax.eval.cross import CrossEncoderSTSEvaluator, RerankEvaluator
from embedjax.eval.retrieval import RetrievalEvaluator

pytestmark = pytest.mark.fast_compile  # tiny models: compile-bound (conftest.py)


def test_cross_encoder_sts_is_sentence_transformers_correlation_evaluator(tiny_cross_encoder, small_dev):
    pairs = read_stsb(small_dev)
    ours = dict(CrossEncoderSTSEvaluator(pairs, name="dev").run(embedjax.load_cross_encoder(tiny_cross_encoder)))
    st = CrossEncoderCorrelationEvaluator([(p.text_a, p.text_b) for p in pairs], [p.score for p in pairs], name="dev")
    theirs = st(STCrossEncoder(str(tiny_cross_encoder), device="cpu"))
    assert set(ours) == {"dev/spearman", "dev/pearson"}
    np.testing.assert_allclose(ours["dev/spearman"], 100 * theirs["dev_spearman"], atol=1e-4)
    np.testing.assert_allclose(ours["dev/pearson"], 100 * theirs["dev_pearson"], atol=1e-4)


def test_reranking_reorders_the_first_stage_by_the_cross_encoder(tiny_model, tiny_cross_encoder, small_beir):
    encoder = embedjax.load_pretrained(tiny_model)
    first = RetrievalEvaluator(read_beir(small_beir, "dev"), name="beir", k_values=(1, 5, 10))
    evaluator = RerankEvaluator(first, top_k=20)
    got = dict(evaluator.run(encoder, embedjax.load_cross_encoder(tiny_cross_encoder)))
    assert evaluator.main_metric == "rerank@20/ndcg@10"
    alone = first(encoder)
    assert {k: got[k] for k in alone} == alone  # the first stage's figures, unchanged

    # the reference: the same 20 candidates, sentence-transformers' scores, pytrec_eval's metrics
    candidates = first.retrieve(first.embed(encoder), depth=20)
    texts = dict(zip(first.data.corpus_ids, first.data.corpus_texts))
    st = STCrossEncoder(str(tiny_cross_encoder), device="cpu")
    run = {}
    for qid, query, ids in zip(first.query_ids, first.query_texts, candidates):
        scores = st.predict([(query, texts[d]) for d in ids])
        order = np.argsort(-scores, kind="stable")
        run[qid] = {ids[i]: float(len(ids) - rank) for rank, i in enumerate(order)}  # no ties for trec_eval
    qrels = {q: first.data.qrels[q] for q in first.query_ids}
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.5,10", "recall.10", "P.5"}).evaluate(run)
    mean = lambda m: np.mean([v[m] for v in trec.values()])  # noqa: E731
    np.testing.assert_allclose(got["beir/rerank@20/ndcg@10"], mean("ndcg_cut_10"), atol=1e-6)
    np.testing.assert_allclose(got["beir/rerank@20/ndcg@5"], mean("ndcg_cut_5"), atol=1e-6)
    np.testing.assert_allclose(got["beir/rerank@20/recall@10"], mean("recall_10"), atol=1e-6)
    np.testing.assert_allclose(got["beir/rerank@20/precision@5"], mean("P_5"), atol=1e-6)
    assert got["beir/rerank@20/ndcg@10"] != got["beir/ndcg@10"]  # the order did change


def test_bad_options_are_clear_errors(tmp_path, minilm_path, small_dev, small_beir):
    from conftest import write_tiny_cross_encoder

    with pytest.raises(ValueError, match="no pairs"):
        CrossEncoderSTSEvaluator([], name="empty")
    with pytest.raises(ValueError, match="top_k"):
        RerankEvaluator(RetrievalEvaluator(read_beir(small_beir, "dev")), top_k=0)
    three_labels = embedjax.load_cross_encoder(write_tiny_cross_encoder(tmp_path, minilm_path, 3))
    with pytest.raises(ValueError, match="one-logit"):
        CrossEncoderSTSEvaluator(read_stsb(small_dev)[:4]).score(three_labels)
