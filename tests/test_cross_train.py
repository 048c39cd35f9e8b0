"""Cross-encoder training in the loop: candidate-group batches, the batch loss against
transformers' logits and NumPy losses, two hosts resuming after SIGKILL like one process,
8 devices == 1 device, and the export scoring in sentence-transformers' CrossEncoder as it did
in training."""

import json
import signal
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

import embedjax
from embedjax.cross_encoder import HeadSpec
from embedjax.data import pipeline
from embedjax.data.cross_batches import PairFormat, candidate_groups, collate_pairs
from embedjax.train.cross_objective import CrossObjective, check_cross_data, cross_batch_loss
from test_train import REPO, loss_curve, run_train

pytestmark = pytest.mark.fast_compile

TRIPLETS = [
    {"text_a": "what do cats eat", "text_b": "Cats eat fish and mice.", "text_n": ("Dogs bark.", "The sky is blue.")},
    {"text_a": "capital of france", "text_b": "Paris is the capital of France.",
     "text_n": ("Berlin is in Germany.", "Cats eat fish and mice.")},
    {"text_a": "how tall is everest", "text_b": "Everest is 8,849 metres high.",
     "text_n": ("The Alps are in Europe.", "Paris is the capital of France.")},
]


def test_candidate_groups_label_and_mask_every_candidate():
    records = [pipeline.as_record(r) for r in TRIPLETS]
    records[1]["relevant"] = (pipeline.text_hash("Everest is 8,849 metres high."),)  # row 2's positive: relevant to row 1
    groups = candidate_groups(records, [0, 1, 2], in_batch_negatives=2)
    texts, labels, hashes = groups[1]
    assert texts == ["Paris is the capital of France.", "Berlin is in Germany.", "Cats eat fish and mice.",
                     "Everest is 8,849 metres high.", "Cats eat fish and mice."]  # rows 2 and 0's positives follow
    assert labels == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert hashes[3] == 0 and hashes[4] == pipeline.text_hash("Cats eat fish and mice.")  # judged relevant: masked
    # a row's own positive coming back as an in-batch negative is masked too
    dup = [pipeline.as_record(r) for r in [TRIPLETS[0], {**TRIPLETS[0], "text_a": "cat food"}]]
    assert candidate_groups(dup, [0, 1], in_batch_negatives=1)[0][2][-1] == 0
    scored = [pipeline.as_record({"text_a": "a", "text_b": "b", "score": 3.5})]
    assert candidate_groups(scored, [7]) == [(["b"], [3.5], [pipeline.text_hash("b")])]
    with pytest.raises(ValueError, match="record 9 gives 2 candidates"):
        candidate_groups([records[0], pipeline.as_record({"text_a": "q", "text_b": "d", "text_n": ("n",)})], [0, 9])
    with pytest.raises(ValueError, match="needs more than 3 records"):
        candidate_groups(records, [0, 1, 2], in_batch_negatives=3)


def test_cross_data_checks_name_the_fix():
    head = HeadSpec("first_token")
    bce = CrossObjective("bce", head)
    with pytest.raises(ValueError, match="label_range"):
        check_cross_data(bce, ("text_a", "text_b", "score"), [0.0, 5.0])
    with pytest.raises(ValueError, match="hard negatives"):
        check_cross_data(CrossObjective("mnrl", head), ("text_a", "text_b"), None)
    check_cross_data(CrossObjective("mnrl", head), ("text_a", "text_b"), None, in_batch_negatives=3)
    with pytest.raises(ValueError, match="teacher scores"):
        check_cross_data(CrossObjective("margin_mse", head), ("text_a", "text_b", "text_n"), None)
    with pytest.raises(ValueError, match="bi-encoders"):
        CrossObjective.from_config({**_objective_section("bce"), "matryoshka_dims": (8,)}, head)
    with pytest.raises(ValueError, match="not a cross-encoder loss"):
        CrossObjective.from_config(_objective_section("infonce"), head)


def _objective_section(loss, **kwargs):
    sys.path.insert(0, str(REPO))
    from configs import base

    section = base.base_config().objective.to_dict()
    return {**section, "loss": loss, "loss_kwargs": kwargs}


def _torch_logits(model_dir, records, in_batch_negatives=0):
    """transformers' logits of every (query, candidate) pair, grouped as the batch groups them."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    groups = candidate_groups([pipeline.as_record(r) for r in records], list(range(len(records))), in_batch_negatives)
    out = []
    for record, (texts, _, _) in zip(records, groups):
        enc = tok([record["text_a"]] * len(texts), texts, padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out.append(model(**enc).logits[:, 0].double().numpy())
    return np.stack(out)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("packed", [False, True])
def test_cross_batch_loss_matches_transformers_logits_and_numpy_losses(tiny_cross_encoder, packed):
    model = embedjax.load_cross_encoder(tiny_cross_encoder)
    logits = _torch_logits(tiny_cross_encoder, TRIPLETS, in_batch_negatives=1)  # (3, 1 + 2 + 1)
    labels = np.array([[1.0, 0, 0, 0]] * 3)
    packing = pipeline.Packing(length=64) if packed else None
    batch = collate_pairs(list(enumerate(TRIPLETS)), model.tokenizer, 3, packing=packing,
                          pair_format=PairFormat(in_batch_negatives=1)).model_inputs()
    mask = np.asarray(batch.a.hashes) != 0
    assert mask.all()  # no in-batch negative here is a positive of its row
    sigmoid = 1 / (1 + np.exp(-logits))
    expected = {
        "bce": -np.mean(labels * np.log(sigmoid) + (1 - labels) * np.log(1 - sigmoid)),
        "mnrl": -np.mean(_log_softmax(10 * sigmoid)[:, 0]),  # sentence-transformers' CrossEncoder MNRL
        "listnet": -np.mean(np.sum(np.exp(_log_softmax(labels)) * _log_softmax(logits), -1)),
    }
    kwargs = {"mnrl": {"activation": "sigmoid", "scale": 10.0}}
    for loss, want in expected.items():
        objective = CrossObjective(loss, model.head, loss_kwargs=tuple(sorted(kwargs.get(loss, {}).items())),
                                   dropout=False)
        got = cross_batch_loss(model.params, model.cfg, objective, batch, jax.random.key(0))
        np.testing.assert_allclose(float(got), want, rtol=2e-5, err_msg=loss)


def test_teacher_and_class_losses_read_their_fields(tiny_cross_encoder, minilm_path, tmp_path):
    from conftest import write_tiny_cross_encoder

    model = embedjax.load_cross_encoder(tiny_cross_encoder)
    distill = [{**r, "teacher": (3.0, 1.0, -2.0)} for r in TRIPLETS]
    batch = collate_pairs(list(enumerate(distill)), model.tokenizer, 3).model_inputs()
    s = _torch_logits(tiny_cross_encoder, TRIPLETS)
    t = np.array([3.0, 1.0, -2.0])
    want = np.mean(((s[:, :1] - s[:, 1:]) - (t[:1] - t[1:])) ** 2)
    got = cross_batch_loss(model.params, model.cfg, CrossObjective("margin_mse", model.head, dropout=False), batch,
                           jax.random.key(0))
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    three = write_tiny_cross_encoder(tmp_path / "three", minilm_path, num_labels=3)
    model3 = embedjax.load_cross_encoder(three)
    nli = [{"text_a": r["text_a"], "text_b": r["text_b"], "score": float(i)} for i, r in enumerate(TRIPLETS)]
    batch = collate_pairs(list(enumerate(nli)), model3.tokenizer, 3).model_inputs()
    tok = transformers.AutoTokenizer.from_pretrained(three)
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(three).eval()
    with torch.no_grad():
        z = torch_model(**tok([r["text_a"] for r in nli], [r["text_b"] for r in nli], padding=True,
                              return_tensors="pt")).logits.double().numpy()
    want = -np.mean(_log_softmax(z)[np.arange(3), [0, 1, 2]])
    got = cross_batch_loss(model3.params, model3.cfg, CrossObjective("cross_entropy", model3.head, dropout=False),
                           batch, jax.random.key(0))
    np.testing.assert_allclose(float(got), want, rtol=2e-5)


def test_reranking_a_fixed_first_stage_retrieves_once(tiny_model, tiny_cross_encoder, small_beir, monkeypatch):
    from embedjax import model as model_lib
    from embedjax.eval import cross, suite

    loads = []
    real = model_lib.load_pretrained
    monkeypatch.setattr(model_lib, "load_pretrained", lambda *a, **k: loads.append(a) or real(*a, **k))
    (evaluator,) = suite.for_training({"beir": {"type": "rerank", "path": str(small_beir), "split": "dev",
                                                "first_stage": str(tiny_model), "top_k": 5}},
                                      batch_size=32, enc_cfg=None, cross_encoder=True)
    ce = embedjax.load_cross_encoder(tiny_cross_encoder)
    first = dict(evaluator.run(ce))
    again = dict(evaluator.run(ce))
    assert len(loads) == 1 and first == again
    assert {"beir/ndcg@10", "beir/rerank@5/ndcg@10", "beir/rerank@5/recall@100"} <= set(first)
    # the same figures as the two-stage evaluator given the bi-encoder itself
    stage = cross.RerankEvaluator(evaluator.rerank.first_stage, top_k=5)
    assert stage.score(real(tiny_model), ce) == {k.removeprefix("beir/"): v for k, v in first.items()}
    with pytest.raises(ValueError, match="cannot evaluate a cross-encoder run"):
        suite.for_training({"dev": {"type": "sts", "path": "x", "format": "stsb"}}, batch_size=8, enc_cfg=None,
                           cross_encoder=True)


# ---------------------------------------------------------------------------- the loop, end to end


@pytest.fixture(scope="module")
def cross_overrides(tiny_cross_encoder, small_dev):
    """configs/stsb_cross_encoder.py:smoke on the tiny cross-encoder: 8 steps of 16, a loss every
    step, dev every 4 steps, a checkpoint every 2 (all kept). Padded pairs: every host count and
    device count then lays a batch out alike, so dropout draws the same masks (packed rows follow
    each host's packing; packed == padded is test_cross_batch_loss_matches_transformers_logits_and_numpy_losses)."""
    return {"model": tiny_cross_encoder, "evals.dev.path": small_dev, "evals.sick_trial.path": small_dev,
            "evals.sick_trial.format": "stsb", "num_steps": 8, "batch_size": 16, "log_every": 1, "eval_every": 4,
            "checkpoint.every": 2, "checkpoint.keep": 10, "optim.learning_rate": 1e-3, "optim.warmup": 0,
            "data.pack_length": 0}


@pytest.fixture(scope="module")
def two_host_run(cross_overrides, tmp_path_factory):
    """configs/stsb_cross_encoder.py:smoke as 2 processes x 2 devices, both SIGKILLed after step 5
    and resumed by the same command: the workdir and the killed launch's loss curve."""
    from test_multihost import launch

    workdir, config = tmp_path_factory.mktemp("cross") / "two", "stsb_cross_encoder.py:smoke"
    killed = launch(workdir, config, cross_overrides, processes=2, devices=4, kill_at=5)
    assert [rc for rc, _ in killed] == [-signal.SIGKILL] * 2, [err[-3000:] for _, err in killed]
    before_kill = loss_curve(workdir)
    for rc, err in launch(workdir, config, cross_overrides, processes=2, devices=4):
        assert rc == 0, err[-4000:]
    return workdir, before_kill


def test_cross_encoder_on_two_hosts_resumes_after_sigkill_exactly(two_host_run):
    """The resumed launch restarts from the step-4 checkpoint and redoes step 5: the loss the killed
    launch logged for it, bit for bit (the same params, optimizer state, batch and dropout draw).
    That 8 devices train like 1 is test_cross_encoder_steps_on_eight_devices_equal_one_device (the
    run's own jitted step); that 2 hosts run the loop like 1 process is test_multihost's (the same
    loop, pipeline and host agreement; only the step's objective differs)."""
    workdir, before_kill = two_host_run
    resumed = loss_curve(workdir)
    assert sorted(before_kill) == list(range(1, 6)) and sorted(resumed) == list(range(1, 9))
    assert resumed[5] == before_kill[5]
    assert len({round(v, 6) for v in resumed.values()}) == 8  # it trains: every step's loss differs
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps"] == 8, summary


def test_cross_encoder_steps_on_eight_devices_equal_one_device(tiny_cross_encoder):
    """The run's compiled step (jit_train_step: state and batch sharded) on an 8-device mesh, data x
    fsdp with the fsdp rules, and on a 1-device mesh: the same losses and params, step after step,
    with dropout on and BEIR-style groups (a mined negative and in-batch ones, padded)."""
    import functools

    from embedjax import sharding
    from embedjax.train import optim
    from embedjax.train.state import TrainState, state_shardings
    from embedjax.train.step import jit_train_step

    model = embedjax.load_cross_encoder(tiny_cross_encoder)
    records = [{"text_a": f"{r['text_a']} {i}", "text_b": r["text_b"], "text_n": r["text_n"][:1]}
               for i in range(6) for r in TRIPLETS][:16]
    batches = [collate_pairs(list(enumerate(records[i:] + records[:i])), model.tokenizer, 16,
                             pair_format=PairFormat(in_batch_negatives=2)).model_inputs() for i in range(3)]
    objective = CrossObjective("mnrl", model.head, loss_kwargs=(("activation", "sigmoid"), ("scale", 10.0)))
    tx, _ = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, warmup=0, decay="constant",
                                                   weight_decay=0.01, clip_norm=1.0, accumulate=1, b1=0.9, b2=0.999,
                                                   eps=1e-6), 10)
    create = functools.partial(TrainState.create, tx=tx, seed=0)
    runs = {}
    for name, mesh, rules in (("one", sharding.make_mesh(devices=jax.devices()[:1]), "replicated"),
                              ("eight", sharding.make_mesh(data=2, fsdp=4), "fsdp")):
        shards, _ = state_shardings(jax.eval_shape(create, model.params), {}, mesh,
                                    sharding.rules_for(model.cfg, rules))
        state = jax.jit(create, out_shardings=shards)(model.params)
        step = jit_train_step(model.cfg, objective, tx, shards, None, mesh)
        losses = []
        for batch in batches:
            state, metrics = step(state, sharding.to_global(batch, mesh), None, None)
            losses.append(float(metrics["loss"]))
        runs[name] = (losses, jax.device_get(state.params))
    np.testing.assert_allclose(runs["eight"][0], runs["one"][0], rtol=2e-5)
    assert len(set(runs["one"][0])) == 3
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(runs["one"][1]), jax.tree.leaves(runs["eight"][1])):
        if jax.tree_util.keystr(path).endswith("['key']['bias']"):
            continue  # softmax ignores a key bias: its gradient is rounding noise, which Adam scales up to lr
        np.testing.assert_allclose(a, b, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def test_cross_encoder_export_scores_the_same_in_sentence_transformers(two_host_run, small_dev):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    from embedjax.data import read_stsb
    from embedjax.eval.cross import CrossEncoderSTSEvaluator

    workdir, _ = two_host_run
    summary = json.loads((workdir / "summary.json").read_text())
    ours = embedjax.load_cross_encoder(workdir)
    pairs = read_stsb(small_dev)
    texts = [(p.text_a, p.text_b) for p in pairs]
    theirs = STCrossEncoder(str(workdir)).predict(texts, batch_size=64)
    np.testing.assert_allclose(ours.predict(texts), theirs, atol=1e-5)
    # what the loop reported for the export is what the export scores
    assert summary["after"]["dev/spearman"] == pytest.approx(dict(CrossEncoderSTSEvaluator(pairs, name="dev").run(ours))
                                                             ["dev/spearman"], abs=1e-6)
    assert summary["best_step"] in (0, 4, 8) and set(summary["after"]) >= {"dev/spearman", "sick_trial/pearson"}


def test_lora_decoder_reranker_trains_its_adapters_and_head_on_beir_groups(small_beir, tmp_path):
    """A decoder reranker (last-token head, pair template) with LoRA, on BEIR records with in-batch
    negatives: one real train step moves the adapters and the head, and nothing else trains."""
    import functools

    from embedjax import tiny
    from embedjax.data.retrieval_training import read_beir_training
    from embedjax.train import encoders, optim
    from embedjax.train.config import LoraConfig
    from embedjax.train.state import TrainState
    from embedjax.train.step import train_step

    records = read_beir_training(small_beir, "dev")
    texts = [records[i]["text_a"] for i in range(len(records))] + [records[i]["text_b"] for i in range(len(records))]
    base = tiny.write_random_checkpoint(tmp_path / "qwen3", "qwen3", texts=texts)
    template = "Query: {first}\nDocument: {second}"
    model = embedjax.load_cross_encoder(base, template=template)
    assert model.head.kind == "last_token"
    trainable, frozen, model = encoders.trainable_params(LoraConfig(rank=4), model)
    trained_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)}
    assert any("head" in p for p in trained_paths) and all("head" in p or "lora" in p for p in trained_paths)
    it = pipeline.train_pipeline(records, model.tokenizer, global_batch_size=8, seed=0, packing=pipeline.Packing(64),
                                 pairs=PairFormat(template=template, in_batch_negatives=3))
    batch = next(it).model_inputs()
    assert batch.a.text_index.shape == (8, 4) and batch.labels[:, 0].tolist() == [1.0] * 8
    objective = CrossObjective("mnrl", model.head, loss_kwargs=(("activation", "sigmoid"), ("scale", 10.0)))
    tx, _ = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2, warmup=0, decay="constant", weight_decay=0.0,
                                                   clip_norm=1.0, accumulate=1, b1=0.9, b2=0.999, eps=1e-6), 10)
    step = jax.jit(functools.partial(train_step, enc_cfg=model.cfg, objective=objective, tx=tx))
    state = TrainState.create(trainable, tx, 0)
    new_state, metrics = step(state, batch, frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = {jax.tree_util.keystr(p): float(np.abs(np.asarray(a) - np.asarray(b)).max()) for (p, a), b in
             zip(jax.tree_util.tree_leaves_with_path(new_state.params), jax.tree.leaves(state.params))}
    # the head and every adapter's B move (A gets no gradient while B is still 0, as LoRA starts)
    assert all(v > 0 for p, v in moved.items() if "head" in p or "lora_b" in p), moved


def test_plan_sizes_a_decoder_reranker_step_by_its_candidate_groups():
    """plan.step_memory on a cross-encoder config: the run's own step (head, LoRA, sharded), from a
    config.json alone; a group of 8 pairs per query costs more than one pair."""
    from embedjax.train import plan

    sys.path.insert(0, str(REPO))
    from configs import beir_reranker

    qwen = {"model_type": "qwen3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 512, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
    sizes = {}
    for in_batch in (0, 7):
        c = beir_reranker.get_config(f"in_batch={in_batch},negatives=0")
        c.data.mixture = {}  # one source (plan reads the first)
        c.lora.rank, c.max_length, c.mesh.data, c.mesh.fsdp = 4, 64, 4, 2
        c.sharding_rules = "fsdp"
        sizes[in_batch] = plan.step_memory(c, qwen).temporaries
    assert 0 < sizes[0] < sizes[7]


def test_eval_cli_scores_a_cross_encoder(tiny_cross_encoder, small_dev, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import eval as eval_cli

    from embedjax.data import read_stsb
    from embedjax.eval.cross import CrossEncoderSTSEvaluator

    got = eval_cli.main([str(tiny_cross_encoder), "--task", f"cross_sts:{small_dev} name=dev"])
    want = dict(CrossEncoderSTSEvaluator(read_stsb(small_dev), name="dev").run(
        embedjax.load_cross_encoder(tiny_cross_encoder)))
    assert got == pytest.approx(want, abs=1e-4) and "dev/spearman" in capsys.readouterr().out  # batch 128 vs 64
    with pytest.raises(ValueError, match="separate runs"):
        eval_cli.main([str(tiny_cross_encoder), "--task", f"cross_sts:{small_dev}", "--task", f"sts:{small_dev}"])


def test_mnrl_never_takes_a_second_positive_for_a_negative(tiny_cross_encoder):
    model = embedjax.load_cross_encoder(tiny_cross_encoder)
    two = [{**r, "text_b": (r["text_b"], r["text_n"][1])} for r in TRIPLETS]  # m = 2 positive slots
    two = [{k: v for k, v in r.items() if k != "text_n"} | {"text_n": (r["text_n"][0],)} for r in two]
    batch = collate_pairs(list(enumerate(two)), model.tokenizer, 3).model_inputs()
    s = 1 / (1 + np.exp(-_torch_logits(tiny_cross_encoder, two)))  # columns: positive, positive, negative
    want = -np.mean(_log_softmax(10 * s[:, [0, 2]])[:, 0])
    objective = CrossObjective("mnrl", model.head, loss_kwargs=(("activation", "sigmoid"), ("scale", 10.0)),
                               dropout=False)
    np.testing.assert_allclose(float(cross_batch_loss(model.params, model.cfg, objective, batch, jax.random.key(0))),
                               want, rtol=2e-5)
