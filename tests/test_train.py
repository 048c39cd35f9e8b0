"""The training loop end to end on a tiny checkpoint: exact resume after SIGKILL, sharded ==
unsharded, NaN guard, kill during save, export loadable by sentence-transformers."""

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import embedjax
from embedjax.encoders import bert
from embedjax.data.batch import Batch, Side
from embedjax.train import loop, metrics, optim, selection, tasks, workdir as workdirs
from embedjax.train import step as step_module
from embedjax.train.config import DataConfig
from conftest import subprocess_xla_flags  # tests/ is on sys.path

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

REPO = Path(__file__).resolve().parents[1]


def config_with(overrides: dict):
    """configs/stsb_angle.py:smoke with ``overrides`` (dotted keys), as ``--config.key=value`` would."""
    sys.path.insert(0, str(REPO))
    from configs import stsb_angle

    c = stsb_angle.get_config("smoke")
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = str(value) if isinstance(value, Path) else value
    return c


def run_train(workdir: Path, config_overrides: dict, devices: int = 8, check: bool = True, kill_at: int = 0,
              extra_args=(), config: str = "stsb_angle.py:smoke"):
    """scripts/train.py in a fresh process with ``devices`` fake CPU devices (with ``kill_at``:
    tests/train_with_kill.py, the same script killing itself after that step)."""
    args = [f"--config.{k}={v}" for k, v in config_overrides.items()]
    env = {**os.environ, "XLA_FLAGS": subprocess_xla_flags(devices), "JAX_PLATFORMS": "cpu",
           "EMBEDJAX_KILL_AT_STEP": str(kill_at)}
    script = REPO / "tests" / "train_with_kill.py" if kill_at else REPO / "scripts" / "train.py"
    proc = subprocess.run([sys.executable, str(script), "--config",
                           str(REPO / "configs" / config), "--workdir", str(workdir), *args,
                           *extra_args], env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def loss_curve(workdir: Path) -> dict[int, float]:
    """step -> loss; a resumed run rewrites the steps after its checkpoint: the last line wins."""
    curve = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            curve[rec["step"]] = rec["loss"]
    return curve


def test_tensorboard_scalars_are_written_without_importing_torch(tmp_path):
    """tensorboardX imports torch when it is installed (it is, for the tests): the run's writer
    must not, in a fresh process where nothing else has."""
    code = textwrap.dedent(f"""
        import sys
        from etils import epath
        from embedjax.train.metrics import MetricsWriter
        writer = MetricsWriter(epath.Path({str(tmp_path)!r}))
        writer.write(1, {{"loss": 0.5}})
        writer.close()
        assert writer.tb is not None and "torch" not in sys.modules, sorted(sys.modules)[:5]
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "tensorboard").iterdir()) and "loss" in (tmp_path / "metrics.jsonl").read_text()


def final_params(workdir: Path, step: int):
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, restored["state"]["params"])


@pytest.fixture(scope="module")
def tiny_overrides(tiny_train_overrides):
    return dict(tiny_train_overrides)


@pytest.fixture(scope="module")
def straight_run(tiny_straight_run) -> Path:
    """8 devices, uninterrupted (conftest: shared with test_multihost, which runs the same command)."""
    return tiny_straight_run


def test_resume_after_sigkill_is_bitwise_exact(straight_run, tiny_overrides, tmp_path):
    workdir = tmp_path / "killed"
    killed = run_train(workdir, tiny_overrides, check=False, kill_at=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        assert mngr.latest_step() in (2, 4)  # the kill landed before the end; some saves are on disk
    run_train(workdir, tiny_overrides)  # resumes from the newest complete checkpoint
    straight, resumed = loss_curve(straight_run), loss_curve(workdir)
    assert sorted(straight) == sorted(resumed) == list(range(1, 9))
    assert straight == resumed  # same XLA program, same restored bits, same data position: bitwise equal
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(final_params(straight_run, 8)),
                            jax.tree.leaves(final_params(workdir, 8))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_eight_devices_and_fsdp_give_the_one_device_loss_curve(straight_run, tiny_overrides, tmp_path):
    one = tmp_path / "one"
    run_train(one, tiny_overrides, devices=1)
    fsdp = tmp_path / "fsdp"
    run_train(fsdp, {**tiny_overrides, "mesh.data": 2, "mesh.fsdp": 4, "sharding_rules": "fsdp"})
    ref = loss_curve(one)
    for other in (straight_run, fsdp):
        curve = loss_curve(other)
        assert sorted(curve) == sorted(ref)
        np.testing.assert_allclose([curve[s] for s in sorted(curve)], [ref[s] for s in sorted(ref)], rtol=2e-5)
    assert len(set(ref.values())) > 4  # the curve moves: a constant would compare equal trivially


def test_run_outputs_and_export_load_in_sentence_transformers(straight_run, small_dev):
    from sentence_transformers import SentenceTransformer

    summary = json.loads((straight_run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["best_step"] in (0, 4, 8)
    evals = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if "dev/cosine_spearman" in e] == [0, 4, 8]
    best = max((e for e in evals if "dev/cosine_spearman" in e), key=lambda e: e["dev/cosine_spearman"])
    assert summary["best_step"] == best["step"]
    assert abs(summary["after"]["dev/cosine_spearman"] - best["dev/cosine_spearman"]) < 1e-6
    assert {"loss", "lr", "grad_norm", "param_norm", "examples_per_s"} <= set(evals[1])
    assert (straight_run / "config.json").is_file() and list((straight_run / "tensorboard").iterdir())
    saved = json.loads((straight_run / workdirs.CONFIG_FILE).read_text())  # the run's config, beside the model's
    assert saved["num_steps"] == 8 and saved["objective"]["loss"] == "angle"

    texts = ["A man is playing a flute.", "Two dogs run on the beach.", ""]
    ours = embedjax.load_pretrained(straight_run).encode(texts)
    ref = SentenceTransformer(str(straight_run), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_rerun_of_a_finished_or_changed_workdir(straight_run, tiny_overrides, tmp_path):
    """A finished workdir reports and exits; a run-changing config is refused (one line, exit 2)
    unless --allow_config_change; a change that does not alter the run (log_every) passes."""
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(straight_run, workdir)
    metrics_before = (workdir / "metrics.jsonl").read_text()
    again = run_train(workdir, {**tiny_overrides, "log_every": 3})
    assert "already holds a finished run" in again.stdout and "dev Spearman after training" in again.stdout
    assert (workdir / "metrics.jsonl").read_text() == metrics_before  # nothing trained, nothing logged
    changed = run_train(workdir, {**tiny_overrides, "optim.learning_rate": 2e-3}, check=False)
    assert changed.returncode == 2, changed.stderr[-2000:]
    errors = [line for line in changed.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "optim.learning_rate: 0.001 -> 0.002" in errors[0] and "--allow_config_change" in errors[0]
    more = run_train(workdir, {**tiny_overrides, "num_steps": 10, "eval_every": 5}, extra_args=["--allow_config_change"])
    assert "best step" in more.stdout and sorted(loss_curve(workdir)) == list(range(1, 11))
    typo = run_train(workdir, {**tiny_overrides, "optim.learning_rat": 1e-3}, check=False)
    assert typo.returncode == 2 and "did you mean optim.learning_rate" in typo.stderr and "Traceback" not in typo.stderr


def test_one_pooling_from_training_to_reload(tiny_overrides, tmp_path):
    """config.pooling is the run's one pooling: the dev evaluation that selected the best step,
    the export and its reload (no pooling argument) all use it."""
    from embedjax.data import read_stsb
    from embedjax.eval import STSEvaluator

    workdir = tmp_path / "max"
    run_train(workdir, {**tiny_overrides, "pooling": "max", "num_steps": 4, "eval_every": 2})
    summary = json.loads((workdir / "summary.json").read_text())
    reloaded = embedjax.load_pretrained(workdir)
    assert reloaded.pooling == "max"
    dev = STSEvaluator(read_stsb(tiny_overrides["evals.dev.path"]), name="dev", metrics=("cosine",))
    # the selection-time score of the best step is what the reloaded export scores
    assert dev(reloaded)["dev/cosine_spearman"] == pytest.approx(summary["best_at_selection"]["dev/cosine_spearman"],
                                                                  abs=1e-4)
    mean = dev(embedjax.load_pretrained(workdir, pooling="mean"))["dev/cosine_spearman"]
    assert abs(mean - summary["after"]["dev/cosine_spearman"]) > 1e-3  # mean pooling would score differently


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    bad_from = 5

    def poisoned(state, batch, frozen=None, teacher=None, **kw):
        new_state, metrics = loop_train_step(state, batch, frozen, teacher, **kw)
        nan = jax.numpy.where(state.step + 1 >= bad_from, jax.numpy.nan, 0.0)
        return new_state, {**metrics, "loss": metrics["loss"] + nan}

    loop_train_step = step_module.train_step
    monkeypatch.setattr(step_module, "train_step", poisoned)
    config = config_with(tiny_overrides)
    with pytest.raises(FloatingPointError, match=r"non-finite training metrics at step 5.*last good checkpoint \(step 4\)"):
        loop.train_and_evaluate(config, tmp_path)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as mngr:
        assert mngr.latest_step() == 4
    params = final_params(tmp_path, 4)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from embedjax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], keep=5)
    big = {"w": np.full((64, 1024, 1024), 1.0, np.float32)}  # 256 MiB: the write takes a while
    ckpt.save(1, big, {"position": 1}); ckpt.wait()
    ckpt.save(2, {"w": big["w"] * 2}, {"position": 2})  # async: returns before the write is done
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_during_an_async_save_leaves_the_previous_checkpoint_usable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    from embedjax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, keep=5)
    assert ckpt.latest_step() == 1  # step 2 never completed, so it is not offered
    abstract = {"w": jax.ShapeDtypeStruct((64, 1024, 1024), np.float32)}
    state, data, step = ckpt.restore(abstract)
    assert step == 1 and data == {"position": 1} and float(state["w"][3, 5, 7]) == 1.0
    ckpt.save(2, {"w": np.zeros((64, 1024, 1024), np.float32)}, {"position": 2}, force=True)  # next run saves on
    ckpt.wait()
    assert ckpt.latest_step() == 2
    ckpt.close()


def test_learning_rate_schedule_and_decay_mask():
    sched = optim.learning_rate_schedule(1e-3, total_steps=100, warmup=0.1, decay="linear")
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 55, 100)], [0, 5e-4, 1e-3, 5e-4, 0], atol=1e-9)
    cos = optim.learning_rate_schedule(1.0, total_steps=20, warmup=0, decay="cosine")
    np.testing.assert_allclose(float(cos(10)), 0.5 * (1 + np.cos(np.pi * 10 / 20)), atol=1e-6)
    cfg = bert.BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                          max_position_embeddings=8)
    mask = optim.decay_mask(bert.init(cfg, jax.random.key(0)))
    assert mask["layers"]["attention"]["query"]["kernel"] and mask["layers"]["mlp"]["down"]["kernel"]
    assert not mask["layers"]["attention"]["query"]["bias"] and not mask["layers"]["mlp"]["norm"]["scale"]
    assert not mask["embeddings"]["word"]


@pytest.mark.parametrize("name", ["stsb_angle", "stsb_cosent", "sick_simcse_sup", "unsup_simcse",
                                  "stsb_matryoshka", "stsb_2d", "stsb_2d:mode=2dmse", "stsb_2d:mode=espresso"])
def test_every_config_trains_a_step(name, tiny_model, tmp_path):
    """Each shipped config's data and objective run through the real train step (tiny model)."""
    import importlib

    from embedjax import tokenize
    from embedjax.data import pipeline
    from embedjax.train import sources
    from embedjax.train.objective import Objective
    from embedjax.train.state import TrainState
    from embedjax.train.step import train_step

    sys.path.insert(0, str(REPO))
    module, _, arg = name.partition(":")
    c = importlib.import_module(f"configs.{module}").get_config(arg or None)
    enc = embedjax.load_pretrained(tiny_model)
    if c.objective.matryoshka_dims:  # the tiny model is 32 wide
        c.objective.matryoshka_dims = [32, 16, 8]
        c.objective.matryoshka_weights = [1.0, 1.0, 1.0]
    if "compression_size" in c.objective.layer_kwargs:
        c.objective.layer_kwargs.compression_size = 8
    objective = Objective.from_config(c.objective, enc.pooling)
    tok = tokenize.Tokenizer(enc.tokenizer.backend, 64, 0, buckets=tuple(c.data.buckets))
    c.optim.warmup = 0  # warmup's first step has learning rate 0: the params would not move
    tx, _ = optim.make_optimizer(c.optim, 10)
    step = jax.jit(functools.partial(train_step, enc_cfg=enc.cfg, objective=objective, tx=tx))
    data = DataConfig.from_config(c.data)
    packing = tasks.packing_for(data, objective)
    assert (packing is None) == bool(c.objective.gradcache_chunk)  # packed by default, as the loop does
    # The layout the loop trains the config in (test_packing: each loss family's packed step equals its padded one).
    it = pipeline.train_pipeline(sources.train_source(data), tok, global_batch_size=8, seed=0,
                                 common_length=True, packing=packing)
    batch = next(it).model_inputs()
    token_ids = [s.ids for s in batch.sides.values() if s.ids is not None] + (
        [batch.packed.ids] if batch.packed is not None else [])
    assert len({ids.shape[1] for ids in token_ids}) == 1  # one common length
    assert (batch.packed is not None) == (packing is not None)
    state = TrainState.create(enc.params, tx, 0)
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(new_state.step) == 1
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         new_state.params, state.params)
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("layers,dims", [(None, ()), (None, (32, 16)), ("adaptive", (32, 16))])
def test_gradcache_objective_equals_the_uncached_one(layers, dims):
    """Without dropout (keys then do not matter) GradCache is the same loss and gradient."""
    from embedjax.train.objective import Objective, batch_loss

    cfg = bert.BertConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          max_position_embeddings=16)
    params = bert.init(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    b, t, k = 8, 6, 2
    batch = Batch(a=Side(ids=rng.integers(1, 60, (b, t)), mask=np.ones((b, t), np.int32)),
                  b=Side(ids=rng.integers(1, 60, (b, t)), mask=np.ones((b, t), np.int32)),
                  n=Side(ids=rng.integers(1, 60, (b, k, t)), mask=np.ones((b, k, t), np.int32)))
    base = dict(loss="infonce", dropout=False, matryoshka_dims=list(dims), layers=layers,
                layer_kwargs={"n_layers_per_step": 1} if layers else {})
    sys.path.insert(0, str(REPO))
    from configs.base import base_config

    declared = base_config().objective.to_dict()
    objective = lambda **kw: Objective.from_config({**declared, **base, **kw}, "mean")
    key = jax.random.PRNGKey(3)
    plain = jax.value_and_grad(batch_loss)(params, cfg, objective(), batch, key)
    cached = jax.value_and_grad(batch_loss)(params, cfg, objective(gradcache_chunk=2), batch, key)
    np.testing.assert_allclose(float(cached[0]), float(plain[0]), rtol=1e-5)
    for g1, g2 in zip(jax.tree.leaves(cached[1]), jax.tree.leaves(plain[1])):
        # float32 round-off scales with the leaf's largest entry (fusion/reassociation differs)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-5 * max(1.0, np.abs(g2).max()))


def test_dev_grid_evaluation_and_selection_metric(tiny_model, small_dev):
    """evals.dev.layers x dims adds a cell per (depth, width) and their mean; the full depth and
    width are the full model's cell (not evaluated twice); bad depths are refused up front."""
    from embedjax.eval import suite

    c = config_with({"model": tiny_model, "evals.dev.path": small_dev})
    enc = embedjax.load_pretrained(tiny_model)
    c.evals.dev.layers, c.evals.dev.dims = (1, 2), (8, 32)
    metrics = suite.run_all(suite.for_training(c.evals, batch_size=c.eval_batch_size, enc_cfg=enc.cfg), enc)
    mean = "dev/cosine_spearman_mean"
    cells = {k: v for k, v in metrics.items() if "spearman" in k and k != mean and "subset" not in k}
    # depth 2 and width 32 are the full model (tiny: 2 layers, hidden 32): not evaluated twice
    assert sorted(cells) == sorted(["dev/cosine_spearman", "dev/cosine_spearman@8", "dev/cosine_spearman@L1",
                                    "dev/cosine_spearman@L1@8"])
    assert metrics[mean] == pytest.approx(np.mean(list(cells.values())))
    assert metrics["dev/cosine_spearman@L1"] != pytest.approx(metrics["dev/cosine_spearman"])
    selection.check_select_metric(mean, metrics)
    with pytest.raises(ValueError, match="select_metric 'dev/cosine_spearman@L3' is not among"):
        selection.check_select_metric("dev/cosine_spearman@L3", metrics)
    c.evals.dev.layers = (7,)
    with pytest.raises(ValueError, match="evals.dev.layers: 7"):
        suite.for_training(c.evals, batch_size=c.eval_batch_size, enc_cfg=enc.cfg)


def test_training_selects_on_a_retrieval_metric(tiny_model, small_dev, small_beir, tmp_path):
    """config.evals: an STS entry and a retrieval entry; select_metric a retrieval key. The best
    step is the argmax of that key over the evaluations, and the export scores what it scored."""
    from embedjax.eval import RetrievalEvaluator
    from embedjax.data.retrieval_readers import read_beir

    c = config_with({"model": tiny_model, "evals.dev.path": small_dev, "num_steps": 8, "eval_every": 2,
                     "checkpoint.every": 4, "optim.learning_rate": 1e-3})
    c.evals.ir = {"type": "retrieval", "path": str(small_beir), "split": "dev", "k_values": (1, 10)}
    c.select_metric = "ir/ndcg@10"
    summary = loop.train_and_evaluate(c, tmp_path / "w")
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "ir/ndcg@10" in r}
    assert sorted(evals) == [0, 2, 4, 6, 8] and all("dev/cosine_spearman" in r for r in evals.values())
    scores = {s: r["ir/ndcg@10"] for s, r in evals.items()}
    assert len(set(scores.values())) > 1  # training moves the retrieval metric
    best = summary["best_step"]
    assert scores[best] == max(scores.values())
    assert summary["after"]["ir/ndcg@10"] == pytest.approx(scores[best], abs=1e-4)
    # an independent evaluator on the exported model agrees
    exported = embedjax.load_pretrained(tmp_path / "w")
    got = RetrievalEvaluator(read_beir(small_beir, "dev"), name="ir", k_values=(1, 10))(exported)
    assert got["ir/ndcg@10"] == pytest.approx(scores[best], abs=1e-4)


def test_eval_start_and_eval_export_off_skip_those_evaluations(tiny_model, small_beir, tmp_path):
    """eval_start=False: no step-0 evaluation and the start is no candidate; eval_export=False: the
    summary's "after" is the best step's in-training figures, which the exported files reproduce."""
    from embedjax.eval import RetrievalEvaluator
    from embedjax.data.retrieval_readers import read_beir

    c = config_with({"model": tiny_model, "num_steps": 4, "eval_every": 2, "checkpoint.every": 4,
                     "optim.learning_rate": 1e-3, "eval_start": False, "eval_export": False})
    c.evals = {"ir": {"type": "retrieval", "path": str(small_beir), "split": "dev", "k_values": (1, 10)}}
    c.select_metric = "ir/ndcg@10"
    summary = loop.train_and_evaluate(c, tmp_path / "w")
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "ir/ndcg@10" in r}
    assert sorted(evals) == [2, 4] and summary["before"] is None
    best = summary["best_step"]
    assert best in (2, 4) and evals[best]["ir/ndcg@10"] == max(r["ir/ndcg@10"] for r in evals.values())
    assert summary["after"] == {k: v for k, v in evals[best].items() if k != "step"}
    got = RetrievalEvaluator(read_beir(small_beir, "dev"), name="ir", k_values=(1, 10))(embedjax.load_pretrained(tmp_path / "w"))
    assert got["ir/ndcg@10"] == pytest.approx(summary["after"]["ir/ndcg@10"], abs=1e-4)


def test_select_metric_must_be_reported(tiny_model, small_dev, tmp_path):
    c = config_with({"model": tiny_model, "evals.dev.path": small_dev})
    c.select_metric = "dev/ndcg@10"
    with pytest.raises(ValueError, match="select_metric 'dev/ndcg@10' is not among"):
        loop.train_and_evaluate(c, tmp_path / "w")
    c.select_metric = "dev/cosine_spearman"
    c.evals.dev.layers = (7,)
    with pytest.raises(ValueError, match="evals.dev.layers: 7"):
        loop.train_and_evaluate(c, tmp_path / "w2")


def test_log_records_are_written_above_the_progress_bar(capsys):
    """A console handler's records go through the bar's ``write`` while it is shown (not
    through the bar), and the handler is back afterwards."""
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    root.addHandler(console)
    written = []
    try:
        with metrics.progress_bar(total=3, initial=0) as bar:
            original_write = bar.write
            bar.write = lambda text, **kw: (written.append(text), original_write(text, **kw))
            assert console not in root.handlers
            logging.getLogger("embedjax.test").warning("checkpoint saved")
            bar.update(1)
        assert console in root.handlers
    finally:
        root.removeHandler(console)
    assert written == ["LOG checkpoint saved"]
    assert capsys.readouterr().err.count("LOG checkpoint saved") == 1
