"""SparseEncoder (embedjax/sparse_model.py) and the sparse retrieval evaluator against
sentence-transformers' SparseEncoder and SparseInformationRetrievalEvaluator, on a tiny random
BertForMaskedLM; the export loads in sentence-transformers and back here."""

import json
import logging
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
from sentence_transformers import SparseEncoder as STSparseEncoder
from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

from conftest import TINY_MLM_VOCAB
from embedjax.data.retrieval_readers import read_beir
from embedjax.encoders.statedict import CheckpointError
from embedjax.eval import suite
from embedjax.eval.sparse_retrieval import SparseRetrievalEvaluator, sparsity
from embedjax.sparse_model import load_sparse_encoder, save_sparse_encoder

pytestmark = pytest.mark.fast_compile  # checks logic, not speed (conftest.py)

TEXTS = ["Two dogs run on the beach in the evening sun.", "Hi", "A man is playing a flute.", ""]


def st_dense(model: STSparseEncoder, texts, **kw) -> np.ndarray:
    return model.encode(texts, convert_to_tensor=True, **kw).to_dense().numpy()


def test_encode_equals_sentence_transformers_in_the_callers_order(tiny_masked_lm):
    ours = load_sparse_encoder(tiny_masked_lm)
    theirs = STSparseEncoder(str(tiny_masked_lm), device="cpu")
    got = ours.encode(TEXTS, batch_size=3)  # two batches, sorted by length inside
    assert isinstance(got, sp.csr_matrix) and got.shape == (4, TINY_MLM_VOCAB) and got.dtype == np.float32
    np.testing.assert_allclose(got.toarray(), st_dense(theirs, TEXTS), rtol=1e-5, atol=1e-5)
    assert (got.data > 0).all()  # only active terms are stored
    one = ours.encode(TEXTS[2])
    assert one.shape == (1, TINY_MLM_VOCAB)
    np.testing.assert_allclose(one.toarray()[0], got.toarray()[2], rtol=1e-5, atol=1e-5)
    # top_k == sentence-transformers' max_active_dims
    pruned = ours.encode(TEXTS, top_k=7)
    np.testing.assert_array_equal(np.diff(pruned.indptr), 7)
    np.testing.assert_allclose(pruned.toarray(), st_dense(theirs, TEXTS, max_active_dims=7), rtol=1e-5, atol=1e-5)
    # decode: a vector's terms, heaviest first
    terms = ours.decode(pruned[0], top=3)
    row = pruned.toarray()[0]
    assert [w for _, w in terms] == pytest.approx(sorted(row[row > 0], reverse=True)[:3])
    assert terms[0][0] == ours.tokenizer.backend.id_to_token(int(np.argmax(row)))


def test_export_loads_in_sentence_transformers_and_back(tiny_masked_lm, tmp_path):
    ours = load_sparse_encoder(tiny_masked_lm, max_length=48, pooling="sum", top_k=0)
    ours.prompts = {"query": "query: ", "document": "passage: "}
    out = save_sparse_encoder(ours, tmp_path / "export")
    theirs = STSparseEncoder(str(out), device="cpu")
    assert theirs.max_seq_length == 48 and theirs[1].pooling_strategy == "sum"
    expected = ours.encode(TEXTS).toarray()
    np.testing.assert_allclose(st_dense(theirs, TEXTS), expected, rtol=1e-5, atol=1e-5)
    # the prompts: sentence-transformers' encode_query applies the saved "query" prompt, as ours
    np.testing.assert_allclose(st_dense(theirs, TEXTS[:2], prompt_name="query"),
                               ours.encode_query(TEXTS[:2]).toarray(), rtol=1e-5, atol=1e-5)
    back = load_sparse_encoder(out)
    assert (back.max_length, back.pooling, back.activation, back.prompts) == (48, "sum", "relu", ours.prompts)
    np.testing.assert_array_equal(back.encode(TEXTS).toarray(), expected)
    np.testing.assert_allclose(back.encode_document(TEXTS[:1]).toarray(),
                               ours.encode(TEXTS[:1], prompt="passage: ").toarray(), rtol=1e-6)


def test_loading_refuses_what_it_cannot_read(tiny_masked_lm, tiny_model, tmp_path, caplog):
    # a Router whose routes are not the inference-free layout is named, not misread
    d = tmp_path / "router"
    shutil.copytree(tiny_masked_lm, d)
    (d / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "", "type":
                                                 "sentence_transformers.models.Router"}]))
    (d / "router_config.json").write_text(json.dumps({"types": {"q": "x.Transformer"}, "structure": {"query": ["q"]}}))
    with pytest.raises(CheckpointError, match=r"routes .*embedjax loads the inference-free layout"):
        load_sparse_encoder(d)
    # a non-BERT family
    d = tmp_path / "roberta"
    shutil.copytree(tiny_masked_lm, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(CheckpointError, match="model_type 'roberta'"):
        load_sparse_encoder(d)
    with pytest.raises(ValueError, match="max_length must be in 1..128"):
        load_sparse_encoder(tiny_masked_lm, max_length=1000)
    # a dense SentenceTransformer (Transformer, Pooling): its backbone and a fresh head, said in the log
    with caplog.at_level(logging.WARNING, logger="embedjax.sparse_model"):
        fresh = load_sparse_encoder(tiny_model)
    assert "no MLM head" in caplog.text and "fresh identity one" in caplog.text
    np.testing.assert_array_equal(fresh.params["mlm_head"]["transform"]["kernel"], np.eye(fresh.cfg.hidden_size))
    random = load_sparse_encoder(tiny_model, head_init="random")
    assert float(np.abs(random.params["mlm_head"]["bias"]).max()) == 0.0
    assert fresh.max_length == 64  # its sentence_bert_config.json's max_seq_length


def test_inference_free_router_encodes_and_saves_like_sentence_transformers(tiny_masked_lm, small_beir, tmp_path):
    """sentence-transformers' inference-free SPLADE (a Router: SparseStaticEmbedding for queries,
    MLMTransformer + SpladePooling for documents) loads here and encodes queries and documents the
    same; ours saves to that layout, which sentence-transformers loads and encodes the same."""
    import torch
    from sentence_transformers.base.modules import Router
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SparseStaticEmbedding, SpladePooling

    from embedjax.sparse_model import with_static_queries

    mlm = MLMTransformer(str(tiny_masked_lm))
    weights = torch.rand(TINY_MLM_VOCAB, generator=torch.Generator().manual_seed(0)) + 0.5
    router = Router.for_query_document(query_modules=[SparseStaticEmbedding(tokenizer=mlm.tokenizer, weight=weights)],
                                       document_modules=[mlm, SpladePooling("max")])
    theirs = STSparseEncoder(modules=[router], device="cpu")
    theirs.save(str(tmp_path / "theirs"))
    ours = load_sparse_encoder(tmp_path / "theirs")
    assert ours.inference_free
    queries = ["How many legs has a spider?", "spider spider legs", ""]

    def st(model, texts, fn):
        return getattr(model, fn)(texts, convert_to_tensor=True).to_dense().numpy()

    np.testing.assert_allclose(ours.encode_query(queries).toarray(), st(theirs, queries, "encode_query"), rtol=1e-6)
    np.testing.assert_allclose(ours.encode_document(TEXTS).toarray(), st(theirs, TEXTS, "encode_document"),
                               rtol=1e-5, atol=1e-5)
    ids = ours.tokenizer.backend.encode(queries[1], add_special_tokens=False).ids
    assert ours.encode_query(queries[1]).nnz == len(set(ids)) < len(ids)  # each id once, no [CLS] / [SEP]
    evaluator = SparseRetrievalEvaluator(read_beir(small_beir, "dev"), name="dev")
    scored = evaluator.embed(ours)["queries"]  # the evaluator's queries go the static route too
    np.testing.assert_array_equal(scored.toarray(), ours.encode_query(list(evaluator._queries.query_texts)).toarray())

    trained = with_static_queries(load_sparse_encoder(tiny_masked_lm), np.linspace(0.1, 2.0, TINY_MLM_VOCAB))
    back = STSparseEncoder(str(save_sparse_encoder(trained, tmp_path / "ours")), device="cpu")
    np.testing.assert_allclose(st(back, queries, "encode_query"), trained.encode_query(queries).toarray(), rtol=1e-6)
    np.testing.assert_allclose(st(back, TEXTS, "encode_document"), trained.encode_document(TEXTS).toarray(),
                               rtol=1e-5, atol=1e-5)
    again = load_sparse_encoder(tmp_path / "ours")
    np.testing.assert_array_equal(np.asarray(again.params["query_static"]), np.asarray(trained.params["query_static"]))
    with pytest.raises(ValueError, match=r"static query weights must be \(3000,\)"):
        with_static_queries(trained, np.ones(5))


def smaller_beir(small_beir, d, n_queries=24, n_docs=60):
    """``small_beir``'s first queries, with their relevant documents among its first documents."""
    d.mkdir()
    (d / "qrels").mkdir()
    docs = (small_beir / "corpus.jsonl").read_text().splitlines()[:n_docs]
    kept = {json.loads(line)["_id"] for line in docs}
    qrels = [line.split("\t") for line in (small_beir / "qrels" / "dev.tsv").read_text().splitlines()[1:]]
    qrels = [q for q in qrels if q[1] in kept][:n_queries]
    queries = {q[0] for q in qrels}
    (d / "corpus.jsonl").write_text("\n".join(docs) + "\n")
    (d / "queries.jsonl").write_text("".join(line + "\n" for line in (small_beir / "queries.jsonl").read_text().splitlines()
                                             if json.loads(line)["_id"] in queries))
    (d / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(q) + "\n" for q in qrels))
    return d


def test_sparse_retrieval_evaluator_equals_sentence_transformers(tiny_masked_lm, small_beir, tmp_path):
    beir = smaller_beir(small_beir, tmp_path / "beir")
    model = load_sparse_encoder(tiny_masked_lm, max_length=64)
    data = read_beir(beir, "dev")
    assert len(data.corpus_ids) == 60 and len(data.qrels) >= 10
    evaluator = SparseRetrievalEvaluator(data, name="tiny", k_values=(1, 3, 5, 10, 100), batch_size=64)
    got = evaluator(model)

    queries = dict(zip(evaluator._queries.query_ids, evaluator._queries.query_texts))
    corpus = dict(zip(data.corpus_ids, data.corpus_texts))
    relevant = {q: {d for d, r in data.qrels[q].items() if r > 0} for q in queries}
    theirs_model = STSparseEncoder(str(tiny_masked_lm), device="cpu")
    theirs_model.max_seq_length = 64
    theirs = SparseInformationRetrievalEvaluator(queries, corpus, relevant, name="st", show_progress_bar=False,
                                                 map_at_k=[100], mrr_at_k=[10], ndcg_at_k=[10],
                                                 accuracy_at_k=[1, 3, 5, 10], precision_recall_at_k=[1, 3, 5, 10])(theirs_model)
    pairs = {"ndcg@10": "dot_ndcg@10", "mrr@10": "dot_mrr@10", "map@100": "dot_map@100", "recall@10": "dot_recall@10",
             "precision@5": "dot_precision@5", "accuracy@1": "dot_accuracy@1", "accuracy@10": "dot_accuracy@10",
             "query_active_terms": "query_active_dims", "document_active_terms": "corpus_active_dims",
             "avg_flops": "avg_flops"}
    for ours_key, their_key in pairs.items():
        assert got[f"tiny/{ours_key}"] == pytest.approx(theirs[f"st_{their_key}"], rel=1e-5, abs=1e-6), ours_key
    assert 0 < got["tiny/ndcg@10"] < 1

    # through the suite, as a config entry
    [built] = suite.from_config({"s": {"type": "sparse_retrieval", "path": str(beir), "split": "dev",
                                       "top_k": 16, "k_values": [10]}})
    assert built.top_k == 16 and built.k_values == (10,)
    with pytest.raises(ValueError, match="scores a SPLADE model"):  # not a dense training run's evaluator
        suite.for_training({"s": {"type": "sparse_retrieval", "path": str(beir)}}, batch_size=8, enc_cfg=None)
    with pytest.raises(ValueError, match="unknown option"):
        suite.from_config({"s": {"type": "sparse_retrieval", "path": str(beir), "metric": "cosine"}})


def test_sparsity_equals_a_loop():
    q = sp.random(5, 12, density=0.3, format="csr", random_state=1, dtype=np.float32)
    d = sp.random(9, 12, density=0.4, format="csr", random_state=2, dtype=np.float32)
    flops = sum(np.mean(q.toarray()[:, j] != 0) * np.mean(d.toarray()[:, j] != 0) for j in range(12))
    # FLOPS is the expected count of shared active terms over all query-document pairs
    pairs = np.mean([np.sum((q.toarray()[i] != 0) & (d.toarray()[k] != 0)) for i in range(5) for k in range(9)])
    got = sparsity(q, d)
    assert got["avg_flops"] == pytest.approx(flops) == pytest.approx(pairs)
    assert got["query_active_terms"] == pytest.approx(np.mean([np.count_nonzero(r) for r in q.toarray()]))
    assert got["document_active_terms"] == pytest.approx(np.mean([np.count_nonzero(r) for r in d.toarray()]))
