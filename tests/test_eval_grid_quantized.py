"""The evaluator wrappers: GridEvaluator (layers x dims) and QuantizedEvaluator (int8 / binary),
against independent references (sentence-transformers with truncated layers and truncate_dim,
its quantize_embeddings and EmbeddingSimilarityEvaluator, NumPy/scipy written out here)."""

import copy

import numpy as np
import pytest
from scipy import stats

import embedjax
from embedjax.data import ScoredPair
from embedjax.data.retrieval_readers import BeirData
from embedjax.data.sts_readers import read_stsb_sts
from embedjax.eval.grid import GridEvaluator
from embedjax.eval.quantized import QuantizedEvaluator
from embedjax.eval.retrieval import RetrievalEvaluator
from embedjax.eval.sts import STSEvaluator

from test_eval_sts import naive_scores  # noqa: E402  (tests/ is on sys.path; one NumPy reference)

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

N_PAIRS = 150


def spearman(scores, gold):
    return 100 * stats.spearmanr(scores, gold)[0]


def naive_int8(x, calibration):
    """sentence-transformers' int8 written out: 256 buckets over each dimension's [min, max]."""
    lo, hi = calibration.min(0), calibration.max(0)
    steps = (hi - lo) / 255
    steps = np.where(steps == 0, 1, steps)
    return (np.clip(np.floor((x - lo) / steps), 0, 255) - 128).astype(np.int8)


def naive_hamming(a, b):
    """Minus the number of dimensions whose signs differ (no bit packing)."""
    return -((np.asarray(a) > 0) != (np.asarray(b) > 0)).sum(1)


@pytest.fixture(scope="module")
def pairs(stsb_dir):
    return read_stsb_sts(stsb_dir / "sts-dev.csv")[:N_PAIRS]


@pytest.fixture(scope="module")
def gold(pairs):
    return np.array([p.score for p in pairs])


@pytest.fixture(scope="module")
def grid_run(pairs, minilm):
    grid = GridEvaluator(STSEvaluator(pairs, "dev", metrics=("cosine", "dot"), protocol="pooled"),
                         layers=(None, 3), dims=(None, 128))
    emb = grid.embed(minilm)
    return grid, emb, grid.score(emb)


def st_truncated(st_minilm, num_layers):
    """A copy of the sentence-transformers model that runs only its first ``num_layers`` layers."""
    model = copy.deepcopy(st_minilm)
    bert = model[0].auto_model
    bert.encoder.layer = bert.encoder.layer[:num_layers]
    bert.config.num_hidden_layers = num_layers
    return model


# ------------------------------------------------------------------ grid


def test_grid_cells_equal_sentence_transformers_with_fewer_layers_and_truncate_dim(grid_run, pairs, gold, st_minilm):
    grid, emb, got = grid_run
    assert sorted(emb) == ["L3|a", "L3|b", "full|a", "full|b"]
    texts_a, texts_b = [p.text_a for p in pairs], [p.text_b for p in pairs]
    for k, model in ((None, st_minilm), (3, st_truncated(st_minilm, 3))):
        for d in (None, 128):
            a, b = model.encode(texts_a, truncate_dim=d), model.encode(texts_b, truncate_dim=d)
            suffix = ("" if k is None else f"@L{k}") + ("" if d is None else f"@{d}")
            for m in ("cosine", "dot"):
                assert got[f"{m}_spearman{suffix}"] == pytest.approx(spearman(naive_scores(a, b, m), gold),
                                                                     abs=0.01), (m, suffix)
    # truncate_dim slices after the Normalize module: the slices are not unit vectors, and dot != cosine
    assert got["dot_spearman@L3@128"] != pytest.approx(got["cosine_spearman@L3@128"], abs=0.01)
    assert got["cosine_spearman@L3"] < got["cosine_spearman"] - 5  # the depth really changed
    cells = [got[f"cosine_spearman{s}"] for s in ("", "@128", "@L3", "@L3@128")]
    assert got["cosine_spearman_mean"] == pytest.approx(np.mean(cells))
    assert grid.main_metric == "cosine_spearman_mean" and grid.name == "dev"


def test_grid_renormalize_matches_normalize_embeddings_after_truncate_dim(grid_run, pairs, gold, st_minilm):
    grid, emb, _ = grid_run
    got = GridEvaluator(grid.inner, layers=grid.layers, dims=grid.dims, renormalize=True).score(emb)
    model = st_truncated(st_minilm, 3)
    a = model.encode([p.text_a for p in pairs], truncate_dim=128, normalize_embeddings=True)
    b = model.encode([p.text_b for p in pairs], truncate_dim=128, normalize_embeddings=True)
    assert got["dot_spearman@L3@128"] == pytest.approx(spearman(naive_scores(a, b, "dot"), gold), abs=0.01)
    assert got["dot_spearman@L3@128"] == pytest.approx(got["cosine_spearman@L3@128"], abs=1e-3)


def test_grid_table_and_heatmap(grid_run, tmp_path):
    import matplotlib.image

    grid, _, got = grid_run
    table = grid.table(got, "cosine_spearman")
    lines = table.splitlines()
    assert lines[0].split() == ["cosine_spearman", "full", "128"]
    assert lines[1].split()[:2] == ["all", "layers"] and lines[2].split()[:2] == ["3", "layers"]
    assert [float(v) for v in lines[2].split()[2:]] == [round(got["cosine_spearman@L3"], 2),
                                                        round(got["cosine_spearman@L3@128"], 2)]
    assert [float(v) for v in lines[1].split()[2:]] == [round(got["cosine_spearman"], 2),
                                                        round(got["cosine_spearman@128"], 2)]
    prefixed = {f"dev/{k}": v for k, v in got.items()}  # run()'s keys work too
    assert grid.table(prefixed, "cosine_spearman") == table
    path = grid.heatmap(got, "dot_spearman", tmp_path / "plots" / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    with pytest.raises(KeyError, match="no 'ndcg@10' cell"):
        grid.table(got, "ndcg@10")


def test_sts_evaluator_layers_and_dims_keep_their_keys(tiny_model, small_dev):
    """STSEvaluator(layers=, dims=) (the training loop's dev evaluation) goes through the grid with the
    same key names as before and no extra keys."""
    from embedjax.data import read_stsb

    enc = embedjax.load_pretrained(tiny_model)
    dev = read_stsb(small_dev)
    got = STSEvaluator(dev, name="dev", metrics=("cosine",), layers=(None, 1), dims=(None, 8), batch_size=32)(enc)
    assert list(got) == ["dev/cosine_spearman", "dev/cosine_pearson", "dev/cosine_spearman@8", "dev/cosine_pearson@8",
                         "dev/cosine_spearman@L1", "dev/cosine_pearson@L1", "dev/cosine_spearman@L1@8",
                         "dev/cosine_pearson@L1@8"]
    gold = [p.score for p in dev]
    a = enc.encode([p.text_a for p in dev], num_layers=1)[:, :8]
    b = enc.encode([p.text_b for p in dev], num_layers=1)[:, :8]
    assert got["dev/cosine_spearman@L1@8"] == pytest.approx(spearman(naive_scores(a, b, "cosine"), gold), abs=1e-3)


def test_grid_errors(grid_run, minilm):
    grid, emb, _ = grid_run
    with pytest.raises(ValueError, match="num_layers must be None"):
        grid.embed(minilm, num_layers=3)
    with pytest.raises(ValueError, match="dim 512 is outside 1..384"):
        GridEvaluator(grid.inner, layers=(None,), dims=(512,)).score(emb)
    with pytest.raises(ValueError, match="no embeddings for depth 'L1'"):
        GridEvaluator(grid.inner, layers=(1,), dims=(None,)).score(emb)
    with pytest.raises(ValueError, match="dims must be positive integers"):
        GridEvaluator(grid.inner, dims=(None, 0))
    with pytest.raises(ValueError, match="duplicates"):
        GridEvaluator(grid.inner, layers=(3, 3))
    bits = {k: np.packbits(v > 0, axis=-1) for k, v in emb.items()}
    with pytest.raises(ValueError, match=r"put the quantiser inside the grid, GridEvaluator\(QuantizedEvaluator"):
        grid.score(bits)


# ------------------------------------------------------------------ quantized


def test_int8_and_binary_equal_numpy_and_sentence_transformers(grid_run, gold):
    from sentence_transformers.util import quantize_embeddings

    grid, emb, _ = grid_run
    a, b = emb["full|a"], emb["full|b"]
    sts = STSEvaluator(grid.inner.pairs, "dev", protocol="pooled")
    got = QuantizedEvaluator(sts).score({"a": a, "b": b})
    both = np.concatenate([a, b])  # calibration: the evaluated embeddings themselves
    a8, b8 = naive_int8(a, both), naive_int8(b, both)
    st8 = quantize_embeddings(both, "int8")
    np.testing.assert_array_equal(np.concatenate([a8, b8]), st8)
    np.testing.assert_array_equal(np.packbits(a > 0, axis=-1), quantize_embeddings(a, "ubinary"))
    for m in ("cosine", "dot", "euclidean", "manhattan"):
        assert got[f"{m}_spearman"] == pytest.approx(spearman(naive_scores(a, b, m), gold), abs=1e-3)
        assert got[f"{m}_spearman@int8"] == pytest.approx(spearman(naive_scores(a8, b8, m), gold), abs=1e-3)
        assert got[f"{m}_pearson@int8"] == pytest.approx(100 * stats.pearsonr(naive_scores(a8, b8, m), gold)[0],
                                                         abs=1e-3)
    assert got["hamming_spearman@binary"] == pytest.approx(spearman(naive_hamming(a, b), gold), abs=1e-3)
    assert got["hamming_pearson@binary"] == pytest.approx(100 * stats.pearsonr(naive_hamming(a, b), gold)[0], abs=1e-3)
    assert not any(k.startswith("cosine") and k.endswith("@binary") for k in got)  # bits: Hamming only
    assert got["cosine_spearman@int8"] != got["cosine_spearman"]  # int8 really quantised


def test_quantized_sts_equals_embedding_similarity_evaluator_precisions(grid_run, st_minilm):
    """sentence-transformers' own int8 / ubinary STS evaluation (both sides calibrated together;
    Manhattan distance of unpacked bits = Hamming distance)."""
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    grid, emb, _ = grid_run
    pairs = grid.inner.pairs
    got = QuantizedEvaluator(STSEvaluator(pairs, "dev", protocol="pooled")).score({"a": emb["full|a"],
                                                                                    "b": emb["full|b"]})
    args = ([p.text_a for p in pairs], [p.text_b for p in pairs], [p.score for p in pairs])
    st8 = EmbeddingSimilarityEvaluator(*args, similarity_fn_names=["cosine", "dot"], precision="int8",
                                       write_csv=False, batch_size=64)(st_minilm)
    stb = EmbeddingSimilarityEvaluator(*args, similarity_fn_names=["manhattan"], precision="ubinary",
                                       write_csv=False, batch_size=64)(st_minilm)
    assert got["cosine_spearman@int8"] == pytest.approx(100 * st8["spearman_cosine"], abs=0.01)
    assert got["dot_spearman@int8"] == pytest.approx(100 * st8["spearman_dot"], abs=0.01)
    assert got["hamming_spearman@binary"] == pytest.approx(100 * stb["spearman_manhattan"], abs=0.01)
    assert got["hamming_pearson@binary"] == pytest.approx(100 * stb["pearson_manhattan"], abs=0.01)


def test_binary_quantisation_changes_the_sts_ranking():
    """Three pairs whose cosine order is the gold order, but whose sign bits put pair 2 first."""
    a = np.array([[1.0, 1, 1, 1]] * 3, np.float32)
    b = np.array([[-1, -1, 1, 1],            # cosine 0,     signs differ in 2 dims
                  [0.05, 0.05, 0.05, 1],     # cosine 0.57,  signs all equal
                  [1, 1, 1, -0.01]],         # cosine 0.87,  signs differ in 1 dim
                 np.float32)
    pairs = [ScoredPair(f"a{i}", f"b{i}", float(i + 1)) for i in range(3)]
    got = QuantizedEvaluator(STSEvaluator(pairs, "toy", metrics=("cosine",))).score({"a": a, "b": b})
    assert got["cosine_spearman"] == pytest.approx(100)
    assert list(naive_hamming(a, b)) == [-2, 0, -1]
    assert got["hamming_spearman@binary"] == pytest.approx(spearman(naive_hamming(a, b), [1, 2, 3]))
    assert got["hamming_spearman@binary"] == pytest.approx(50)


def retrieval_toy(**kw):
    """One query, two documents: float cosine ranks the relevant d1 first, Hamming ranks d2 first,
    and the float query . +-1 bits (rescoring) puts d1 back on top."""
    data = BeirData(corpus_ids=("d1", "d2"), corpus_texts=("one", "two"), query_ids=("q",), query_texts=("query",),
                    qrels={"q": {"d1": 1}})
    q = np.array([[3.0, 1, 1, 0.1]], np.float32)
    docs = np.array([[1.0, -0.1, -0.1, 1],    # d1: cosine 0.62, 2 sign flips, rescored 1.1
                     [-0.1, 1, 1, 1]],        # d2: cosine 0.31, 1 sign flip,  rescored -0.9
                    np.float32)
    return QuantizedEvaluator(RetrievalEvaluator(data, "toy", k_values=(1,)), precisions=("float32", "binary"),
                              **kw), {"queries": q, "corpus": docs}


def test_binary_changes_the_retrieval_ranking_and_rescoring_restores_it():
    evaluator, emb = retrieval_toy()
    q, docs = emb["queries"], emb["corpus"]
    assert list(naive_scores(np.repeat(q, 2, 0), docs, "cosine").argsort()[::-1]) == [0, 1]
    assert list(naive_hamming(np.repeat(q, 2, 0), docs).argsort()[::-1]) == [1, 0]
    assert list((q @ np.where(docs > 0, 1.0, -1.0).T)[0].argsort()[::-1]) == [0, 1]
    rescored = evaluator.score(emb)
    assert rescored["ndcg@1"] == 1.0 and rescored["ndcg@1@binary"] == 1.0
    plain, emb = retrieval_toy(rescore=False)
    got = plain.score(emb)
    assert got["ndcg@1"] == 1.0 and got["ndcg@1@binary"] == 0.0


def test_calibration_sets(grid_run, minilm, st_minilm, gold):
    from sentence_transformers.util import quantize_embeddings

    grid, emb, _ = grid_run
    a, b = emb["full|a"], emb["full|b"]
    sts = STSEvaluator(grid.inner.pairs, "dev", metrics=("cosine",), protocol="pooled")
    cal = np.random.default_rng(0).normal(scale=0.05, size=(64, a.shape[1])).astype(np.float32)
    got = QuantizedEvaluator(sts, precisions=("int8",), calibration=cal).score({"a": a, "b": b, "calibration": cal})
    a8 = quantize_embeddings(a, "int8", calibration_embeddings=cal)
    b8 = quantize_embeddings(b, "int8", calibration_embeddings=cal)
    assert sorted(got) == ["cosine_pearson@int8", "cosine_spearman@int8"]
    assert got["cosine_spearman@int8"] == pytest.approx(spearman(naive_scores(a8, b8, "cosine"), gold), abs=1e-3)
    texts = ["A man is playing a guitar.", "The cat sleeps.", "Stocks fell sharply on Monday.", "Kids swim."]
    by_text = QuantizedEvaluator(STSEvaluator(grid.inner.pairs[:10], "dev"), calibration=texts).embed(minilm)
    np.testing.assert_allclose(by_text["calibration"], st_minilm.encode(texts), atol=1e-5)
    as_dict = QuantizedEvaluator(sts, calibration={"x": cal[:32], "y": cal[32:]})
    np.testing.assert_array_equal(as_dict.calibration, cal)
    with pytest.raises(ValueError, match="precisions must be distinct values of"):
        QuantizedEvaluator(sts, precisions=("float32", "int4"))
    with pytest.raises(ValueError, match="list of texts"):
        QuantizedEvaluator(sts, calibration="one text")
    with pytest.raises(ValueError, match="non-empty"):
        QuantizedEvaluator(sts, calibration=np.zeros((0, 4)))
    with pytest.raises(ValueError, match="already uint8"):
        QuantizedEvaluator(sts).score({"a": np.packbits(a > 0, axis=-1), "b": np.packbits(b > 0, axis=-1)})


def test_grid_of_quantized_composes(tiny_model, small_dev):
    """GridEvaluator(QuantizedEvaluator(sts)): every cell quantised from its own slice."""
    from embedjax.data import read_stsb

    enc = embedjax.load_pretrained(tiny_model)
    dev = read_stsb(small_dev)
    sts = STSEvaluator(dev, "dev", metrics=("cosine",))
    evaluator = GridEvaluator(QuantizedEvaluator(sts), layers=(None, 1), dims=(None, 8))
    got = evaluator(enc)
    assert evaluator.main_metric == "cosine_spearman_mean" and "dev/cosine_spearman_mean" in got
    gold = [p.score for p in dev]
    a = enc.encode([p.text_a for p in dev], num_layers=1)[:, :8]
    b = enc.encode([p.text_b for p in dev], num_layers=1)[:, :8]
    both = np.concatenate([a, b])
    a8, b8 = naive_int8(a, both), naive_int8(b, both)
    assert got["dev/cosine_spearman@int8@L1@8"] == pytest.approx(spearman(naive_scores(a8, b8, "cosine"), gold),
                                                                 abs=1e-3)
    assert got["dev/hamming_spearman@binary@L1@8"] == pytest.approx(spearman(naive_hamming(a, b), gold), abs=1e-3)
    with pytest.raises(ValueError, match="put the quantiser inside"):
        QuantizedEvaluator(GridEvaluator(sts, layers=(None, 1), dims=(None, 8)))(enc)
