"""STS evaluation: both protocols against sentence-transformers embeddings and its
EmbeddingSimilarityEvaluator; the STS readers (STS-B subsets, SICK-R, SentEval's STS12-16 layout)."""

import dataclasses

import numpy as np
import pytest
from scipy import stats

from embedjax.data import DataError, ScoredPair
from embedjax.data.sts_readers import (STSPair, read_senteval_sts, read_sick_sts, read_stsb_sts, regroup,
                                       subsets_of)
from embedjax.eval.sts import STSEvaluator, correlations, from_spec

METRICS = ("cosine", "dot", "euclidean", "manhattan")


def naive_scores(a, b, metric):
    """The similarities written out in NumPy (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if metric == "cosine":
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    if metric == "dot":
        return (a * b).sum(1)
    if metric == "euclidean":
        return -np.linalg.norm(a - b, axis=1)
    return -np.abs(a - b).sum(1)


def naive_protocols(a, b, gold, groups):
    """Pooled and per-group-mean Spearman / Pearson x100 for every metric."""
    gold, groups = np.asarray(gold, np.float64), np.asarray(groups)
    out = {}
    for m in METRICS:
        s = naive_scores(a, b, m)
        out[f"{m}_spearman"] = 100 * stats.spearmanr(s, gold)[0]
        out[f"{m}_pearson"] = 100 * stats.pearsonr(s, gold)[0]
        names = sorted(set(groups.tolist()))
        out[f"{m}_spearman_subset_mean"] = np.mean([100 * stats.spearmanr(s[groups == g], gold[groups == g])[0]
                                                    for g in names])
        out[f"{m}_pearson_subset_mean"] = np.mean([100 * stats.pearsonr(s[groups == g], gold[groups == g])[0]
                                                   for g in names])
    return out


def stsb_columns(path):
    """The raw tab-separated rows of an STS-B file (independent of the readers)."""
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def dev(stsb_dir):
    return read_stsb_sts(stsb_dir / "sts-dev.csv")


@pytest.fixture(scope="module")
def ours(dev, minilm_stsb_dev):
    """Our evaluator and its embeddings of STS-B dev (``evaluator.embed(minilm)``, computed once a
    session by conftest: the embeddings depend on the texts only, not on the protocol options)."""
    assert len(dev) == len(minilm_stsb_dev["a"])  # the same file, in the same order
    return STSEvaluator(dev, "dev", per_subset=True), minilm_stsb_dev


@pytest.fixture(scope="module")
def st_embeddings(dev, st_stsb_dev):
    """sentence-transformers' embeddings as the checkpoint gives them (its Normalize module included:
    ``st_minilm.encode(texts, batch_size=64)``, encoded once a session by conftest)."""
    assert len(dev) == len(st_stsb_dev["a"])  # the same file, in the same order
    return st_stsb_dev["a"], st_stsb_dev["b"]


def test_stsb_reader_keeps_the_subset_and_year(stsb_dir, dev):
    rows = stsb_columns(stsb_dir / "sts-dev.csv")
    assert len(dev) == len(rows) == 1500
    assert [p.subset for p in dev] == [f"{r[1]}/{r[2]}" for r in rows]
    assert [p.score for p in dev] == [float(r[4]) for r in rows]
    assert dev[0] == STSPair("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0,
                             subset="MSRvid/2012test", year="2012")
    assert len(set(subsets_of(dev))) == 12 and {p.year for p in dev} == {"2012", "2013", "2014", "2015", "2016",
                                                                          "2017"}
    assert isinstance(dev[0], ScoredPair)  # usable wherever plain scored pairs are


def test_stsb_dev_both_protocols_equal_sentence_transformers_embeddings(dev, ours, st_embeddings):
    evaluator, emb = ours
    got = evaluator.score(emb)
    a, b = st_embeddings
    ref = naive_protocols(a, b, [p.score for p in dev], [f"{p.subset}" for p in dev])
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=0.01), key
    assert round(got["cosine_spearman"], 2) == 86.72
    assert evaluator.main_metric == "cosine_spearman"
    # per-subset values (per_subset=True), e.g. MSRvid/2012test alone
    vid = np.array([p.subset == "MSRvid/2012test" for p in dev])
    gold = np.array([p.score for p in dev])
    rho = 100 * stats.spearmanr(naive_scores(a[vid], b[vid], "cosine"), gold[vid])[0]
    assert got["cosine_spearman[MSRvid/2012test]"] == pytest.approx(rho, abs=0.01)
    assert got["cosine_spearman_subset_mean"] < got["cosine_spearman"] - 3  # really a different protocol
    # pooling by year instead of by file: regroup
    by_year = STSEvaluator(regroup(dev, lambda p: p.year), "dev", metrics=("cosine",)).score(emb)
    years = naive_protocols(a, b, gold, [p.year for p in dev])
    assert by_year["cosine_spearman_subset_mean"] == pytest.approx(years["cosine_spearman_subset_mean"], abs=0.01)


def test_every_similarity_and_correlation_equals_embedding_similarity_evaluator(dev, ours, st_minilm):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    n = 500  # sentence-transformers encodes again: a third of dev keeps the test short
    pairs = dev[:n]
    evaluator, emb = ours
    got = STSEvaluator(pairs, "dev", protocol="pooled").score({"a": emb["a"][:n], "b": emb["b"][:n]})
    st = EmbeddingSimilarityEvaluator([p.text_a for p in pairs], [p.text_b for p in pairs], [p.score for p in pairs],
                                      similarity_fn_names=list(METRICS), name="dev", write_csv=False,
                                      batch_size=64)(st_minilm)
    for m in METRICS:
        for corr in ("spearman", "pearson"):
            assert got[f"{m}_{corr}"] == pytest.approx(100 * st[f"dev_{corr}_{m}"], abs=0.01), (m, corr)
    assert sorted(got) == sorted(f"{m}_{c}" for m in METRICS for c in ("spearman", "pearson"))


def test_scores_the_embeddings_as_the_checkpoint_gives_them(dev, minilm, st_minilm):
    """No extra normalisation: without its Normalize module, dot and the distances change, as in
    sentence-transformers (cosine does not)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    pairs = dev[:200]
    raw_model = SentenceTransformer(modules=[st_minilm[0], st_minilm[1]], device="cpu")  # no Normalize
    raw = STSEvaluator(pairs, "dev", protocol="pooled")(dataclasses.replace(minilm, normalize=False))
    unit = STSEvaluator(pairs, "dev", protocol="pooled")(minilm)
    st = EmbeddingSimilarityEvaluator([p.text_a for p in pairs], [p.text_b for p in pairs], [p.score for p in pairs],
                                      similarity_fn_names=list(METRICS), name="raw", write_csv=False,
                                      batch_size=64)(raw_model)
    for m in METRICS:
        assert raw[f"dev/{m}_spearman"] == pytest.approx(100 * st[f"raw_spearman_{m}"], abs=0.01), m
    assert raw["dev/cosine_spearman"] == pytest.approx(unit["dev/cosine_spearman"], abs=1e-3)
    assert abs(raw["dev/dot_spearman"] - unit["dev/dot_spearman"]) > 0.1


def test_protocol_choice_and_keys(dev):
    rng = np.random.default_rng(0)
    emb = {"a": rng.normal(size=(len(dev), 8)), "b": rng.normal(size=(len(dev), 8))}
    pooled = STSEvaluator(dev, "x", metrics=("cosine",), protocol="pooled").score(emb)
    assert sorted(pooled) == ["cosine_pearson", "cosine_spearman"]
    mean = STSEvaluator(dev, "x", metrics=("cosine",), protocol="subset_mean")
    assert mean.main_metric == "cosine_spearman_subset_mean"
    assert sorted(mean.score(emb)) == ["cosine_pearson_subset_mean", "cosine_spearman_subset_mean"]
    both = STSEvaluator(dev, "x", metrics=("dot",)).score(emb)
    assert sorted(both) == ["dot_pearson", "dot_pearson_subset_mean", "dot_spearman", "dot_spearman_subset_mean"]
    # plain scored pairs have one subset: the pooled keys only, as before
    plain = [ScoredPair(p.text_a, p.text_b, p.score) for p in dev]
    assert sorted(STSEvaluator(plain, "x", metrics=("cosine",)).score(emb)) == ["cosine_pearson", "cosine_spearman"]
    with pytest.raises(ValueError, match="more than one subset"):
        STSEvaluator(plain, "x", protocol="subset_mean")
    with pytest.raises(ValueError, match="protocol must be one of"):
        STSEvaluator(dev, "x", protocol="all")
    with pytest.raises(ValueError, match=r"unknown metrics \['cosin'\]"):
        STSEvaluator(dev, "x", metrics=("cosin",))
    with pytest.raises(ValueError, match="lack"):
        STSEvaluator(dev, "x").score({"queries": emb["a"]})
    with pytest.raises(ValueError, match="1499 embeddings for 1500 pairs"):
        STSEvaluator(dev, "x").score({"a": emb["a"][1:], "b": emb["b"][1:]})
    # a subset of one pair (a small dev file): the default reports the pooled protocol only;
    # asking for the per-subset protocol is an error
    lone = dev[:20] + [dataclasses.replace(dev[20], subset="lonely/2099")]
    small = {k: v[:21] for k, v in emb.items()}
    assert sorted(STSEvaluator(lone, "x", metrics=("cosine",)).score(small)) == ["cosine_pearson", "cosine_spearman"]
    with pytest.raises(ValueError, match=r"subsets \['lonely/2099'\] have fewer than 2 pairs"):
        STSEvaluator(lone, "x", protocol="subset_mean")


def test_correlations_do_not_normalise():
    rng = np.random.default_rng(1)
    a, b, gold = rng.normal(size=(50, 6)) * 3, rng.normal(size=(50, 6)), rng.uniform(0, 5, 50)
    got = correlations(a, b, gold)
    for m in METRICS:
        assert got[f"{m}_spearman"] == pytest.approx(100 * stats.spearmanr(naive_scores(a, b, m), gold)[0], abs=1e-4)
        assert got[f"{m}_pearson"] == pytest.approx(100 * stats.pearsonr(naive_scores(a, b, m), gold)[0], abs=1e-4)


# ------------------------------------------------------------------ SentEval's STS12-16 layout


def write_senteval(directory, subsets):
    """``{subset: (pair lines, gold lines)}`` as STS.input.<subset>.txt / STS.gs.<subset>.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, (inputs, gold) in subsets.items():
        (directory / f"STS.input.{name}.txt").write_text("".join(line + "\n" for line in inputs), encoding="utf-8")
        (directory / f"STS.gs.{name}.txt").write_text("".join(line + "\n" for line in gold), encoding="utf-8")
    return directory


SENTEVAL = {
    "headlines": ([
        "A man is playing a guitar.\tA man plays the guitar.",
        "A woman is slicing an onion.\tA dog runs in the park.",
        "Stocks fell sharply on Monday.\tMarkets dropped at the start of the week.",
        "The cat sleeps on the sofa.\tA cat is sleeping on a couch.",
        "Two kids are swimming.\tThe president gave a speech.",
    ], ["4.8", "0.2", "", "4.6", "0.0"]),  # line 3 unscored
    "images": ([
        "A red car parked on a street.\tA red car is parked by the road.",
        "A bird flies over the sea.\tA plane lands at an airport.\textra column",
        "Children play football in a field.\tKids are playing soccer on grass.",
        "A plate of pasta with sauce.\tA man is reading a newspaper.",
    ], ["4.5", "1.0", "4.2", "0.4"]),
}


def test_senteval_directory_pooled_like_a_naive_computation(tmp_path, minilm, st_minilm):
    directory = write_senteval(tmp_path / "STS12-en-test", SENTEVAL)
    pairs = read_senteval_sts(directory)
    # naive: every line with a gold score, in subset-name order
    naive = [(line.split("\t")[0], line.split("\t")[1], float(g), name) for name in sorted(SENTEVAL)
             for line, g in zip(*SENTEVAL[name]) if g]
    assert [(p.text_a, p.text_b, p.score, p.subset) for p in pairs] == naive
    assert {p.year for p in pairs} == {"2012"} and len(pairs) == 8
    got = STSEvaluator(pairs, "sts12", protocol="pooled", metrics=("cosine",))(minilm)
    a = st_minilm.encode([t[0] for t in naive])
    b = st_minilm.encode([t[1] for t in naive])
    gold = [t[2] for t in naive]
    assert got["sts12/cosine_spearman"] == pytest.approx(
        100 * stats.spearmanr(naive_scores(a, b, "cosine"), gold)[0], abs=0.01)
    assert got["sts12/cosine_pearson"] == pytest.approx(
        100 * stats.pearsonr(naive_scores(a, b, "cosine"), gold)[0], abs=0.01)
    assert read_senteval_sts(directory, year="2013")[0].year == "2013"


def test_senteval_reader_errors_name_file_and_line(tmp_path):
    short = write_senteval(tmp_path / "short", {"a": (["x\ty", "u\tv", "p\tq"], ["1", "2"])})
    with pytest.raises(DataError, match=r"STS\.input\.a\.txt:3: has no counterpart in STS\.gs\.a\.txt \(2 lines\)"):
        read_senteval_sts(short)
    long = write_senteval(tmp_path / "long", {"a": (["x\ty"], ["1", "2"])})
    with pytest.raises(DataError, match=r"STS\.gs\.a\.txt:2: has no counterpart in STS\.input\.a\.txt"):
        read_senteval_sts(long)
    bad = write_senteval(tmp_path / "bad", {"a": (["x\ty", "u\tv"], ["1", "high"])})
    with pytest.raises(DataError, match=r"STS\.gs\.a\.txt:2: gold score 'high' is not a number"):
        read_senteval_sts(bad)
    one = write_senteval(tmp_path / "one", {"a": (["x\ty", "only one sentence"], ["1", "2"])})
    with pytest.raises(DataError, match=r"STS\.input\.a\.txt:2: expected two tab-separated"):
        read_senteval_sts(one)
    blank = write_senteval(tmp_path / "blank", {"a": (["x\ty"], [""])})
    with pytest.raises(DataError, match=r"STS\.gs\.a\.txt: file is empty"):
        read_senteval_sts(blank)
    (tmp_path / "nogold").mkdir()
    (tmp_path / "nogold" / "STS.input.b.txt").write_text("x\ty\n")
    with pytest.raises(DataError, match=r"STS\.input\.b\.txt: no gold file STS\.gs\.b\.txt"):
        read_senteval_sts(tmp_path / "nogold")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no STS\.input\.<subset>\.txt files"):
        read_senteval_sts(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        read_senteval_sts(tmp_path / "missing")


def test_stsb_and_sick_reader_errors(tmp_path, sick_dir):
    path = tmp_path / "sts.csv"
    path.write_text("g\tf\t2012\t1\t4.0\ta\tb\ng\tf\t2012\t2\t9.0\ta\tb\n")
    with pytest.raises(DataError, match=r"sts\.csv:2: score 9\.0 is out of range"):
        read_stsb_sts(path)
    path.write_text("g\tf\t2012\t1\t4.0\ta\n")
    with pytest.raises(DataError, match=r"sts\.csv:1: expected >= 7 tab-separated columns"):
        read_stsb_sts(path)
    sick = read_sick_sts(sick_dir / "SICK_trial.txt")
    assert len(sick) == 500 and {p.subset for p in sick} == {"SICK"}
    first = (sick_dir / "SICK_trial.txt").read_text().splitlines()[1].split("\t")
    assert (sick[0].text_a, sick[0].text_b, sick[0].score) == (first[1], first[2], float(first[3]))


def test_from_spec(stsb_dir, tmp_path):
    ev = from_spec("stsb_dev", {"path": stsb_dir / "sts-dev.csv", "format": "stsb", "protocol": "pooled",
                                "metrics": ["cosine"], "batch_size": 16})
    assert (ev.name, ev.protocol, ev.metrics, ev.batch_size, len(ev.pairs)) == ("stsb_dev", "pooled", ("cosine",),
                                                                                16, 1500)
    assert len(set(ev.subsets)) == 12
    directory = write_senteval(tmp_path / "STS13", SENTEVAL)
    assert len(STSEvaluator.from_spec("sts13", {"path": str(directory), "format": "senteval"}).pairs) == 8
    scored = tmp_path / "scored.tsv"
    scored.write_text("a\tb\t1.5\nc\td\t3\n")
    assert [p.score for p in from_spec("x", {"path": scored, "format": "scored"}).pairs] == [1.5, 3.0]
    with pytest.raises(ValueError, match=r"unknown keys \['dims', 'pth'\]; allowed: \['path', 'format', 'protocol'"):
        from_spec("x", {"pth": "a", "format": "stsb", "dims": [64]})
    with pytest.raises(ValueError, match="format must be one of"):
        from_spec("x", {"path": scored, "format": "tsv"})
    with pytest.raises(ValueError, match="missing 'format'"):
        from_spec("x", {"path": scored})
