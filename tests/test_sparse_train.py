"""SPLADE training (model_kind="splade", embedjax/train/sparse_objective.py): the batch loss against
a NumPy loop over sentence-transformers-equal term weights, 8 devices == 1, the run resumed after
SIGKILL exactly, and its export scored the same by sentence-transformers."""

import functools
import json
import signal

import jax
import numpy as np
import optax
import pytest

from embedjax import sparse
from test_train import loss_curve
from embedjax.train.sparse_objective import SparseObjective, sparse_batch_loss

pytestmark = pytest.mark.fast_compile  # checks logic, not speed (conftest.py)

SPLADE_SECTION = {"pooling": "max", "activation": "relu", "query_weight": 5e-2, "document_weight": 3e-2,
                  "warmup": 0.5, "schedule": "quadratic", "query_threshold": None, "document_threshold": None,
                  "inference_free": False}


def _objective_section(**loss_kwargs):
    from configs import base

    section = base.base_config().objective.to_dict()
    return {**section, "loss": "infonce", "loss_kwargs": {"scale": 1.0, "similarity": "dot", **loss_kwargs},
            "dropout": False}


def _batches(model, beir_dir, n=3, batch_size=8):
    from embedjax.data import pipeline
    from embedjax.train import sources
    from embedjax.train.config import DataConfig

    data = DataConfig.from_config({**_data_section(), "train": str(beir_dir), "split": "dev"})
    records = sources.train_source(data)
    it = pipeline.train_pipeline(records, model.tokenizer.replace(buckets=(16, 32, 64)), global_batch_size=batch_size,
                                 seed=0, common_length=True)
    return [next(it).model_inputs() for _ in range(n)]


def _data_section():
    from configs import base

    return {**base.base_config().data.to_dict(), "kind": "beir", "pack_length": 0}


def naive_infonce_dot(q, d, drop=lambda i, j: False):
    """Mean over queries of -log softmax_j(q_i . d_j) at j = i (scale 1, in-batch negatives; the
    documents ``drop(i, j)`` names left out of row i)."""
    q, d = np.asarray(q, np.float64), np.asarray(d, np.float64)
    total = 0.0
    for i in range(len(q)):
        target = float(q[i] @ d[i])
        scores = [float(q[i] @ d[j]) for j in range(len(d)) if j == i or not drop(i, j)]
        m = max(scores)
        total += m + np.log(sum(np.exp(s - m) for s in scores)) - target
    return total / len(q)


def naive_flops(w):
    w = np.asarray(w, np.float64)
    return sum(np.mean(w[:, j]) ** 2 for j in range(w.shape[1]))


def test_sparse_batch_loss_is_infonce_on_term_weights_plus_warmed_up_flops(tiny_masked_lm, small_beir):
    from embedjax.sparse_model import load_sparse_encoder

    model = load_sparse_encoder(tiny_masked_lm, max_length=64)
    [batch] = _batches(model, small_beir, n=1)
    objective = SparseObjective.from_config(_objective_section(), SPLADE_SECTION).for_run(total_steps=8)
    assert objective.warmup_steps == 4
    backbone = {k: v for k, v in model.params.items() if k != "mlm_head"}
    embed = lambda side: np.asarray(sparse.splade_embed(  # noqa: E731
        backbone, model.cfg, model.params["mlm_head"], side.ids, side.mask, token_type_ids=side.types))
    wq, wd = embed(batch.a), embed(batch.b)
    for step, ramp in ((0, 0.0), (2, 0.25), (3, 0.5625), (6, 1.0)):
        loss, parts = sparse_batch_loss(model.params, model.cfg, objective, batch, jax.random.key(0), step=step)
        expected = naive_infonce_dot(wq, wd) + ramp * (5e-2 * naive_flops(wq) + 3e-2 * naive_flops(wd))
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        assert float(parts["query_weight"]) == pytest.approx(5e-2 * ramp)
    assert float(parts["query_active_terms"]) == pytest.approx(np.mean(np.count_nonzero(wq, axis=1)))
    # query_weight 0: the queries are not regularised (an inference-free query side's training)
    no_query = SparseObjective.from_config(_objective_section(), {**SPLADE_SECTION, "query_weight": 0.0})
    loss, parts = sparse_batch_loss(model.params, model.cfg, no_query, batch, jax.random.key(0), step=100)
    assert "query_flops" not in parts
    assert float(loss) == pytest.approx(naive_infonce_dot(wq, wd) + 3e-2 * naive_flops(wd), rel=1e-5)


def test_inference_free_queries_are_static_weights_on_their_ids_and_train(tiny_masked_lm, small_beir):
    """splade.inference_free: the queries' term weights are the static table on the ids each query
    holds, [CLS] / [SEP] left out (what sentence-transformers' SparseStaticEmbedding reads); the
    loss is InfoNCE of those against the documents' SPLADE vectors, and the table gets a gradient on
    those ids only."""
    import dataclasses

    from embedjax.sparse_model import load_sparse_encoder, with_static_queries

    model = with_static_queries(load_sparse_encoder(tiny_masked_lm, max_length=64),
                                np.linspace(0.005, 0.015, 3000).astype(np.float32))  # logits near 1
    [batch] = _batches(model, small_beir, n=1)
    objective = SparseObjective.from_config(_objective_section(), {**SPLADE_SECTION, "query_weight": 0.0,
                                                                   "inference_free": True})
    cls, sep = model.tokenizer.backend.token_to_id("[CLS]"), model.tokenizer.backend.token_to_id("[SEP]")
    objective = dataclasses.replace(objective.for_run(total_steps=8), special_ids=(cls, sep))
    table = np.asarray(model.params["query_static"])
    wq = np.zeros((len(batch.a.ids), 3000))
    for row, ids, mask in zip(wq, batch.a.ids, batch.a.mask):
        for i in set(int(t) for t, m in zip(ids, mask) if m and t not in (cls, sep)):
            row[i] = table[i]
    backbone = {k: v for k, v in model.params.items() if k not in ("mlm_head", "query_static")}
    wd = np.asarray(sparse.splade_embed(backbone, model.cfg, model.params["mlm_head"], batch.b.ids, batch.b.mask,
                                        token_type_ids=batch.b.types))
    loss_and_grad = jax.value_and_grad(lambda p: sparse_batch_loss(p, model.cfg, objective, batch, jax.random.key(0),
                                                                    step=100)[0])
    loss, grads = loss_and_grad(model.params)
    a_hash, b_hash = np.asarray(batch.a.hashes), np.asarray(batch.b.hashes)  # a text is no negative of itself
    base = naive_infonce_dot(wq, wd, lambda i, j: b_hash[j] in (a_hash[i], b_hash[i]))
    assert float(loss) == pytest.approx(base + 3e-2 * naive_flops(wd), rel=1e-5)
    touched = np.asarray(grads["query_static"]) != 0
    assert touched.any() and not (touched & (wq.max(axis=0) == 0)).any()


def test_sparse_distillation_losses_are_margin_mse_and_listwise_kl_on_term_weights(tiny_masked_lm, small_beir):
    """objective.loss=margin_mse / listwise_kl: the teacher's scores of (query, positive, negative)
    against the dot products of the term weights (NumPy), plus the warmed-up FLOPS."""
    import dataclasses

    from embedjax.sparse_model import load_sparse_encoder

    model = load_sparse_encoder(tiny_masked_lm, max_length=64)
    [batch] = _batches(model, small_beir, n=1)
    negative = jax.tree.map(lambda x: np.roll(x, 1, axis=0), batch.b)  # the next query's positive
    teacher = np.random.default_rng(0).normal(size=(len(batch.a.ids), 2)).astype(np.float32) * 3
    batch = dataclasses.replace(batch, n=negative, teacher=teacher)
    backbone = {k: v for k, v in model.params.items() if k != "mlm_head"}
    embed = lambda side: np.asarray(sparse.splade_embed(  # noqa: E731
        backbone, model.cfg, model.params["mlm_head"], side.ids, side.mask, token_type_ids=side.types), np.float64)
    wq, wd, wn = embed(batch.a), embed(batch.b), embed(batch.n)
    s = np.stack([np.sum(wq * wd, axis=1), np.sum(wq * wn, axis=1)], axis=1)
    regulariser = 5e-2 * naive_flops(wq) + 3e-2 * naive_flops(np.concatenate([wd, wn]))
    margin = np.mean(((s[:, 0] - s[:, 1]) - (teacher[:, 0] - teacher[:, 1])) ** 2)
    log_softmax = lambda x: x - np.log(np.sum(np.exp(x - x.max(1, keepdims=True)), 1, keepdims=True)) - x.max(1, keepdims=True)  # noqa: E731
    target = np.exp(log_softmax(teacher / 2.0))
    kl = np.mean(np.sum(target * (log_softmax(teacher / 2.0) - log_softmax(s / 2.0)), axis=1))
    for loss, want in (("margin_mse", margin), ("listwise_kl", kl)):
        objective = SparseObjective.from_config({**_objective_section(), "loss": loss, "loss_kwargs": {}},
                                                SPLADE_SECTION).for_run(total_steps=4)
        got, parts = sparse_batch_loss(model.params, model.cfg, objective, batch, jax.random.key(0), step=10)
        assert float(parts["base"]) == pytest.approx(want, rel=1e-4), loss
        assert float(got) == pytest.approx(want + regulariser, rel=1e-4), loss


def test_sparse_objective_refuses_dense_options_and_bad_sections():
    with pytest.raises(ValueError, match=r"apply to dense runs"):
        SparseObjective.from_config({**_objective_section(), "matryoshka_dims": (8,)}, SPLADE_SECTION)
    with pytest.raises(ValueError, match="a SPLADE run trains with"):
        SparseObjective.from_config({**_objective_section(), "loss": "angle", "loss_kwargs": {}}, SPLADE_SECTION)
    with pytest.raises(ValueError, match="unknown splade keys"):
        SparseObjective.from_config(_objective_section(), {**SPLADE_SECTION, "lambda_q": 1})
    with pytest.raises(ValueError, match=r"splade.warmup .* in \[0, 1\]"):
        SparseObjective.from_config(_objective_section(), {**SPLADE_SECTION, "warmup": 2})
    with pytest.raises(ValueError, match="splade.pooling"):
        SparseObjective.from_config(_objective_section(), {**SPLADE_SECTION, "pooling": "mean"})
    with pytest.raises(ValueError, match="splade.head_init='zeros'"):
        SparseObjective.from_config(_objective_section(), {**SPLADE_SECTION, "head_init": "zeros"})
    from configs import beir_splade
    from embedjax.train.config import TrainConfig

    config = beir_splade.get_config("smoke")
    with pytest.raises(ValueError, match="a SPLADE run pools with splade.pooling"):
        config.pooling = "mean"
        TrainConfig.from_config(config)
    config.pooling = None


def test_an_inference_free_run_starts_from_ones_and_refuses_to_train_a_static_side_as_a_transformer(
        tiny_masked_lm, tmp_path):
    from configs import beir_splade
    from embedjax.sparse_model import load_sparse_encoder, save_sparse_encoder, with_static_queries
    from embedjax.train import encoders
    from embedjax.train.config import TrainConfig

    config = beir_splade.get_config("inference_free,smoke")
    config.model = str(tiny_masked_lm)
    model = TrainConfig.from_config(config).model
    assert model.splade["inference_free"] and model.splade["query_weight"] == 0.0
    start = encoders.load_sparse_model(model)
    np.testing.assert_array_equal(np.asarray(start.params["query_static"]), np.ones(3000))
    config.model = str(save_sparse_encoder(with_static_queries(load_sparse_encoder(tiny_masked_lm)), tmp_path / "if"))
    config.splade.inference_free = False
    with pytest.raises(ValueError, match="is an inference-free SPLADE model"):
        encoders.load_sparse_model(TrainConfig.from_config(config).model)


def test_sparse_steps_on_eight_devices_equal_one_device(tiny_masked_lm, small_beir):
    """The run's compiled step on an 8-device data x fsdp mesh (fsdp rules) and on one device: the
    same losses, FLOPS terms and params, step after step, the regulariser warming up."""
    from embedjax import sharding
    from embedjax.sparse_model import load_sparse_encoder
    from embedjax.train.state import TrainState, state_shardings
    from embedjax.train.step import jit_train_step

    model = load_sparse_encoder(tiny_masked_lm, max_length=64)
    batches = _batches(model, small_beir, n=3, batch_size=8)
    objective = SparseObjective.from_config(_objective_section(), SPLADE_SECTION).for_run(total_steps=4)
    # clipped SGD: params move by lr x the unit-norm gradient, so the comparison sees the gradients
    # themselves (Adam would scale a near-zero gradient's rounding noise up to a whole step)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05))
    create = functools.partial(TrainState.create, tx=tx, seed=0)
    runs = {}
    for name, mesh, rules in (("one", sharding.make_mesh(devices=jax.devices()[:1]), "replicated"),
                              ("eight", sharding.make_mesh(data=2, fsdp=4), "fsdp")):
        shards, _ = state_shardings(jax.eval_shape(create, model.params), {}, mesh, sharding.rules_for(model.cfg, rules))
        state = jax.jit(create, out_shardings=shards)(model.params)
        step = jit_train_step(model.cfg, objective, tx, shards, None, mesh)
        logged = []
        for batch in batches:
            state, metrics = step(state, sharding.to_global(batch, mesh), None, None)
            logged.append({k: float(v) for k, v in metrics.items()})
        runs[name] = (logged, jax.device_get(state.params))
    for one, eight in zip(runs["one"][0], runs["eight"][0]):
        for key in ("loss", "base", "query_flops", "document_flops", "query_weight"):
            assert eight[key] == pytest.approx(one[key], rel=2e-5), key
    assert runs["one"][0][0]["query_weight"] == 0.0 < runs["one"][0][2]["query_weight"]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(runs["one"][1]),
                                                               jax.tree.leaves(model.params)))
    assert moved > 1e-3, moved  # the steps train
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(runs["one"][1]), jax.tree.leaves(runs["eight"][1])):
        # the updates agree to 0.3% of the largest one (float32 sums in another order over 8 devices)
        np.testing.assert_allclose(a, b, atol=3e-3 * moved, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_masked_lm, small_beir, tmp_path_factory):
    """configs/beir_splade.py:beir=<small_beir>,split=dev,smoke=4 on the tiny MLM as one process of 2
    devices (a checkpoint every 2 steps, one evaluation at the end), SIGKILLed after step 3 and
    resumed by the same command."""
    from test_multihost import launch

    workdir = tmp_path_factory.mktemp("splade") / "run"
    config = f"beir_splade.py:beir={small_beir},split=dev,smoke=4"
    overrides = {"model": tiny_masked_lm, "max_length": 64, "log_every": 1, "optim.learning_rate": 1e-3,
                 "optim.warmup": 0, "checkpoint.keep": 10, "eval_every": 100}
    killed = launch(workdir, config, overrides, processes=1, devices=2, kill_at=3)
    assert [rc for rc, _ in killed] == [-signal.SIGKILL], [err[-3000:] for _, err in killed]
    before_kill = loss_curve(workdir)
    for rc, err in launch(workdir, config, overrides, processes=1, devices=2):
        assert rc == 0, err[-4000:]
    return workdir, before_kill


def test_splade_run_resumes_after_sigkill_exactly(killed_and_resumed):
    workdir, before_kill = killed_and_resumed
    resumed = loss_curve(workdir)
    assert sorted(before_kill) == list(range(1, 4)) and sorted(resumed) == list(range(1, 5))
    assert resumed[3] == before_kill[3]  # step 3 redone from the step-2 checkpoint: bit for bit
    assert len({round(v, 6) for v in resumed.values()}) == 4
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    weights = [r["document_weight"] for r in records if "document_weight" in r]
    assert weights[0] == 0.0 and weights[-1] == pytest.approx(3e-5)  # warmed up over the first third


def test_splade_export_scores_the_same_in_sentence_transformers(killed_and_resumed, small_beir):
    from sentence_transformers import SparseEncoder as STSparseEncoder

    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval.sparse_retrieval import SparseRetrievalEvaluator
    from embedjax.sparse_model import load_sparse_encoder

    workdir, _ = killed_and_resumed
    summary = json.loads((workdir / "summary.json").read_text())
    ours = load_sparse_encoder(workdir)
    texts = ["A man is playing a flute.", "Two dogs run on the beach."]
    theirs = STSparseEncoder(str(workdir), device="cpu").encode(texts, convert_to_tensor=True).to_dense().numpy()
    np.testing.assert_allclose(ours.encode(texts).toarray(), theirs, rtol=1e-5, atol=1e-5)
    # what the loop reported for the exported step is what the export scores
    scored = SparseRetrievalEvaluator(read_beir(small_beir, "dev"), name="dev")(ours)
    assert summary["after"]["dev/ndcg@10"] == pytest.approx(scored["dev/ndcg@10"], abs=1e-6)

