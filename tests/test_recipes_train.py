"""The research recipes inside training: EMA in the step, auxiliary correlation losses and
teacher distillation in the objective, multi-task mixtures in the loop (one source per step, as
scheduled, each with its own loss; exact resume after SIGKILL), EMA selection, mean selection keys."""

import functools
import json
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax.encoders import bert
from embedjax.data.batch import Batch, Side
from embedjax.train import config as train_config
from embedjax.train import optim, selection, tasks
from embedjax.train.objective import Objective, batch_loss
from embedjax.train.state import TrainState
from embedjax.train.step import train_step

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs.base import base_config  # noqa: E402
from test_train import loss_curve, run_train  # noqa: E402

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

CFG = bert.BertConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=16)


def scored_batch(seed=0, b=8, t=6):
    rng = np.random.default_rng(seed)
    return Batch(a=Side(ids=rng.integers(1, 60, (b, t)), mask=np.ones((b, t), np.int32)),
                 b=Side(ids=rng.integers(1, 60, (b, t)), mask=np.ones((b, t), np.int32)),
                 labels=rng.uniform(0, 5, b).astype(np.float32))


def objective(teacher=None, **kw):
    declared = base_config().objective.to_dict()
    return Objective.from_config({**declared, "dropout": False, "loss_kwargs": {"label_range": (0.0, 5.0)}, **kw},
                                 "mean", teacher=teacher)


def test_ema_update_follows_the_numpy_average_step_by_step():
    params = bert.init(CFG, jax.random.key(0))
    tx, _ = optim.make_optimizer({**base_config().optim.to_dict(), "warmup": 0, "learning_rate": 1e-2}, 10)
    step = jax.jit(functools.partial(train_step, enc_cfg=CFG, objective=objective(), tx=tx, ema_decay=0.75))
    state = TrainState.create(params, tx, seed=0, ema=True)
    expected = jax.tree.map(np.asarray, params)
    for i in range(3):
        state, _ = step(state, scored_batch(i))
        expected = jax.tree.map(lambda e, p: 0.75 * e + 0.25 * np.asarray(p), expected, state.params)
    for path, got in jax.tree_util.tree_leaves_with_path(state.ema):
        want = functools.reduce(lambda t, k: t[k.key], path, expected)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    assert not np.allclose(np.asarray(state.ema["layers"]["attention"]["query"]["kernel"]),
                           np.asarray(state.params["layers"]["attention"]["query"]["kernel"]))
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\)"):
        optim.ema_update(params, params, 1.0)


@pytest.mark.parametrize("dims", [(), (32, 16)])
def test_auxiliary_losses_add_to_the_main_loss_at_every_width(dims):
    """angle + 0.5 pearson + 2 rank_consistency (inside Matryoshka) == the three objectives' losses summed."""
    params = bert.init(CFG, jax.random.key(1))
    batch, key = scored_batch(3), jax.random.key(0)
    loss = lambda **kw: float(batch_loss(params, CFG, objective(matryoshka_dims=dims, **kw), batch, key))
    combined = loss(aux_losses={"pearson": 0.5, "rank_consistency": {"weight": 2.0, "scale": 10.0}})
    parts = (loss() + 0.5 * loss(loss="pearson", loss_kwargs={})
             + 2.0 * loss(loss="rank_consistency", loss_kwargs={"scale": 10.0}))
    np.testing.assert_allclose(combined, parts, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown objective.aux_losses entry 'infonce'"):
        objective(aux_losses={"infonce": 1.0})


def test_distillation_from_a_teacher_encoder():
    """Teacher == student: the cosine distillation term is 0; a perturbed teacher adds exactly
    weight * mean(1 - cos) over both sides (computed here from the two models' pooled outputs),
    and no gradient reaches the teacher. With objective.layers every layer is taught."""
    from embedjax.embed import embed

    class Teacher:  # what Objective.from_config reads of a loaded teacher Encoder
        cfg, pooling = CFG, "mean"

    params = bert.init(CFG, jax.random.key(2))
    other = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(9), x.shape), params)
    batch, key = scored_batch(5), jax.random.key(0)
    distill = dict(distill={"teacher": "a teacher", "loss": "cosine", "weight": 0.7})
    plain = float(batch_loss(params, CFG, objective(), batch, key))
    same = float(batch_loss(params, CFG, objective(Teacher, **distill), batch, key, teacher=params))
    np.testing.assert_allclose(same, plain, rtol=1e-6, atol=1e-6)

    def one_minus_cos(p_student, p_teacher, side):
        zs, zt = (np.asarray(embed(p, CFG, getattr(batch, side).ids, getattr(batch, side).mask, pooling="mean"))
                  for p in (p_student, p_teacher))
        return np.mean(1 - np.sum(zs * zt, -1) / np.linalg.norm(zs, axis=-1) / np.linalg.norm(zt, axis=-1))

    taught = float(batch_loss(params, CFG, objective(Teacher, **distill), batch, key, teacher=other))
    expected = plain + 0.7 * (one_minus_cos(params, other, "a") + one_minus_cos(params, other, "b")) / 2
    np.testing.assert_allclose(taught, expected, rtol=1e-5)
    grads = jax.grad(lambda t: batch_loss(params, CFG, objective(Teacher, **distill), batch, key, teacher=t))(other)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
    layered = objective(Teacher, layers="adaptive", **distill)
    value = batch_loss(params, CFG, layered, batch, key, teacher=params)
    assert np.isfinite(float(value))
    with pytest.raises(ValueError, match="pass the loaded teacher encoder"):
        objective(None, **distill)


def test_mixture_specs_are_checked():
    c = base_config()
    c.data.mixture = {"a": {"kind": "stsb", "weight": 2.0, "objective": {"loss": "cosent"}}, "b": {"kind": "sick"}}
    specs = train_config.source_sections(c.data, c.objective)
    assert specs["a"][0]["kind"] == "stsb" and specs["a"][1]["loss"] == "cosent" and specs["a"][2] == 2.0
    assert specs["b"][1]["loss"] == c.objective.loss and specs["b"][0]["train"] == c.data.train
    c.data.mixture = {"a": {"kind": "stsb", "trian": "x"}}
    with pytest.raises(ValueError, match=r"data.mixture.a: unknown keys \['trian'\]"):
        train_config.source_sections(c.data, c.objective)
    c.data.mixture = {"a": {"objective": {"los": "x"}}}
    with pytest.raises(ValueError, match=r"data.mixture.a.objective: unknown keys \['los'\]"):
        train_config.source_sections(c.data, c.objective)
    c.data.mixture = {"a": {"weight": 0.0}}
    with pytest.raises(ValueError, match="weight must be > 0"):
        train_config.source_sections(c.data, c.objective)


def test_weighted_selection_key():
    metrics = {"ir/ndcg@10": 0.6, "sts/cosine_spearman": 0.8}
    key = "0.25*ir/ndcg@10 + 0.75 * sts/cosine_spearman"
    assert selection.add_select_metric(key, metrics)[key] == pytest.approx(0.25 * 0.6 + 0.75 * 0.8)
    assert selection.parse_select_metric("a+b+c") == [(1 / 3, "a"), (1 / 3, "b"), (1 / 3, "c")]
    for bad, message in (("0.5*a+b", "weight every term"), ("x*a", "finite weight"), ("a+", "expected a key"),
                         ("inf*a", "finite weight")):
        with pytest.raises(ValueError, match=message):
            selection.parse_select_metric(bad)
    with pytest.raises(ValueError, match="select_metric 'ir/ndcg@5' is not among"):
        selection.add_select_metric("0.5*ir/ndcg@5 + 0.5*sts/cosine_spearman", metrics)
    c = base_config()
    c.select_metric = "0.5*dev/cosine_spearman+dev/cosine_pearson"
    with pytest.raises(ValueError, match="weight every term"):  # refused when the config is read
        train_config.TrainConfig.from_config(c)


def test_mean_selection_key_and_ema_choice():
    metrics = selection.add_select_metric("x/s+y/s", {"x/s": 80.0, "y/s": 70.0})
    assert metrics["x/s+y/s"] == 75.0
    with pytest.raises(ValueError, match="select_metric 'z/s' is not among"):
        selection.add_select_metric("x/s+z/s", {"x/s": 1.0})
    best = selection.Selection("m", "best", ema=True)
    logged, chosen, ranked = best.choose({"m": 1.0}, {"m": 2.0}, "raw", "ema")
    assert chosen == "ema" and ranked == {"m": 2.0, "selected_ema": 1.0} and logged["ema/m"] == 2.0
    assert selection.Selection("m", "raw", ema=True).choose({"m": 1.0}, {"m": 2.0}, "raw", "ema")[1] == "raw"
    assert selection.Selection("m", "ema", ema=True).choose({"m": 3.0}, {"m": 2.0}, "raw", "ema")[1] == "ema"
    with pytest.raises(ValueError, match="optim.ema_select"):
        selection.Selection("m", "newest")


# ---------------------------------------------------------------------------- the loop, end to end


@pytest.fixture(scope="module")
def mixture_overrides(tiny_model, small_dev, sick_dir, tmp_path_factory):
    small_sick = tmp_path_factory.mktemp("sick") / "trial.txt"
    small_sick.write_text("\n".join((sick_dir / "SICK_trial.txt").read_text().splitlines()[:150]) + "\n")
    return {"model": tiny_model, "evals.dev.path": small_dev, "evals.sick_trial.path": small_sick, "num_steps": 8,
            "batch_size": 16, "log_every": 1, "eval_every": 4, "checkpoint.every": 2, "checkpoint.keep": 10,
            "optim.learning_rate": 1e-3, "optim.warmup": 0, "optim.ema": 0.5, "optim.ema_select": "ema",
            "objective.distill.teacher": tiny_model, "objective.distill.weight": 0.5}


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory, mixture_overrides) -> Path:
    workdir = tmp_path_factory.mktemp("mixture")
    run_train(workdir, mixture_overrides, config="stsb_sick.py:smoke,pearson=1.0")
    return workdir


def per_step_sources(workdir: Path) -> dict[int, str]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        found = [k.split("/", 1)[1] for k in rec if k.startswith("loss/")]
        if found:
            assert len(found) == 1, rec  # log_every=1: one step, one source
            out[rec["step"]] = found[0]
    return out


def test_mixture_trains_one_scheduled_source_per_step(mixture_run):
    from embedjax.data.mixture import schedule

    sources = per_step_sources(mixture_run)
    names, weights = ["sick", "stsb"], [4500.0, 5749.0]  # configs/stsb_sick.py, sorted by name
    assert sources == {s: schedule(names, weights, "sampled", 0, s - 1) for s in range(1, 9)}
    assert set(sources.values()) == {"sick", "stsb"}  # both sources trained in 8 steps (seed 0)
    summary = json.loads((mixture_run / "summary.json").read_text())
    assert summary["best_at_selection"]["selected_ema"] == 1.0  # ema_select="ema": the average competes
    rows = [json.loads(x) for x in (mixture_run / "metrics.jsonl").read_text().splitlines()]
    best = next(r for r in rows if r["step"] == summary["best_step"] and "ema/dev/cosine_spearman" in r) \
        if summary["best_step"] else rows[0]
    key = "ema/dev/cosine_spearman" if summary["best_step"] else "dev/cosine_spearman"
    # the exported model is the selected EMA: it scores what the EMA scored at that step
    np.testing.assert_allclose(summary["after"]["dev/cosine_spearman"], best[key], atol=1e-3)
    assert "dev/cosine_spearman+sick_trial/cosine_spearman" in summary["after"]


def test_initial_teacher_is_the_runs_own_starting_model(mixture_run, mixture_overrides, tmp_path):
    """objective.distill.teacher="initial" (configs/stsb_anchored.py's anchor) distils towards the
    run's own starting model: loss for loss the run that names that checkpoint as its teacher."""
    workdir = tmp_path / "initial"
    run_train(workdir, {**mixture_overrides, "objective.distill.teacher": "initial"},
              config="stsb_sick.py:smoke,pearson=1.0")
    initial, named = loss_curve(workdir), loss_curve(mixture_run)
    assert sorted(initial) == list(range(1, 9))
    np.testing.assert_allclose([initial[s] for s in sorted(initial)], [named[s] for s in sorted(initial)], rtol=1e-6)


@pytest.mark.parametrize("variant", ["", "kl", "infonce"])
def test_mined_negatives_train_with_distillation_losses(variant, tiny_model, small_dev, tmp_path):
    """scripts/mine.py's records (k negatives + teacher scores) -> configs/mined_distill.py's data
    and loss -> a real train step: finite loss, params move; the batch carries (B, k, T) negatives
    and (B, 1 + k) teacher scores."""
    import importlib

    import embedjax
    from embedjax import mine
    from embedjax.data import pipeline, read_stsb
    from embedjax.train import sources

    enc = embedjax.load_pretrained(tiny_model)
    pairs = [p for p in read_stsb(small_dev)[:60]]
    records = mine.mine_hard_negatives(enc, [p.text_a for p in pairs], [p.text_b for p in pairs], num_negatives=2,
                                       rank_window=(0, 20), seed=0, show_progress=False)
    path = tmp_path / "mined.jsonl"
    mine.write_jsonl(records, path)
    c = importlib.import_module("configs.mined_distill").get_config(variant or None)
    c.data.train = str(path)
    obj = Objective.from_config(c.objective, enc.pooling)
    data = train_config.DataConfig.from_config(c.data)
    source = sources.train_source(data)
    from embedjax.train.loss_specs import check_objective_data

    check_objective_data(obj, pipeline.fields_of(source), sources.scores_of(source))
    it = pipeline.train_pipeline(source, enc.tokenizer, global_batch_size=8, seed=0, common_length=True,
                                 packing=tasks.packing_for(data, obj))
    batch = next(it).model_inputs()
    assert batch.n.text_index.shape == (8, 2)
    assert (batch.teacher is not None) == (variant != "infonce")
    assert (batch.teacher if batch.teacher is not None else np.zeros((8, 3))).shape == (8, 3)
    tx, _ = optim.make_optimizer({**c.optim.to_dict(), "warmup": 0}, 10)
    step = jax.jit(functools.partial(train_step, enc_cfg=enc.cfg, objective=obj, tx=tx))
    state = TrainState.create(enc.params, tx, 0)
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_mixture_on_two_hosts_killed_and_resumed_trains_like_one_host(mixture_run, mixture_overrides, tmp_path):
    """2 processes x 2 devices, SIGKILLed after step 5 and resumed by the same command: every step
    trains the same source (each source's data position restored on both hosts) and the loss curve
    (teacher and EMA included) and the exported model equal the 1-process, 8-device run's."""
    import embedjax
    from test_multihost import launch

    config = "stsb_sick.py:smoke,pearson=1.0"
    killed = launch(tmp_path / "two", config, mixture_overrides, processes=2, devices=4, kill_at=5)
    assert [rc for rc, _ in killed] == [-signal.SIGKILL] * 2, [err[-3000:] for _, err in killed]
    for rc, err in launch(tmp_path / "two", config, mixture_overrides, processes=2, devices=4):
        assert rc == 0, err[-4000:]
    assert per_step_sources(tmp_path / "two") == per_step_sources(mixture_run)
    ref, got = loss_curve(mixture_run), loss_curve(tmp_path / "two")
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)
    texts = ["A man is playing a flute.", "Two dogs run on the beach."]
    np.testing.assert_allclose(embedjax.load_pretrained(tmp_path / "two").encode(texts),
                               embedjax.load_pretrained(mixture_run).encode(texts), atol=1e-5)
