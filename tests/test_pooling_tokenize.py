"""Pooling modes against NumPy loops; bucketing rules."""

import numpy as np
import pytest

from embedjax import pooling, tokenize


def naive_pool(h, m, mode):
    """One text at a time, only its real tokens, written from the definitions."""
    out = []
    for hb, mb in zip(h, m):
        idx = [t for t in range(len(mb)) if mb[t]]
        real = hb[idx]
        if mode == "cls":
            out.append(hb[0])
        elif mode == "mean":
            out.append(real.mean(0))
        elif mode == "max":
            out.append(real.max(0))
        elif mode == "cls_avg":
            out.append((hb[0] + real.mean(0)) / 2)
        elif mode == "last_token":
            out.append(hb[idx[-1]])
        elif mode == "weighted_mean":
            w = np.arange(1, len(idx) + 1, dtype=np.float64)
            out.append((real * w[:, None]).sum(0) / w.sum())
        elif mode == "mean_sqrt_len":
            out.append(real.sum(0) / np.sqrt(len(idx)))
    return np.stack(out)


# cls pooling reads position 0, a real token only under right padding.
CASES = [(mode, side) for mode in pooling.FIXED_MODES for side in ("right", "left")
         if not (side == "left" and mode in ("cls", "cls_avg"))]


@pytest.mark.parametrize("mode,side", CASES)
def test_pooling_matches_naive(mode, side):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 7, 5)).astype(np.float32) - 3.0  # all negative: max must ignore padding zeros
    lengths = np.array([7, 3, 1, 5])
    pos = np.arange(7)[None]
    m = (pos < lengths[:, None]) if side == "right" else (pos >= 7 - lengths[:, None])
    m = m.astype(np.int32)
    np.testing.assert_allclose(np.asarray(pooling.pool(h, m, mode)), naive_pool(h, m, mode), rtol=1e-5, atol=1e-5)


def test_pool_handles_a_leading_layer_axis():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(3, 2, 6, 4)).astype(np.float32)
    m = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    got = np.asarray(pooling.pool(h, m, "mean"))
    assert got.shape == (3, 2, 4)
    for layer in range(3):
        np.testing.assert_allclose(got[layer], naive_pool(h[layer], m, "mean"), rtol=1e-5)


def test_sentence_transformers_pooling_configs():
    assert pooling.from_sentence_transformers({"pooling_mode_mean_tokens": True}) == "mean"
    assert pooling.from_sentence_transformers({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}) == "cls"
    assert pooling.from_sentence_transformers({"pooling_mode": "lasttoken"}) == "last_token"
    assert pooling.from_sentence_transformers({"pooling_mode": ["weightedmean"]}) == "weighted_mean"
    with pytest.raises(ValueError, match="supports exactly one"):
        pooling.from_sentence_transformers({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})
    with pytest.raises(ValueError, match="concatenated"):
        pooling.from_sentence_transformers({"pooling_mode": ["cls", "mean"]})
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pooling.pool(np.zeros((1, 2, 3)), np.ones((1, 2)), "median")


def test_buckets_cap_at_max_length_and_cover_every_length():
    buckets = tokenize.buckets_up_to(100)
    assert buckets[-1] == 100 and all(b < 100 for b in buckets[:-1])
    for length in range(1, 101):
        b = tokenize.bucket_for(length, buckets)
        assert b >= length and all(x < length for x in buckets if x < b)
    assert tokenize.buckets_up_to(256, (16, 32, 64, 128, 256, 512)) == (16, 32, 64, 128, 256)
    assert [tokenize.rows_for(n, 64) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    assert tokenize.rows_for(20, 24) == 24  # capped at the batch size, never above it


def test_padding_uses_the_models_pad_id(minilm):
    batch = minilm.tokenizer(["hello world", "a"], rows=4)
    assert batch.input_ids.shape == (4, 4) and batch.size == 2
    np.testing.assert_array_equal(batch.attention_mask.sum(1), [4, 3, 0, 0])
    assert (batch.input_ids[batch.attention_mask == 0] == minilm.cfg.pad_token_id).all()
