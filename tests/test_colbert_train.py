"""ColBERT training (model_kind="colbert", embedjax/train/colbert_objective.py): the losses on MaxSim
against NumPy loops (PyLate's Contrastive and Distillation formulas) with gradient checks, the
training batches laid out as the encoder encodes, GradCache == plain, 8 devices == 1, and a run
whose export PyLate loads and encodes the same."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from conftest import pylate_oracle
from embedjax import colbert, losses
from embedjax import similarity as sim
from embedjax.colbert_model import load_colbert, save_colbert
from embedjax.train.colbert_objective import ColbertObjective, colbert_batch_loss

pytestmark = pytest.mark.fast_compile  # checks logic, not speed (conftest.py)


def naive_maxsim(q, d):
    """Sum over query tokens of the best dot product with any document token (zero tokens included,
    as PyLate's zeroed padding)."""
    return sum(max(float(qt @ dt) for dt in d) for qt in q)


def naive_contrastive(queries, documents, drop=lambda i, j: False):
    """PyLate's Contrastive at temperature 1: mean over queries of CE(MaxSim(q_i, every doc), target i),
    the documents ``drop(i, j)`` names left out of row i."""
    total = 0.0
    for i, q in enumerate(queries):
        scores = np.array([naive_maxsim(q, d) for j, d in enumerate(documents) if j == i or not drop(i, j)])
        target = naive_maxsim(q, documents[i])
        total += np.log(np.sum(np.exp(scores - scores.max()))) + scores.max() - target
    return total / len(queries)


def _objective_section(loss="infonce", **loss_kwargs):
    from configs import base

    return {**base.base_config().objective.to_dict(), "loss": loss, "loss_kwargs": loss_kwargs, "dropout": False}


def _random_tokens(key, shape, zero_from):
    """Unit token vectors (..., T, dim) whose tokens from ``zero_from`` on are zeroed (padding)."""
    x = sim.l2_normalize(jax.random.normal(key, shape))
    return np.asarray(x.at[..., zero_from:, :].set(0.0), np.float64)


def test_infonce_on_token_maxsim_is_pylate_contrastive_with_a_gradient_check():
    metric = sim.TokenMaxSim(4)
    q = _random_tokens(jax.random.key(0), (3, 5, 4), zero_from=5)   # expanded queries: every token scores
    d = _random_tokens(jax.random.key(1), (3, 7, 4), zero_from=5)   # documents: 2 padding tokens
    n = _random_tokens(jax.random.key(2), (3, 7, 4), zero_from=6)   # one hard negative each
    flat = lambda x: jnp.asarray(x.reshape(*x.shape[:-2], -1))  # noqa: E731
    got = losses.infonce(flat(q), flat(d), flat(n), scale=1.0, similarity=metric)
    assert float(got) == pytest.approx(naive_contrastive(q, list(d) + list(n)), rel=1e-6)
    # duplicate masking by ids works on token rows as on vectors: document 1 is query 0's too
    masked = losses.infonce(flat(q), flat(d), scale=1.0, similarity=metric, positive_ids=jnp.array([5, 6, 7]),
                            relevant_ids=jnp.array([[6], [0], [0]]))
    scores = np.array([[naive_maxsim(a, b) for b in d] for a in q])
    rows = [np.delete(scores[0], 1)] + [scores[1], scores[2]]
    want = np.mean([np.log(np.sum(np.exp(r))) - scores[i, i] for i, r in enumerate(rows)])
    assert float(masked) == pytest.approx(want, rel=1e-6)
    with jax.enable_x64(True):  # float64 inputs made inside: finite differences need them
        check_grads(lambda a, b: losses.infonce(a, b, scale=1.0, similarity=metric),
                    (flat(q) + 0.01, flat(d) + 0.02), order=1, modes=("rev",), eps=1e-6)
    with pytest.raises(ValueError, match="only directions=\\('query_to_doc',\\)"):
        losses.infonce(flat(q), flat(d), similarity=metric, symmetric=True)


def test_listwise_kl_on_token_maxsim_is_pylate_distillation():
    """PyLate's Distillation: KL(softmax(teacher) || softmax(min-max normalised MaxSim)), batch mean."""
    metric = sim.TokenMaxSim(4)
    q = _random_tokens(jax.random.key(3), (2, 5, 4), zero_from=5)
    p = _random_tokens(jax.random.key(4), (2, 6, 4), zero_from=4)
    n = _random_tokens(jax.random.key(5), (2, 3, 6, 4), zero_from=5)
    teacher = np.array([[3.0, 1.0, 0.5, -1.0], [2.0, 2.5, 0.0, 1.0]])
    want = 0.0
    for i in range(2):
        s = np.array([naive_maxsim(q[i], c) for c in [p[i], *n[i]]])
        s = (s - s.min()) / (s.max() - s.min() + 1e-8)
        log_pred, log_target = s - np.log(np.sum(np.exp(s))), teacher[i] - np.log(np.sum(np.exp(teacher[i])))
        want += np.sum(np.exp(log_target) * (log_target - log_pred)) / 2
    flat = lambda x: jnp.asarray(x.reshape(*x.shape[:-2], -1))  # noqa: E731
    kl = functools.partial(losses.listwise_kl, scale=1.0, normalize_scores=True, similarity=metric)
    assert float(kl(flat(q), flat(p), flat(n), jnp.asarray(teacher))) == pytest.approx(want, rel=1e-6)
    with jax.enable_x64(True):
        check_grads(lambda a: kl(a, flat(p), flat(n), jnp.asarray(teacher)), (flat(q) + 0.01,), order=1,
                    modes=("rev",), eps=1e-6)


@pytest.fixture(scope="module")
def fresh(tiny_masked_lm):
    """A fresh ColBERT model on the tiny MLM's backbone: 16 wide, queries of 12 tokens, documents of 24."""
    return load_colbert(tiny_masked_lm, query_length=12, document_length=24, dim=16, seed=3)


def _batches(model, beir_dir, n=2, batch_size=8):
    from configs import base
    from embedjax.data import pipeline
    from embedjax.train import sources
    from embedjax.train.config import DataConfig

    data = DataConfig.from_config({**base.base_config().data.to_dict(), "kind": "beir", "pack_length": 0,
                                   "train": str(beir_dir), "split": "dev"})
    records = sources.train_source(data)
    it = pipeline.train_pipeline(records, model.tokenizer.replace(buckets=(16, 32)), global_batch_size=batch_size,
                                 seed=0, common_length=True, transform=model.batch_format())
    return records, [next(it) for _ in range(n)]


def test_training_batches_are_laid_out_as_the_encoder_encodes(fresh, small_beir):
    """Every query and document row of a training batch is the row ``encode_queries`` /
    ``encode_documents`` builds for that text (markers, [MASK] expansion, skiplist as the score
    mask), a query longer than query_length cut as the query tokenizer cuts it."""
    from embedjax.data.pipeline import as_record

    records, [batch, _] = _batches(fresh, small_beir, n=2)
    layout = fresh.batch_format()
    texts = [as_record(records[int(i)]) for i in batch.index]
    assert batch.a.ids.shape == (8, 12)
    assert any(len(fresh.document_tokenizer.encode([r["text_a"]])[0].ids) > 11 for r in texts)  # some are cut
    for row, record in enumerate(texts):
        for side, field, tokenizer, make in (("a", "text_a", fresh.query_tokenizer, layout.query_row),
                                             ("b", "text_b", fresh.document_tokenizer, layout.document_row)):
            text = record[field] if isinstance(record[field], str) else record[field][0]
            ids, attention, score = make(tokenizer.encode([text])[0].ids)
            got = getattr(batch, side)
            np.testing.assert_array_equal(got.ids[row, :len(ids)], ids)
            np.testing.assert_array_equal(got.mask[row], np.pad(attention, (0, got.ids.shape[1] - len(ids))))
            np.testing.assert_array_equal(got.pool[row], np.pad(score, (0, got.ids.shape[1] - len(ids))))


def test_colbert_batch_loss_is_contrastive_maxsim_of_the_encoders_vectors(fresh, small_beir):
    """The batch loss is the NumPy Contrastive of the token vectors the encoder's own path computes
    (the non-scoring ones zeroed), and GradCache (chunks of 2) gives the same loss and gradient."""
    _, [batch, _] = _batches(fresh, small_beir, n=2)
    batch = batch.model_inputs()
    objective = ColbertObjective.from_config(_objective_section(scale=1.0), dim=16)
    backbone = {k: v for k, v in fresh.params.items() if k != "projection"}

    def vectors(side):  # every position, the non-scoring ones zeroed: PyLate's padded layout
        v = np.asarray(colbert.token_vectors(backbone, fresh.cfg, fresh.params["projection"], side.ids, side.mask,
                                             token_type_ids=side.types), np.float64)
        return [np.where(score[:, None].astype(bool), row, 0.0) for row, score in zip(v, side.pool)]

    # a document is no negative of a query whose own text or positive it is (the same text hash)
    a_hash, b_hash = np.asarray(batch.a.hashes), np.asarray(batch.b.hashes)
    assert np.isin(a_hash, b_hash).any()  # STS sentences: some query is another query's document
    want = naive_contrastive(vectors(batch.a), vectors(batch.b), lambda i, j: b_hash[j] in (a_hash[i], b_hash[i]))
    loss_and_grad = jax.value_and_grad(colbert_batch_loss)
    loss, grads = loss_and_grad(fresh.params, fresh.cfg, objective, batch, jax.random.key(0))
    assert float(loss) == pytest.approx(want, rel=1e-5)
    chunked = ColbertObjective.from_config({**_objective_section(scale=1.0), "gradcache_chunk": 2}, dim=16)
    loss_c, grads_c = loss_and_grad(fresh.params, fresh.cfg, chunked, batch, jax.random.key(0))
    assert float(loss_c) == pytest.approx(float(loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_colbert_objective_refuses_single_vector_options():
    with pytest.raises(ValueError, match="apply to single-vector runs"):
        ColbertObjective.from_config({**_objective_section(), "matryoshka_dims": (8,)}, dim=16)
    with pytest.raises(ValueError, match="a ColBERT run trains with"):
        ColbertObjective.from_config(_objective_section("cosent"), dim=16)
    with pytest.raises(ValueError, match="scores by MaxSim"):
        ColbertObjective.from_config(_objective_section(similarity="cosine"), dim=16)
    from configs import beir_colbert
    from embedjax.train.config import TrainConfig

    config = beir_colbert.get_config("smoke")
    config.max_length = 64
    with pytest.raises(ValueError, match="colbert.query_length and colbert.document_length"):
        TrainConfig.from_config(config)
    config.max_length = None
    config.evals = {"x": {"type": "retrieval", "path": "x", "split": "dev"}}
    from embedjax.eval import suite

    with pytest.raises(ValueError, match="a ColBERT run is evaluated by"):
        suite.for_training(config.evals, batch_size=8, enc_cfg=None, late=True)


def test_colbert_steps_on_eight_devices_equal_one_device(fresh, small_beir):
    """The compiled step on an 8-device data x fsdp mesh and on one device: the same losses and params."""
    from embedjax import sharding
    from embedjax.train.state import TrainState, state_shardings
    from embedjax.train.step import jit_train_step

    _, batches = _batches(fresh, small_beir, n=2)
    objective = ColbertObjective.from_config(_objective_section(scale=1.0), dim=16)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05))
    create = functools.partial(TrainState.create, tx=tx, seed=0)
    runs = {}
    for name, mesh, rules in (("one", sharding.make_mesh(devices=jax.devices()[:1]), "replicated"),
                              ("eight", sharding.make_mesh(data=2, fsdp=4), "fsdp")):
        shards, _ = state_shardings(jax.eval_shape(create, fresh.params), {}, mesh, sharding.rules_for(fresh.cfg, rules))
        state = jax.jit(create, out_shardings=shards)(fresh.params)
        step = jit_train_step(fresh.cfg, objective, tx, shards, None, mesh)
        losses_seen = []
        for batch in batches:
            state, metrics = step(state, sharding.to_global(batch.model_inputs(), mesh), None, None)
            losses_seen.append(float(metrics["loss"]))
        runs[name] = (losses_seen, jax.device_get(state.params))
    np.testing.assert_allclose(runs["eight"][0], runs["one"][0], rtol=2e-5)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(runs["one"][1]),
                                                           jax.tree.leaves(fresh.params)))
    assert moved > 1e-3, moved
    for a, b in zip(jax.tree.leaves(runs["one"][1]), jax.tree.leaves(runs["eight"][1])):
        np.testing.assert_allclose(a, b, atol=3e-3 * moved)


def test_a_colbert_run_exports_a_model_pylate_encodes_the_same(tiny_masked_lm, small_beir, tmp_path):
    """configs/beir_colbert.py on the tiny MLM's backbone, 4 steps: the exported model is what the run
    evaluated, and PyLate loads it and encodes the same token vectors (1e-5)."""
    from configs import beir_colbert
    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval.late_retrieval import LateRetrievalEvaluator
    from embedjax.train.loop import train_and_evaluate

    config = beir_colbert.get_config(f"beir={small_beir},split=dev,smoke=4,dim=16,doc_length=24")
    config.model = str(tiny_masked_lm)
    config.colbert.query_length = 12
    config.optim.learning_rate = 1e-3
    config.optim.warmup = 0
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 4
    ours = load_colbert(tmp_path / "run")
    assert (ours.dim, ours.query_length, ours.document_length) == (16, 12, 24)
    scored = LateRetrievalEvaluator(read_beir(small_beir, "dev"), name="dev")(ours)
    assert summary["after"]["dev/ndcg@10"] == pytest.approx(scored["dev/ndcg@10"], abs=1e-6)
    start = load_colbert(tiny_masked_lm, query_length=12, document_length=24, dim=16, seed=0)
    assert not np.allclose(ours.params["projection"]["kernel"], start.params["projection"]["kernel"])  # it trained
    queries, documents = ["How many legs has a spider?", "flute"], ["A spider has eight legs.", "The man plays."]
    theirs = pylate_oracle({"model": str(tmp_path / "run"), "queries": queries, "documents": documents}, tmp_path)
    for i, q in enumerate(ours.encode_queries(queries)):
        np.testing.assert_allclose(q, theirs[f"q{i}"], atol=1e-5)
    for j, d in enumerate(ours.encode_documents(documents)):
        np.testing.assert_allclose(d, theirs[f"d{j}"], atol=1e-5)
    back = load_colbert(save_colbert(ours, tmp_path / "again"))  # a loaded model saves what it loaded
    assert (back.query_marker_id, back.document_marker_id, back.skiplist_ids, back.cfg.vocab_size) == \
        (ours.query_marker_id, ours.document_marker_id, ours.skiplist_ids, ours.cfg.vocab_size)
    np.testing.assert_array_equal(back.params["projection"]["kernel"], ours.params["projection"]["kernel"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)


def test_lora_on_a_colbert_model_trains_adapters_and_projection_and_exports_them_merged(fresh, tmp_path):
    """LoRA: the adapters and the projection train, the backbone is frozen; the export (adapters
    merged) encodes as the model with its adapters does."""
    from embedjax import lora, sharding
    from embedjax.colbert_model import save_trained
    from embedjax.train import encoders
    from embedjax.train.config import LoraConfig

    trainable, frozen, model = encoders.trainable_params(LoraConfig(rank=4), fresh, seed=0)
    names = {sharding.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)}
    assert "projection/kernel" in names and any("lora" in n for n in names)
    assert not any(n.startswith("embeddings/") for n in names)
    # adapters moved off zero, as training would: the merged export must carry them
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora" in sharding.param_path(p) else x, trainable)
    params = lora.combine(trainable, frozen)
    save_trained(model, params, tmp_path / "export")
    adapted = dataclasses.replace(model, params=params)
    exported = load_colbert(tmp_path / "export")
    texts = ["A spider has eight legs.", "The man plays the flute."]
    for a, b in zip(adapted.encode_documents(texts), exported.encode_documents(texts)):
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert not np.allclose(exported.encode_documents(texts)[0], fresh.encode_documents(texts)[0], atol=1e-3)
