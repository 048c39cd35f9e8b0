"""bfloat16 encoding end to end: all-MiniLM-L6-v2 in bf16 against sentence-transformers' float32
model, embedding by embedding and as STS-B dev Spearman, fully optimised as users run it. The
mixed-precision products and bf16 training steps are in tests/test_bf16_steps.py."""

import jax
import numpy as np
import pytest
from scipy import stats

import embedjax
from embedjax.data import read_stsb
from embedjax.eval import STSEvaluator

# --- encoding: all-MiniLM-L6-v2 in bf16 against sentence-transformers in float32 -----------------


@pytest.fixture(scope="module")
def minilm_bf16(minilm_path):
    return embedjax.load_pretrained(minilm_path, dtype="bfloat16")


def test_bf16_minilm_embeddings_match_sentence_transformers_float32(minilm_bf16, st_minilm, stsb_dev_sentences):
    assert minilm_bf16.cfg.dtype == "bfloat16"
    assert all(w.dtype == np.float32 for w in jax.tree.leaves(minilm_bf16.params))  # params stay float32
    texts = stsb_dev_sentences[:150] + stsb_dev_sentences[1500:1650]  # both sides of the pairs
    ours = minilm_bf16.encode(texts, batch_size=64)
    ref = st_minilm.encode(texts, batch_size=64, normalize_embeddings=True)
    assert ours.shape == ref.shape == (300, 384) and ours.dtype == np.float32
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.999, f"min cosine bf16 vs sentence-transformers f32: {cos.min():.5f}"
    assert np.abs(ours - ref).max() > 1e-4  # it really ran in bf16 (float32 agrees to 1e-5)


def test_bf16_stsb_dev_spearman_within_0_2_of_sentence_transformers_float32(minilm_bf16, st_stsb_dev, stsb_dir):
    pairs = read_stsb(stsb_dir / "sts-dev.csv")
    ours = STSEvaluator(pairs, "dev", metrics=("cosine",))(minilm_bf16)["dev/cosine_spearman"]
    a, b = st_stsb_dev["a"], st_stsb_dev["b"]  # SentenceTransformer.encode(..., normalize_embeddings=True)
    ref = 100 * stats.spearmanr((a * b).sum(1), [p.score for p in pairs]).statistic
    assert abs(ours - ref) <= 0.2, (ours, ref)
