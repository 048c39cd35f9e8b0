"""The MTEB adapter: mteb tasks built from local files run on MTEBEncoder(minilm), offline.

References: our PairClassificationEvaluator (itself checked against sentence-transformers),
scikit-learn's AP and a hand-written nDCG@10 on sentence-transformers embeddings, and mteb's own
prompt resolution."""

import socket
import subprocess
import sys

import numpy as np
import pytest

from embedjax.data import read_stsb
from embedjax.data.pair_readers import read_sick_binary
from embedjax.eval import pair_classification as pc
from embedjax.eval.mteb import MTEBEncoder, resolve_prompt

GENERAL = dict(
    description="A local test task.", reference="https://github.com/embeddings-benchmark/mteb",
    dataset={"path": "NA", "revision": "NA"}, category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"],
    date=("2014-01-01", "2014-01-01"), dialect=["Written"], domains=[], task_subtypes=[], license="cc-by-4.0",
    annotations_creators="derived", modalities=["text"], sample_creation="found", bibtex_citation="",
)


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub switched off and every socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(self, address, *args):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


class Spy:
    """An Encoder stand-in that records every (texts, prompt) it is asked to embed."""

    def __init__(self, encoder):
        self._encoder, self.calls = encoder, []

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def encode(self, texts, **kw):
        self.calls.append((list(texts), kw.get("prompt")))
        return self._encoder.encode(texts, **kw)


@pytest.fixture(scope="module")
def sick_pairs(sick_dir):
    return read_sick_binary(sick_dir / "SICK_trial.txt")[:200]


def pair_task(pairs):
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalPairs(AbsTaskPairClassification):
        metadata = TaskMetadata(type="PairClassification", name="LocalSICKPairs", main_score="max_ap", **GENERAL)

        def load_data(self, num_proc=None, **kwargs):
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": [p.text_a for p in pairs], "sentence2": [p.text_b for p in pairs],
                "labels": [p.label for p in pairs]})})
            self.data_loaded = True

    return LocalPairs()


def retrieval_task(queries, corpus, relevant):
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name="LocalRetrieval", main_score="ndcg_at_10", **GENERAL)

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_dict({"id": list(queries), "text": list(queries.values())}),
                corpus=Dataset.from_dict({"id": list(corpus), "text": list(corpus.values())}),
                relevant_docs={q: {d: 1} for q, d in relevant.items()},
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return LocalRetrieval()


def test_mteb_is_imported_lazily():
    code = "import sys, embedjax.eval.mteb; assert 'mteb' not in sys.modules, 'mteb imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_protocol_and_meta(minilm):
    from mteb.models.models_protocols import EncoderProtocol
    from mteb.similarity_functions import cos_sim

    model = MTEBEncoder(minilm)
    assert isinstance(model, EncoderProtocol)
    meta = model.mteb_model_meta
    assert meta.name == "embedjax/" + minilm.path.name and meta.embed_dim == 384 and meta.framework == ["JAX"]
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_allclose(model.similarity(a, b), np.asarray(cos_sim(a, b)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.similarity_pairwise(a, b[:3]), np.diag(np.asarray(cos_sim(a, b[:3]))),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="similarity_fn"):
        MTEBEncoder(minilm, similarity_fn="angle")
    with pytest.raises(ValueError, match="organization/model"):
        MTEBEncoder(minilm, name="minilm")


def test_resolve_prompt_matches_mteb(minilm):
    from mteb.models.abs_encoder import get_prompt
    from mteb.types import PromptType

    meta = retrieval_task({}, {}, {}).metadata
    full = {"LocalRetrieval-query": "1", "LocalRetrieval": "2", "Retrieval-query": "3", "Retrieval": "4",
            "query": "5", "document": "6", "STS": "never"}
    keys = list(full)
    for drop in range(len(keys) + 1):  # remove the most specific keys one by one
        prompts = {k: full[k] for k in keys[drop:]}
        for side in (PromptType.query, PromptType.document, None):
            expected = get_prompt(prompts, meta, side)
            assert resolve_prompt(prompts, meta.name, meta.type, side and side.value) == expected
            assert MTEBEncoder(minilm, prompts=prompts).prompt_for(meta, side) == expected
    # No prompt dict: the checkpoint's own prompts.
    import dataclasses

    with_prompts = dataclasses.replace(minilm, prompts={"query": "q> ", "document": "d> "})
    assert MTEBEncoder(with_prompts).prompt_for(meta, PromptType.query) == "q> "
    assert MTEBEncoder(with_prompts, prompts={"Retrieval": "r> "}).prompt_for(meta, PromptType.document) == "r> "


def test_pair_classification_task(offline, minilm, st_minilm, sick_pairs):
    import mteb
    from sklearn.metrics import average_precision_score

    result = mteb.evaluate(MTEBEncoder(minilm, batch_size=64), pair_task(sick_pairs), cache=None,
                           show_progress_bar=False)
    scores = result.task_results[0].scores["test"][0]

    ev = pc.PairClassificationEvaluator(sick_pairs, batch_size=64)  # mteb's batch size: no new compiles
    ours = ev.score(ev.embed(minilm))
    # mteb scored the very embeddings our evaluator scored: equal up to float rounding
    assert scores["main_score"] == pytest.approx(ours["max_ap"], abs=1e-6)
    for key in ("ap", "f1", "precision", "recall"):  # mteb's accuracy never tries "all positive": not compared
        for metric in ("cosine", "dot", "euclidean", "manhattan"):
            assert scores[f"{metric}_{key}"] == pytest.approx(ours[f"{metric}_{key}"], abs=1e-6), (metric, key)
    # And straight from sentence-transformers' embeddings and scikit-learn.
    za = st_minilm.encode([p.text_a for p in sick_pairs], convert_to_numpy=True)
    zb = st_minilm.encode([p.text_b for p in sick_pairs], convert_to_numpy=True)
    cos = np.sum(za * zb, axis=1) / np.linalg.norm(za, axis=1) / np.linalg.norm(zb, axis=1)
    assert scores["cosine_ap"] == pytest.approx(average_precision_score([p.label for p in sick_pairs], cos), abs=1e-3)


def test_retrieval_task_prompts_reach_the_right_side(offline, minilm, st_minilm, stsb_dir):
    import mteb

    pairs = read_stsb(stsb_dir / "sts-dev.csv")
    close = list({p.text_a: p for p in pairs if p.score >= 4}.values())
    close = [p for p in close if p.text_b not in {c.text_a for c in close}][:40]
    queries = {f"q{i}": p.text_a for i, p in enumerate(close)}
    # Distinct documents, none of them also a query (so each text has one side).
    docs = [t for t in dict.fromkeys([p.text_b for p in close] + [p.text_b for p in pairs[-60:]])
            if t not in queries.values()]
    assert len(docs) > 80
    corpus = {f"d{i}": t for i, t in enumerate(docs)}
    relevant = {f"q{i}": f"d{docs.index(p.text_b)}" for i, p in enumerate(close)}
    prompts = {"LocalRetrieval-query": "Question: ", "query": "query: ", "document": "passage: ", "STS": "no: "}

    spy = Spy(minilm)
    result = mteb.evaluate(MTEBEncoder(spy, prompts=prompts, batch_size=64), retrieval_task(queries, corpus, relevant),
                           cache=None, show_progress_bar=False)
    ndcg = result.task_results[0].scores["test"][0]["main_score"]

    seen = {}
    for texts, prompt in spy.calls:
        for t in texts:
            seen.setdefault(t, set()).add(prompt)
    assert all(seen[q] == {"Question: "} for q in queries.values())  # the most specific key wins
    assert all(seen[d] == {"passage: "} for d in docs if d not in queries.values())
    assert set(seen) == set(queries.values()) | set(docs)

    # Reference: sentence-transformers embeddings with the same prompts, cosine, nDCG@10 by hand
    # (one relevant document per query: 1 / log2(rank + 1) if it ranks in the top 10).
    zq = st_minilm.encode(list(queries.values()), prompt="Question: ", convert_to_numpy=True)
    zd = st_minilm.encode(docs, prompt="passage: ", convert_to_numpy=True)
    sims = (zq / np.linalg.norm(zq, axis=1, keepdims=True)) @ (zd / np.linalg.norm(zd, axis=1, keepdims=True)).T
    gains = []
    for i, q in enumerate(queries):
        target = int(relevant[q][1:])
        rank = 1 + int(np.sum(sims[i] > sims[i, target]))
        gains.append(1 / np.log2(rank + 1) if rank <= 10 else 0.0)
    assert ndcg == pytest.approx(np.mean(gains), abs=1e-3)
    assert 0.5 < ndcg < 1.0  # informative: neither chance nor trivially perfect
