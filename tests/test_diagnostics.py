"""Embedding-space diagnostics against naive NumPy loops and first principles, the diagnostics
evaluator from a config, and the robustness wrapper."""

import numpy as np
import pytest
from scipy import stats

from embedjax.eval import diagnostics as D
from embedjax.eval import robustness, suite


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def cloud():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(60, 8)) + np.array([2.0] + [0.0] * 7)).astype(np.float32)  # anisotropic


def test_alignment_uniformity_and_anisotropy_equal_their_loops(cloud):
    u = _unit(cloud.astype(np.float64))
    n = len(u)
    b = cloud[::-1].copy()
    want_alignment = np.mean([np.sum((u[i] - _unit(b.astype(np.float64))[i]) ** 2) for i in range(n)])
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    want_uniformity = np.log(np.mean([np.exp(-2 * np.sum((u[i] - u[j]) ** 2)) for i, j in pairs]))
    want_anisotropy = np.mean([u[i] @ u[j] for i, j in pairs])
    assert D.alignment(cloud, b) == pytest.approx(want_alignment, rel=1e-9)
    assert D.uniformity(cloud, chunk_size=7) == pytest.approx(want_uniformity, rel=1e-9)
    assert D.anisotropy(cloud) == pytest.approx(want_anisotropy, rel=1e-9)
    assert D.anisotropy(cloud) > 0.3  # the shared offset shows
    assert D.alignment(cloud, cloud) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="pairs of equal shape"):
        D.alignment(cloud, cloud[:5])


def test_hubness_equals_brute_force_k_occurrence_skewness(cloud):
    x = np.concatenate([cloud, cloud[:3]])  # exact duplicates: a row's twin is its neighbour, never itself
    u = _unit(x.astype(np.float64))
    k = 5
    counts = np.zeros(len(x))
    for i in range(len(x)):
        sims = u @ u[i]
        sims[i] = -np.inf
        for j in np.argsort(-sims, kind="stable")[:k]:
            counts[j] += 1
    mean, std = counts.mean(), counts.std()
    want = np.mean((counts - mean) ** 3) / std ** 3
    assert D.hubness(x, k=k) == pytest.approx(want, rel=1e-6)
    _, indices = D.neighbours(x, k)
    assert not (indices == np.arange(len(x))[:, None]).any()
    assert (indices[len(cloud):, 0] == np.arange(3)).all()  # each duplicate's first neighbour is its twin


def test_intrinsic_dimension_recovers_a_subspace_and_equals_the_twonn_formula():
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(32, 5)))[0]
    x = (rng.normal(size=(1500, 5)) @ basis.T).astype(np.float32)  # 5 dimensions in 32
    assert D.intrinsic_dimension(x) == pytest.approx(5.0, rel=0.15)
    small = x[:80].astype(np.float64)
    ratios = []
    for i in range(len(small)):
        dist = np.sort(np.linalg.norm(small - small[i], axis=1))[1:3]
        ratios.append(dist[1] / dist[0])
    assert D.intrinsic_dimension(small) == pytest.approx(len(small) / np.sum(np.log(ratios)), rel=1e-6)


def test_effective_rank_counts_equal_singular_values():
    rng = np.random.default_rng(2)
    q = np.linalg.qr(rng.normal(size=(40, 40)))[0]
    x = q[:, :6] @ np.diag([3.0] * 6) @ np.linalg.qr(rng.normal(size=(16, 16)))[0][:6]  # six equal values
    assert D.effective_rank(x) == pytest.approx(6.0, rel=1e-9)
    s = np.array([4.0, 2.0, 1.0])
    p = s / s.sum()
    y = np.diag(s)
    assert D.effective_rank(y) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-12)


def test_diagnostics_evaluator_from_a_config_scores_the_model_embeddings(tiny_model, small_dev):
    from embedjax import load_pretrained
    from embedjax.data import read_stsb

    model = load_pretrained(tiny_model)
    (evaluator,) = suite.from_config({"geo": {"type": "diagnostics", "path": str(small_dev), "format": "stsb",
                                              "k": 5}})
    metrics = suite.run_all([evaluator], model)
    pairs = read_stsb(small_dev)
    texts = list(dict.fromkeys(t for p in pairs for t in (p.text_a, p.text_b)))
    x = model.encode(texts, batch_size=64)
    positives = [p for p in pairs if p.score >= 4.0]
    a = model.encode([p.text_a for p in positives], batch_size=64)
    b = model.encode([p.text_b for p in positives], batch_size=64)
    assert metrics["geo/texts"] == len(texts) and metrics["geo/positive_pairs"] == len(positives)
    assert metrics["geo/alignment"] == pytest.approx(D.alignment(a, b), rel=1e-4)
    assert metrics["geo/uniformity"] == pytest.approx(D.uniformity(x), rel=1e-4)
    assert metrics["geo/anisotropy"] == pytest.approx(np.mean(_unit(x) @ _unit(x).T)
                                                      * len(x) / (len(x) - 1) - 1 / (len(x) - 1), rel=1e-4)
    assert {"geo/hubness@5", "geo/intrinsic_dimension", "geo/effective_rank"} <= set(metrics)
    with pytest.raises(ValueError, match="unknown keys"):
        suite.from_config({"geo": {"type": "diagnostics", "path": str(small_dev), "format": "stsb", "kk": 1}})
    with pytest.raises(ValueError, match="no pair scores >= positive_threshold"):
        suite.from_config({"geo": {"type": "diagnostics", "path": str(small_dev), "format": "stsb",
                                   "positive_threshold": 9}})


class _Recorder:
    """A duck-typed model: its encode methods record what they see (a SPLADE-like encode_query too)."""

    def __init__(self):
        self.seen = []

    def encode(self, texts, **kw):
        self.seen += list(texts)
        return np.array([[len(t), t.count("a")] for t in texts], np.float32)

    def encode_query(self, text):
        self.seen.append(text)
        return text


class _LengthEvaluator:
    name, main_metric = "toy", "length"

    def __init__(self, texts):
        self.texts = texts

    def run(self, model):
        yield "toy/length", float(model.encode(self.texts)[:, 0].mean())


def test_robustness_wrapper_perturbs_every_encoded_text_the_same_way_per_copy():
    texts = ["a banana and an apple", "another sentence here", "a banana and an apple"]
    model = _Recorder()
    evaluator = robustness.RobustnessEvaluator(_LengthEvaluator(texts), robustness.character_typos(0.5), copies=4)
    metrics = dict(evaluator.run(model))
    assert metrics["toy/length"] == pytest.approx(np.mean([len(t) for t in texts]))  # the clean run
    per_copy = [model.seen[3 * c: 3 + 3 * c] for c in range(4)]  # the copies run first, then the clean run
    assert all(copy[0] == copy[2] for copy in per_copy)  # one text, one perturbation within a copy
    assert len({copy[0] for copy in per_copy}) > 1  # copies differ
    lengths = [np.mean([len(t) for t in copy]) for copy in per_copy]
    assert metrics["toy/length_mean"] == pytest.approx(np.mean(lengths))
    assert metrics["toy/length_std"] == pytest.approx(np.std(lengths))
    again = _Recorder()
    dict(robustness.RobustnessEvaluator(_LengthEvaluator(texts[::-1]), robustness.character_typos(0.5),
                                        copies=4, clean=False).run(again))
    assert again.seen[:3] == per_copy[0][::-1]  # the same perturbations in another order
    perturbed = robustness.PerturbedModel(model, lambda t, rng: t.upper(), seed=0, copy=0)
    assert perturbed.encode_query("spider") == "SPIDER"
    with pytest.raises(TypeError, match="must return a str"):
        robustness.PerturbedModel(model, lambda t, rng: None, seed=0, copy=0).encode(["x"])


def test_robustness_of_sts_with_an_identity_perturbation_is_the_clean_score(tiny_model, small_dev):
    from embedjax import load_pretrained
    from embedjax.data import read_stsb
    from embedjax.eval.sts import STSEvaluator

    evaluator = STSEvaluator(read_stsb(small_dev), name="sts", metrics=("cosine",))
    metrics = dict(robustness.RobustnessEvaluator(evaluator, lambda t, rng: t, copies=2)
                   .run(load_pretrained(tiny_model)))
    assert metrics["sts/cosine_spearman_mean"] == pytest.approx(metrics["sts/cosine_spearman"], abs=1e-9)
    assert metrics["sts/cosine_spearman_std"] == pytest.approx(0.0, abs=1e-9)
