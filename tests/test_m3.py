"""BGE-M3's three heads (embedjax/m3.py) and its loss (embedjax/losses/m3.py) against NumPy readings of
FlagEmbedding's BGEM3 formulas written here: the heads from the backbone's states, each head's score,
the ensemble, InfoNCE per head and the ensemble's self-knowledge distillation, with a gradient check."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from embedjax import m3
from embedjax.encoders import registry
from embedjax.losses import m3_loss

pytestmark = pytest.mark.fast_compile  # checks logic, not speed (conftest.py)

H, V = 4, 12  # hidden width and vocabulary of the loss tests


def test_heads_read_the_backbone_states_as_bgem3(tiny_model):
    from embedjax import load_pretrained

    model = load_pretrained(tiny_model)
    heads = m3.init_heads(model.cfg.hidden_size, jax.random.key(1))
    heads["sparse"]["bias"] = jnp.array([0.5])  # most tokens weigh in
    enc = model.tokenizer.encode(["A man plays the flute.", "flute flute"])
    batch = model.tokenizer.pad(enc, 2)
    ids, mask = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
    special = (model.tokenizer.backend.token_to_id("[CLS]"), model.tokenizer.backend.token_to_id("[SEP]"),
               model.cfg.pad_token_id)
    dense, lexical, tokens = m3.outputs(model.params, model.cfg, heads, ids, mask, special_ids=special)
    hidden = np.asarray(registry.of(model.cfg).apply(model.params, model.cfg, ids, mask, all_layers=False), np.float64)
    w = {k: {n: np.asarray(x, np.float64) for n, x in v.items()} for k, v in heads.items()}
    for i in range(2):
        np.testing.assert_allclose(dense[i], hidden[i, 0] / np.linalg.norm(hidden[i, 0]), atol=1e-5)
        want = np.zeros(model.params["embeddings"]["word"].shape[0])
        for t in range(mask[i].sum()):  # each id's largest token weight
            want[ids[i, t]] = max(want[ids[i, t]], max(0.0, hidden[i, t] @ w["sparse"]["kernel"][:, 0]
                                                        + w["sparse"]["bias"][0]))
        want[list(special)] = 0.0
        np.testing.assert_allclose(lexical[i], want, atol=1e-5)
        for t in range(1, ids.shape[1]):
            v = (hidden[i, t] @ w["colbert"]["kernel"] + w["colbert"]["bias"]) * mask[i, t]
            np.testing.assert_allclose(tokens[i, t - 1], v / max(np.linalg.norm(v), 1e-12), atol=1e-5)
    flute = model.tokenizer.backend.token_to_id("flute")
    assert lexical[1, flute] > 0 and np.count_nonzero(lexical[1]) == 1  # "flute" twice: one term


def _texts(key, b, t, padded=True):
    """Rows of b texts: unit dense, non-negative lexical, t unit tokens (the last one zero: padding)."""
    k1, k2, k3 = jax.random.split(key, 3)
    dense = np.array(jax.random.normal(k1, (b, H)))
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    lexical = np.maximum(np.asarray(jax.random.normal(k2, (b, V))), 0.0)
    tokens = np.array(jax.random.normal(k3, (b, t, H)))
    tokens /= np.linalg.norm(tokens, axis=2, keepdims=True)
    if padded:
        tokens[:, -1] = 0.0
    return dense, lexical, tokens


def _naive_scores(q, d):
    """Each head's score of query q against document d, and the ensemble (1, 0.3, 1)."""
    qd, ql, qt = q
    dd, dl, dt = d
    dense, lexical = float(qd @ dd), float(ql @ dl)
    real = [x for x in qt if np.any(x)]
    multi = sum(max(float(x @ y) for y in dt) for x in real) / len(real)
    return {"dense": dense, "lexical": lexical, "multi_vector": multi, "ensemble": dense + 0.3 * lexical + multi}


def naive_m3_loss(queries, documents, scale, drop=lambda i, j: False):
    """FlagEmbedding's BGEM3 loss over every query and every document (positive j = i), the
    documents ``drop(i, j)`` names left out of row i."""
    b = len(queries)
    heads = ("dense", "lexical", "multi_vector", "ensemble")
    ce = {h: 0.0 for h in heads}
    kd = {h: 0.0 for h in heads[:3]}
    for i in range(b):
        cands = [j for j in range(len(documents)) if j == i or not drop(i, j)]
        s = {h: np.array([scale * _naive_scores(queries[i], documents[j])[h] for j in cands]) for h in heads}
        target = cands.index(i)
        log_softmax = {h: s[h] - np.log(np.sum(np.exp(s[h] - s[h].max()))) - s[h].max() for h in heads}
        for h in heads:
            ce[h] -= log_softmax[h][target] / b
        p = np.exp(log_softmax["ensemble"])
        for h in kd:
            kd[h] -= np.sum(p * log_softmax[h]) / b
    base = (ce["dense"] + ce["ensemble"] + 0.1 * ce["lexical"] + ce["multi_vector"]) / 4
    distill = (kd["dense"] + 0.1 * kd["lexical"] + kd["multi_vector"]) / 3
    return (base + distill) / 2, ce, kd


def test_m3_loss_is_bgem3s_with_a_gradient_check():
    q = _texts(jax.random.key(0), 3, 3)
    d = _texts(jax.random.key(1), 3, 5)
    n = _texts(jax.random.key(2), 3, 5)
    split = lambda x: [tuple(part[i] for part in x) for i in range(len(x[0]))]  # noqa: E731
    as_rows = lambda x: np.asarray(m3.rows(*(jnp.asarray(p) for p in x)))  # noqa: E731
    loss, parts = m3_loss(as_rows(q), as_rows(d), as_rows(n)[:, None], hidden_size=H, vocab_size=V, scale=5.0)
    want, ce, kd = naive_m3_loss(split(q), split(d) + split(n), 5.0)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    for head in ce:
        assert float(parts[f"{head}_loss"]) == pytest.approx(ce[head], rel=1e-5), head
    for head in kd:
        assert float(parts[f"{head}_distill"]) == pytest.approx(kd[head], rel=1e-5), head
    # the id masks are InfoNCE's, the same for every head and for the distillation's candidates
    ids = np.array([7, 8, 7])  # documents 0 and 2 are one text: neither is the other's query's negative
    masked, _ = m3_loss(as_rows(q), as_rows(d), hidden_size=H, vocab_size=V, scale=5.0, positive_ids=ids)
    want, _, _ = naive_m3_loss(split(q), split(d), 5.0, lambda i, j: ids[j] == ids[i])
    assert float(masked) == pytest.approx(want, rel=1e-5)
    # the gradient where the loss is smooth: no padding token (the mean over a query's non-zero
    # tokens jumps when a zero token is nudged), every lexical weight > 0
    q, d = _texts(jax.random.key(3), 3, 3, padded=False), _texts(jax.random.key(4), 3, 5, padded=False)
    q, d = ((a, b + 0.1, c) for a, b, c in (q, d))
    # tokens jumps when a zero token is nudged), every lexical weight > 0. The distillation's teacher
    # carries no gradient (a finite difference would move it too): its term is checked with a teacher
    # slice the inputs do not touch.
    from embedjax.losses import infonce

    metric = m3.metrics(H, V)
    with jax.enable_x64(True):
        rows_q, rows_d = jnp.asarray(as_rows(q), jnp.float64), jnp.asarray(as_rows(d), jnp.float64)
        check_grads(lambda a, b: m3_loss(a, b, hidden_size=H, vocab_size=V, scale=5.0, self_distill=False)[0],
                    (rows_q, rows_d), order=1, modes=("rev",), eps=1e-6)
        with_dense = lambda rows, dense: jnp.concatenate([dense, rows[:, H:]], axis=1)  # noqa: E731
        distill = lambda a, b: infonce(with_dense(rows_q, a), with_dense(rows_d, b), scale=5.0,  # noqa: E731
                                       similarity=metric["dense"], teacher_similarity=metric["lexical"])
        check_grads(distill, (rows_q[:, :H], rows_d[:, :H]), order=1, modes=("rev",), eps=1e-6)


def test_bgem3_layout_loads_encodes_as_torch_heads_saves_and_fuses(tiny_model, small_beir, tmp_path):
    """FlagEmbedding's layout (a transformers backbone, sparse_linear.pt, colbert_linear.pt) on the tiny
    model: the three heads equal a torch computation of BGE-M3's formulas on transformers' states;
    save_m3 writes what loads back the same; the heads as retrievers fuse."""
    import shutil

    import torch
    import transformers

    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval.fusion import FusedRetrievalEvaluator
    from embedjax.eval.late_retrieval import LateRetrievalEvaluator
    from embedjax.m3_model import load_m3, save_m3

    d = tmp_path / "m3"
    shutil.copytree(tiny_model, d)
    torch.manual_seed(0)
    hidden = transformers.AutoConfig.from_pretrained(d).hidden_size
    sparse_linear, colbert_linear = torch.nn.Linear(hidden, 1), torch.nn.Linear(hidden, hidden)
    with torch.no_grad():
        sparse_linear.bias.fill_(0.3)
    torch.save(sparse_linear.state_dict(), d / "sparse_linear.pt")
    torch.save(colbert_linear.state_dict(), d / "colbert_linear.pt")
    model = load_m3(d)
    texts = ["A man plays the flute.", "flute flute", "Two dogs run on the beach in the evening."]
    ours = model.encode(texts, batch_size=2)

    tok = transformers.AutoTokenizer.from_pretrained(d)
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = transformers.AutoModel.from_pretrained(d).eval()(**batch).last_hidden_state
        dense = torch.nn.functional.normalize(h[:, 0], dim=-1)
        weights = torch.relu(sparse_linear(h)).squeeze(-1) * batch["attention_mask"]
        lexical = torch.zeros(len(texts), tok.vocab_size).scatter_reduce(1, batch["input_ids"], weights, "amax")
        lexical[:, [tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id]] = 0
        vectors = torch.nn.functional.normalize(colbert_linear(h[:, 1:]) * batch["attention_mask"][:, 1:, None], dim=-1)
    np.testing.assert_allclose(ours["dense"], dense.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours["lexical"].toarray(), lexical.numpy(), atol=1e-5)
    for i, t in enumerate(ours["tokens"]):
        n = int(batch["attention_mask"][i].sum()) - 1
        np.testing.assert_allclose(t, vectors[i, :n].numpy(), atol=1e-5)

    out = save_m3(model, tmp_path / "saved")
    assert (out / "m3_heads.safetensors").is_file()
    for name, linear in (("sparse_linear.pt", sparse_linear), ("colbert_linear.pt", colbert_linear)):
        state = torch.load(out / name, weights_only=True)  # FlagEmbedding's files, loadable into its Linear
        for key, value in linear.state_dict().items():
            np.testing.assert_allclose(state[key].numpy(), value.numpy(), atol=1e-7)
    again = load_m3(out).encode(texts)
    np.testing.assert_allclose(again["dense"], ours["dense"], atol=1e-6)
    np.testing.assert_allclose(again["lexical"].toarray(), ours["lexical"].toarray(), atol=1e-6)

    # the multi-vector view's MaxSim sums are BGE-M3's means over the query's tokens
    q, docs = model.multi_vector().encode_queries(texts[:1])[0], model.multi_vector().encode_documents(texts[1:])
    for doc, want in zip(docs, [np.mean(np.max(ours["tokens"][0] @ x.T, axis=1)) for x in ours["tokens"][1:]]):
        assert float(np.sum(np.max(q @ doc.T, axis=1))) == pytest.approx(float(want), rel=1e-5)
    data = read_beir(small_beir, "dev")
    fused = FusedRetrievalEvaluator(data, weights={"dense": 1.0, "lexical": 0.3, "multi_vector": 1.0}, depth=20,
                                    k_values=(1, 10)).score({"dense": model.dense(), "lexical": model.lexical(),
                                                             "multi_vector": model.multi_vector()})
    alone = LateRetrievalEvaluator(data, name="m", k_values=(1, 10))(model.multi_vector())
    assert fused["multi_vector/ndcg@10"] == pytest.approx(alone["m/ndcg@10"])
    assert {"sum/ndcg@10", "rrf/ndcg@10", "lexical/ndcg@10", "dense/ndcg@10"} <= set(fused)


def _batches(model, beir_dir, n=2, batch_size=8):
    from configs import base
    from embedjax.data import pipeline
    from embedjax.train import sources
    from embedjax.train.config import DataConfig

    data = DataConfig.from_config({**base.base_config().data.to_dict(), "kind": "beir", "pack_length": 0,
                                   "train": str(beir_dir), "split": "dev"})
    it = pipeline.train_pipeline(sources.train_source(data), model.tokenizer.replace(buckets=(16, 32)),
                                 global_batch_size=batch_size, seed=0, common_length=True)
    return [next(it).model_inputs() for _ in range(n)]


def _objective(model, **kwargs):
    from configs import base
    from embedjax.train.m3_objective import M3Objective

    section = {**base.base_config().objective.to_dict(), "loss": "m3", "loss_kwargs": {"scale": 5.0, **kwargs},
               "dropout": False}
    return M3Objective.from_config(section, model)


def test_m3_batch_loss_is_bgem3s_on_the_heads_outputs(tiny_model, small_beir):
    """The batch loss is the NumPy BGE-M3 loss of the heads' outputs (m3.outputs, checked against torch
    above), the batch's duplicate texts masked; GradCache (chunks of 2) gives the same loss and gradient."""
    from embedjax.m3_model import HEADS_KEY, load_m3
    from embedjax.train.m3_objective import m3_batch_loss

    model = load_m3(tiny_model, seed=1)
    [batch, _] = _batches(model, small_beir)
    objective = _objective(model)
    backbone = {k: v for k, v in model.params.items() if k != HEADS_KEY}

    def texts(side):
        d, lx, tv = m3.outputs(backbone, model.cfg, model.params[HEADS_KEY], side.ids, side.mask,
                               special_ids=model.special_ids, token_type_ids=side.types)
        return [(np.asarray(d[i], np.float64), np.asarray(lx[i], np.float64), np.asarray(tv[i], np.float64))
                for i in range(len(side.ids))]

    a_hash, b_hash = np.asarray(batch.a.hashes), np.asarray(batch.b.hashes)
    want, _, _ = naive_m3_loss(texts(batch.a), texts(batch.b), 5.0, lambda i, j: b_hash[j] in (a_hash[i], b_hash[i]))
    loss_and_grad = jax.value_and_grad(lambda p, o: m3_batch_loss(p, model.cfg, o, batch, jax.random.key(0))[0])
    loss, grads = loss_and_grad(model.params, objective)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    loss_c, grads_c = loss_and_grad(model.params, dataclasses.replace(objective, gradcache_chunk=2))
    assert float(loss_c) == pytest.approx(float(loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(grads[HEADS_KEY]["colbert"]["kernel"]).max()) > 0  # every head learns
    assert float(jnp.abs(grads[HEADS_KEY]["sparse"]["kernel"]).max()) > 0


def test_m3_steps_on_eight_devices_equal_one_device(tiny_model, small_beir):
    import functools

    import optax

    from embedjax import sharding
    from embedjax.m3_model import load_m3
    from embedjax.train.state import TrainState, state_shardings
    from embedjax.train.step import jit_train_step

    model = load_m3(tiny_model, seed=1)
    batches = _batches(model, small_beir)
    objective = _objective(model)
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
        for key in ("loss", "dense_loss", "lexical_loss", "multi_vector_loss", "ensemble_loss", "multi_vector_distill"):
            assert eight[key] == pytest.approx(one[key], rel=2e-5), key
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(runs["one"][1]), jax.tree.leaves(model.params)))
    assert moved > 1e-3
    for a, b in zip(jax.tree.leaves(runs["one"][1]), jax.tree.leaves(runs["eight"][1])):
        np.testing.assert_allclose(a, b, atol=3e-3 * moved)


def test_a_three_head_run_exports_what_it_evaluated(tiny_model, small_beir, tmp_path):
    """configs/beir_m3.py on the tiny model, 4 steps: the export (BGE-M3's layout) loads, its heads
    trained, and scores what the run reported (each head and the fusions)."""
    from configs import beir_m3
    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval.fusion import M3RetrievalEvaluator
    from embedjax.m3_model import HEADS_KEY, load_m3
    from embedjax.train.loop import train_and_evaluate

    config = beir_m3.get_config(f"beir={small_beir},split=dev,smoke=4")
    config.model = str(tiny_model)
    config.max_length = 32
    config.optim.learning_rate = 1e-3
    config.optim.warmup = 0
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["steps"] == 4
    ours = load_m3(tmp_path / "run")
    start = load_m3(tiny_model, seed=0)
    assert not np.allclose(ours.params[HEADS_KEY]["colbert"]["kernel"], start.params[HEADS_KEY]["colbert"]["kernel"])
    # the run's batch size: the same padded shapes, so near-tied scores of the tiny model tie the same way
    scored = M3RetrievalEvaluator(read_beir(small_beir, "dev"), name="dev", batch_size=config.eval_batch_size)(ours)
    for key in ("dev/dense/ndcg@10", "dev/lexical/ndcg@10", "dev/multi_vector/ndcg@10", "dev/sum/ndcg@10",
                "dev/rrf/ndcg@10"):
        assert summary["after"][key] == pytest.approx(scored[key], abs=1e-6), key
