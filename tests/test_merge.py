"""embedjax.merge and scripts/merge.py: soups, task arithmetic, delta fusion and self positioning
against NumPy written here; greedy keep/reject sequences known from first principles; loading
exported models and workdir checkpoints; the CLI end to end on tiny models."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax import merge

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "merge.py"
TEXTS = ["a man is playing a guitar", "a woman is slicing an onion", "the cat sits on the mat",
         "two dogs run in a field", "a child is riding a bike", "someone is cooking dinner"]


def random_tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {"emb": {"embedding": (scale * rng.normal(size=(5, 4))).astype(np.float32)},
            "layers": {"kernel": (scale * rng.normal(size=(2, 4, 3))).astype(np.float32),
                       "bias": (scale * rng.normal(size=(2, 3))).astype(np.float32)}}


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_close(got, want, **tol):
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], err_msg=k, **(tol or {"rtol": 1e-6, "atol": 1e-6}))


def np_map(fn, *trees):
    """``fn`` leaf by leaf on NumPy copies (the reference side, independent of jax.tree)."""
    leaves = [flat(t) for t in trees]
    keys = leaves[0].keys()
    out = {k: fn(*(l[k].astype(np.float64) for l in leaves)) for k in keys}
    return {"emb": {"embedding": out["['emb']['embedding']"]},
            "layers": {"kernel": out["['layers']['kernel']"], "bias": out["['layers']['bias']"]}}


# --------------------------------------------------------------------------- soups and task arithmetic


def test_uniform_and_weighted_soup_equal_numpy_averages():
    trees = [random_tree(s) for s in range(3)]
    assert_trees_close(merge.uniform_soup(trees), np_map(lambda a, b, c: (a + b + c) / 3, *trees))
    # weights are normalised: (1, 2, 5) / 8
    assert_trees_close(merge.uniform_soup(trees, [1, 2, 5]),
                       np_map(lambda a, b, c: (a + 2 * b + 5 * c) / 8, *trees))
    assert_trees_close(merge.uniform_soup(trees[:1]), trees[0])
    out = merge.uniform_soup([jax.tree.map(jnp.asarray, t) for t in trees])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))


def test_task_arithmetic_equals_numpy():
    base, a, b = random_tree(0), random_tree(1), random_tree(2)
    got = merge.task_arithmetic(base, [a, b], [0.3, -0.5])
    assert_trees_close(got, np_map(lambda t0, t1, t2: t0 + 0.3 * (t1 - t0) - 0.5 * (t2 - t0), base, a, b),
                       rtol=1e-5, atol=1e-5)
    assert_trees_close(merge.task_arithmetic(base, [a, b], [0.5, 0.5]), merge.uniform_soup([a, b]),
                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t["layers"].pop("bias"), "no parameter 'layers/bias'"),
    (lambda t: t["layers"].update(bias=np.zeros((2, 4), np.float32)), "'layers/bias' has shape (2, 4)"),
    (lambda t: t["layers"].update(extra=np.zeros(3, np.float32)), "has parameter 'layers/extra' that"),
])
def test_structure_mismatch_names_the_first_differing_path(mutate, message):
    a, b = random_tree(0), random_tree(1)
    mutate(b)
    for call in (lambda: merge.uniform_soup([a, b]), lambda: merge.task_arithmetic(a, [a, b], [1, 1]),
                 lambda: merge.delta_fusion(a, [a, b])):
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value) and "model 1" in str(err.value), str(err.value)


def test_bad_weights_and_coefficients_are_clear_errors():
    trees = [random_tree(0), random_tree(1)]
    with pytest.raises(ValueError, match="expected 2 numbers"):
        merge.uniform_soup(trees, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        merge.uniform_soup(trees, [1.0, -2.0])
    with pytest.raises(ValueError, match="coefficients: expected finite"):
        merge.task_arithmetic(trees[0], trees, [1.0, float("nan")])
    with pytest.raises(ValueError, match="no models"):
        merge.uniform_soup([])


# --------------------------------------------------------------------------- greedy soup


def scalar_model(x: float) -> dict:
    return {"w": np.full((3,), x, np.float32)}


def distance_score(params) -> float:
    """-(mean(w) - 1)^2: the soup's score is known from the candidates' values by hand."""
    return -float((np.mean(np.asarray(params["w"], np.float64)) - 1.0) ** 2)


def test_greedy_soup_keeps_exactly_the_helpful_candidates():
    # own scores: a=0.75 -> -1/16, b=1.5 -> -1/4, c=0.25 -> -9/16, d=1.125 -> -1/64.
    # Order d, a, b, c. Soup {d}: -1/64. + a: mean(1.125, .75) = .9375 -> -1/256: kept.
    # + b: mean(1.125, .75, 1.5) = 1.125 -> -1/64 < -1/256: rejected.
    # + c: mean(1.125, .75, .25) = .708 -> -0.085: rejected. Soup = (1.125 + .75) / 2.
    values = {"a": 0.75, "b": 1.5, "c": 0.25, "d": 1.125}
    calls = []

    def score(params):
        calls.append(float(np.asarray(params["w"])[0]))
        return distance_score(params)

    params, report = merge.greedy_soup([scalar_model(v) for v in values.values()], score, names=list(values))
    assert [s.name for s in report] == ["d", "a", "b", "c"]
    assert [s.kept for s in report] == [True, True, False, False]
    assert [s.own_score for s in report] == pytest.approx([-1 / 64, -1 / 16, -1 / 4, -9 / 16])
    assert [s.soup_score for s in report] == pytest.approx([-1 / 64, -1 / 256, -1 / 64, -(2.125 / 3 - 1) ** 2])
    assert [s.best_score for s in report] == pytest.approx([-1 / 64, -1 / 256, -1 / 256, -1 / 256])
    np.testing.assert_allclose(params["w"], np.full(3, (1.125 + 0.75) / 2))
    assert len(calls) == 2 * len(values) - 1


def test_greedy_soup_keeps_ties_and_then_equals_the_uniform_soup():
    trees = [random_tree(s) for s in range(3)]
    params, report = merge.greedy_soup(trees, lambda p: 0.0)
    assert all(s.kept for s in report) and [s.name for s in report] == ["model 0", "model 1", "model 2"]
    assert_trees_close(params, np_map(lambda a, b, c: (a + b + c) / 3, *trees))


def test_greedy_soup_refuses_a_nan_score():
    with pytest.raises(ValueError, match="NaN"):
        merge.greedy_soup([scalar_model(1.0), scalar_model(2.0)], lambda p: float("nan"))


# --------------------------------------------------------------------------- delta fusion


def test_delta_weights_and_fusion_equal_numpy_per_element():
    base = random_tree(0)
    tuned = [np_map(lambda b, d: (b + d).astype(np.float32), base, random_tree(s, scale=0.1)) for s in (1, 2, 3)]
    # a block where no model moved (the uniform average there) and one where only model 1 moved
    for t in tuned:
        t["layers"]["bias"][0] = base["layers"]["bias"][0]
    tuned[1]["layers"]["bias"][1] += 0.5
    tuned[0]["layers"]["bias"][1] = base["layers"]["bias"][1]
    tuned[2]["layers"]["bias"][1] = base["layers"]["bias"][1]

    for power in (1.0, 2.0):
        def reference(t0, *ts):
            mags = np.stack([np.abs(t - t0) ** power for t in ts])
            total = mags.sum(0)
            w = np.where(total > 0, mags / np.where(total > 0, total, 1), 1 / len(ts))
            return w, (w * np.stack(ts)).sum(0)

        weights = merge.delta_weights(base, tuned, power=power)
        for i in range(3):
            assert_trees_close(weights[i], np_map(lambda *x: reference(*x)[0][i], base, *tuned))
        total = jax.tree.map(lambda *w: sum(w), *weights)
        assert all(np.allclose(x, 1.0) for x in jax.tree.leaves(total))
        assert_trees_close(merge.delta_fusion(base, tuned, power=power),
                           np_map(lambda *x: reference(*x)[1], base, *tuned), rtol=1e-5, atol=1e-6)
    fused = merge.delta_fusion(base, tuned)
    np.testing.assert_allclose(fused["layers"]["bias"][0], base["layers"]["bias"][0], rtol=1e-6)  # nobody moved
    np.testing.assert_allclose(fused["layers"]["bias"][1], tuned[1]["layers"]["bias"][1], rtol=1e-6)  # only model 1


def test_delta_fusion_tensor_granularity_and_power_zero():
    base, a, b = random_tree(0), random_tree(1), random_tree(2)
    weights = merge.delta_weights(base, [a, b], granularity="tensor")
    for key in ("emb", "layers"):
        for name in base[key]:
            da, db = (np.abs(t[key][name] - base[key][name]).mean() for t in (a, b))
            np.testing.assert_allclose(weights[0][key][name], np.full(base[key][name].shape, da / (da + db)),
                                       rtol=1e-5)
    assert_trees_close(merge.delta_fusion(base, [a, b], power=0.0), merge.uniform_soup([a, b]))
    with pytest.raises(ValueError, match="granularity"):
        merge.delta_weights(base, [a, b], granularity="layer")


# --------------------------------------------------------------------------- self positioning


def test_self_positioning_finds_the_known_optimum_within_the_budget():
    base, a, b = random_tree(0), random_tree(1), random_tree(2)
    want = (0.375, 0.625)  # dyadic: reachable exactly by the grid + halving steps
    target = np_map(lambda t0, t1, t2: t0 + want[0] * (t1 - t0) + want[1] * (t2 - t0), base, a, b)
    calls = []

    def score(params):
        calls.append(1)
        got, tgt = flat(params), flat(target)
        return -sum(float(((got[k] - tgt[k]) ** 2).sum()) for k in tgt)

    params, report = merge.self_positioning(base, [a, b], score, max_evals=60, min_step=1 / 16)
    assert report.coefficients == pytest.approx(want, abs=1e-9)
    assert report.score == pytest.approx(0.0, abs=1e-6)
    assert len(calls) == len(report.evaluations) <= 60
    assert report.evaluations[0][0] == (0.0, 0.0)  # the coarse grid starts at the base model
    assert len({c for c, _ in report.evaluations}) == len(report.evaluations)  # no point scored twice
    assert_trees_close(params, target, rtol=1e-5, atol=1e-5)

    calls.clear()
    _, small = merge.self_positioning(base, [a, b], score, max_evals=7)
    assert len(calls) == 7 and small.score == max(s for _, s in small.evaluations)
    assert small.score <= report.score


def test_self_positioning_rejects_bad_search_settings():
    base, a = random_tree(0), random_tree(1)
    with pytest.raises(ValueError, match="max_evals"):
        merge.self_positioning(base, [a], lambda p: 0.0, max_evals=0)
    with pytest.raises(ValueError, match="grid"):
        merge.self_positioning(base, [a], lambda p: 0.0, grid=(0.0, 2.0))


# --------------------------------------------------------------------------- models on disk


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny random qwen3 'pretrained' model and two 'fine-tuned' copies (params perturbed), exported."""
    import embedjax
    from embedjax import tiny

    root = tmp_path_factory.mktemp("merge")
    base_dir = tiny.write_random_checkpoint(root / "base", "qwen3", texts=TEXTS * 4, vocab_size=300,
                                            num_hidden_layers=1)
    base = embedjax.load_pretrained(base_dir, pooling="mean")
    dirs = []
    for seed in (1, 2):
        key = jax.random.key(seed)
        leaves, treedef = jax.tree.flatten(base.params)
        keys = jax.random.split(key, len(leaves))
        tuned = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
        dirs.append(embedjax.save_pretrained(dataclasses.replace(base, params=tuned), root / f"ft{seed}",
                                             normalize=True))
    dev = root / "dev.tsv"
    scores = [4.5, 1.0, 3.0, 0.5, 2.0, 3.5]
    dev.write_text("".join(f"{TEXTS[i]}\t{TEXTS[(i + 1 + i % 2) % 6]}\t{s}\n" for i, s in enumerate(scores)))
    return {"base": base_dir, "ft": dirs, "dev": dev, "root": root}


def run_script(*args, timeout=300):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_script_uniform_merge_exports_the_average(tiny_models, tmp_path):
    import embedjax

    out = tmp_path / "merged"
    proc = run_script("--method", "uniform", "--models", ",".join(map(str, tiny_models["ft"])),
                      "--output", str(out), "--dev", str(tiny_models["dev"]), "--dev_format", "scored")
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = [embedjax.load_pretrained(d) for d in tiny_models["ft"]]
    merged = embedjax.load_pretrained(out)
    assert merged.pooling == "mean" and merged.normalize  # the template's settings
    want = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) + np.asarray(b, np.float64)) / 2,
                        loaded[0].params, loaded[1].params)
    assert_trees_close(merged.params, want, rtol=1e-6, atol=1e-7)
    lines = proc.stdout.splitlines()
    assert sum("dev cosine_spearman" in line for line in lines) == 3, proc.stdout  # two models + the merge
    # the printed merged score is sts_scorer's on the exported model
    score = merge.sts_scorer(merged, tiny_models["dev"], format="scored")(merged.params)
    assert f"{score:.4f}" in [line for line in lines if line.startswith("merged")][0]


@pytest.mark.parametrize("args, message", [
    (["--method", "soup"], "--method='soup'"),
    (["--method", "delta"], "needs --base"),
    (["--method", "uniform", "--models", "/no/such/model"], "/no/such/model"),
])
def test_script_bad_input_is_one_line(tiny_models, tmp_path, args, message):
    args = [a.format(base=tiny_models["base"]) for a in args]
    if "--models" not in args:
        args += ["--models", ",".join(map(str, tiny_models["ft"]))]
    proc = run_script(*args, "--output", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_greedy_and_self_positioning_on_real_sts_scores(tiny_models):
    """sts_scorer is the STS evaluator's Spearman; the library's searches run on it."""
    import embedjax
    from embedjax.data import read_scored_pairs
    from scipy import stats

    base = embedjax.load_pretrained(tiny_models["base"])
    cands = merge.load_candidates([str(d) for d in tiny_models["ft"]])
    template = cands[0].encoder
    score = merge.sts_scorer(template, tiny_models["dev"], format="scored")
    pairs = read_scored_pairs(tiny_models["dev"])
    za = template.encode([p.text_a for p in pairs], normalize=True)
    zb = template.encode([p.text_b for p in pairs], normalize=True)
    want = 100 * stats.spearmanr((za * zb).sum(1), [p.score for p in pairs]).statistic
    assert score(template.params) == pytest.approx(want, abs=1e-6)

    params, report = merge.greedy_soup([c.encoder.params for c in cands], score, names=[c.name for c in cands])
    assert report[0].own_score == max(s.own_score for s in report)
    assert score(params) == pytest.approx(report[-1].best_score, abs=1e-6)
    params, sp = merge.self_positioning(base.params, [c.encoder.params for c in cands], score, max_evals=3)
    assert len(sp.evaluations) == 3 and score(params) == pytest.approx(sp.score, abs=1e-6)
    with pytest.raises(KeyError, match="nope"):
        merge.sts_scorer(template, tiny_models["dev"], "cosine_nope", format="scored")(template.params)


def test_load_candidates_reads_workdir_best_and_latest_checkpoints(tiny_models, tmp_path):
    """A workdir written like the training loop's: train_config.json, best/ (params + metrics) and
    checkpoints/ (the whole TrainState); each kept step comes back with the params saved."""
    import optax

    import embedjax
    from configs.base import base_config
    from embedjax.checkpoint import Checkpointer
    from embedjax.train.state import TrainState

    workdir = tmp_path / "run"
    workdir.mkdir()
    config = base_config()
    config.model = str(tiny_models["base"])
    config.pooling = "mean"
    (workdir / "train_config.json").write_text(config.to_json_best_effort())
    tuned = [embedjax.load_pretrained(d).params for d in tiny_models["ft"]]
    ckpt = Checkpointer(workdir, keep=2, keep_best=2, best_metric="dev/cosine_spearman", async_save=False)
    ckpt.save_best(10, tuned[0], {"dev/cosine_spearman": 50.0})
    ckpt.save_best(20, tuned[1], {"dev/cosine_spearman": 60.0})
    ckpt.save(20, TrainState.create(tuned[1], optax.adam(1e-3), seed=0), {"position": 3})
    ckpt.close()

    with pytest.raises(FileNotFoundError, match="--checkpoints"):
        merge.load_candidates([str(workdir)])
    found = {c.name: c for c in merge.load_candidates([str(workdir)], checkpoints=True)}
    assert sorted(found) == sorted(f"{workdir}@{k}" for k in ("best-10", "best-20", "step-20"))
    for name, want in ((f"{workdir}@best-10", tuned[0]), (f"{workdir}@best-20", tuned[1]),
                       (f"{workdir}@step-20", tuned[1])):
        assert found[name].encoder.normalize and found[name].encoder.pooling == "mean"
        assert_trees_close(found[name].encoder.params, want, rtol=0, atol=0)
