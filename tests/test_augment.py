"""Augmented SBERT (embedjax/augment.py, scripts/augment.py): semantic-search and random pair
sampling against a brute-force NumPy search, silver labels against sentence-transformers'
CrossEncoder, and the script end to end."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import CrossEncoder as STCrossEncoder

import embedjax
from embedjax.augment import label_pairs, sample_pairs
from embedjax.data import read_scored_pairs, read_stsb

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "augment.py"


@pytest.fixture(scope="module")
def gold(small_dev):
    return read_stsb(small_dev)[:40]


def test_sampling_is_each_sentence_with_its_nearest_plus_random_partners(tiny_model, gold):
    encoder = embedjax.load_pretrained(tiny_model)
    sentences = [t for p in gold for t in (p.text_a, p.text_b)]
    texts = list(dict.fromkeys(sentences))
    exclude = [(p.text_b, p.text_a) for p in gold]  # either order
    searched = sample_pairs(sentences, encoder, top_k=2, random_pairs=0, exclude=exclude)
    # brute force: cosine of every pair, each sentence's 2 best others, first come first kept
    emb = encoder.encode(texts, normalize=True)
    cos = emb.astype(np.float64) @ emb.astype(np.float64).T
    np.fill_diagonal(cos, -np.inf)
    seen = {tuple(sorted((p.text_a, p.text_b))) for p in gold}
    want = []
    for i in range(len(texts)):
        for j in np.argsort(-cos[i], kind="stable")[:2]:
            key = tuple(sorted((texts[i], texts[j])))
            if key not in seen:
                seen.add(key)
                want.append((texts[i], texts[int(j)]))
    assert searched == want
    both = sample_pairs(sentences, encoder, top_k=2, random_pairs=3, seed=1, exclude=exclude)
    assert both[: len(searched)] == searched and len(both) > len(searched) + 2 * len(texts)
    keys = [tuple(sorted(p)) for p in both]
    assert len(set(keys)) == len(keys) and all(a != b for a, b in both)
    assert not set(keys) & {tuple(sorted((p.text_a, p.text_b))) for p in gold}
    assert sample_pairs(sentences, encoder, top_k=0, random_pairs=3, seed=1) == \
        sample_pairs(sentences, encoder, top_k=0, random_pairs=3, seed=1)
    assert sample_pairs(sentences, encoder, top_k=0, random_pairs=3, seed=2) != \
        sample_pairs(sentences, encoder, top_k=0, random_pairs=3, seed=1)
    with pytest.raises(ValueError, match="two distinct"):
        sample_pairs(["one"], encoder)


def test_silver_labels_are_the_cross_encoder_scores_on_the_gold_scale(tiny_cross_encoder, gold):
    pairs = [(p.text_a, p.text_b) for p in gold[:10]]
    silver = label_pairs(pairs, embedjax.load_cross_encoder(tiny_cross_encoder), scale=5.0, batch_size=4)
    want = 5.0 * STCrossEncoder(str(tiny_cross_encoder), device="cpu").predict(pairs)
    assert [(s.text_a, s.text_b) for s in silver] == pairs
    np.testing.assert_allclose([s.score for s in silver], want, atol=1e-5)


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_script_writes_gold_and_silver_a_scored_reader_reads(tiny_model, tiny_cross_encoder, small_dev, tmp_path):
    out = tmp_path / "silver.tsv"
    proc = _run("--pairs", small_dev, "--cross_encoder", tiny_cross_encoder, "--model", tiny_model, "--output", out,
                "--format", "stsb", "--top_k", 1, "--random_pairs", 1, "--include_gold")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_scored_pairs(out)
    gold = read_stsb(small_dev)
    assert [(r.text_a, r.text_b, round(r.score, 4)) for r in rows[: len(gold)]] == \
        [(g.text_a, g.text_b, round(g.score, 4)) for g in gold]
    silver = rows[len(gold):]
    assert len(silver) > len(gold) and all(0 <= r.score <= 5 for r in silver)
    assert f"{len(gold)} gold pairs" in proc.stdout and f"{len(silver)} silver pairs" in proc.stdout
    proc = _run("--pairs", tmp_path / "nope.csv", "--cross_encoder", tiny_cross_encoder, "--output", out)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "nope.csv" in proc.stderr, proc.stderr[-2000:]
