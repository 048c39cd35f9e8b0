"""Sequence packing: the bin packer, the packed layout, and packed encoding / pooling / losses
against the one-text-per-row references (NumPy, the padded path; PyTorch in
test_packing_pytorch.py, which compiles fully optimised)."""

import dataclasses
import types as pytypes

import jax
import numpy as np
import pytest
from test_pooling_tokenize import naive_pool

from embedjax import pooling, tokenize
from embedjax.data import pipeline
from embedjax.embed import embed, embed_packed
from embedjax.train.objective import Objective, batch_loss

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)


def fake_encodings(lengths, rng, vocab=100, types=False):
    """Objects shaped like tokenizers' Encoding (ids, type_ids) with the given lengths."""
    return [pytypes.SimpleNamespace(ids=list(rng.integers(2, vocab, n)),
                                    type_ids=list(rng.integers(0, 2, n) if types else np.zeros(n, int)))
            for n in lengths]


def fake_tokenizer(pad_id=0, buckets=(8, 16, 32, 64, 128)):
    tok = tokenize.Tokenizer.__new__(tokenize.Tokenizer)
    tok.pad_token_id, tok.max_length, tok.buckets = pad_id, max(buckets), tuple(buckets)
    return tok


@pytest.mark.parametrize("seed", range(5))
def test_first_fit_decreasing_places_every_item_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(1, 40, 60)) + [70]  # one item longer than a bin
    bins = tokenize.first_fit_decreasing(lengths, 32)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    for b in bins:
        total = sum(lengths[i] for i in b)
        assert total <= 32 or len(b) == 1  # only a lone oversize item may exceed a bin
    # First-fit decreasing uses at most 11/9 OPT + 1 bins; OPT >= ceil(total / capacity).
    fitting = [n for n in lengths if n <= 32]
    assert len(bins) <= 11 / 9 * (-(-sum(fitting) // 32)) + 1 + (len(lengths) - len(fitting))


def test_pack_layout_holds_each_text_contiguously():
    rng = np.random.default_rng(0)
    lengths = [5, 17, 3, 9, 12, 1, 30, 7]
    encs = fake_encodings(lengths, rng, types=True)
    packed = fake_tokenizer(pad_id=1).pack(encs, length=32, rows_multiple=4)
    assert packed.input_ids.shape[1] == 32 and packed.input_ids.shape[0] % 4 == 0
    assert packed.num_texts == len(encs)
    for i, e in enumerate(encs):
        rows, cols = np.nonzero(packed.segment_ids == i + 1)
        assert len(set(rows)) == 1, "a text never spans two rows"
        assert np.all(np.diff(cols) == 1), "a text's tokens are contiguous"
        r = rows[0]
        np.testing.assert_array_equal(packed.input_ids[r, cols], e.ids)
        np.testing.assert_array_equal(packed.token_type_ids[r, cols], e.type_ids)
        np.testing.assert_array_equal(packed.positions[r, cols], np.arange(lengths[i]))
    pad = packed.segment_ids == 0
    assert pad.sum() == packed.input_ids.size - sum(lengths)
    assert np.all(packed.input_ids[pad] == 1)


def test_pack_row_length_grows_to_the_bucket_of_a_longer_text():
    encs = fake_encodings([40, 3, 3], np.random.default_rng(0))
    packed = fake_tokenizer().pack(encs, length=16)
    assert packed.input_ids.shape == (1, 64)  # rows widen to 40's bucket (64), which then holds all three
    assert sorted(set(packed.segment_ids[0]) - {0}) == [1, 2, 3]


def packed_hidden_per_text(hidden, packed, n):
    """(..., R, T, H) packed states -> list of (..., len_i, H), each text's own tokens."""
    out = []
    for i in range(n):
        r, c = np.nonzero(packed.segment_ids == i + 1)
        out.append(hidden[..., r[0], c, :])
    return out


@pytest.mark.parametrize("mode", pooling.FIXED_MODES)
def test_pool_segments_matches_numpy_per_text(mode):
    rng = np.random.default_rng(2)
    lengths = [4, 1, 6, 3, 2]
    packed = fake_tokenizer().pack(fake_encodings(lengths, rng), length=8)
    r, t = packed.segment_ids.shape
    hidden = rng.normal(size=(2, r, t, 5)).astype(np.float32) - 3.0  # a layer axis; all negative (max)
    got = np.asarray(pooling.pool_segments(hidden, packed.segment_ids, packed.positions, len(lengths), mode))
    assert got.shape == (2, len(lengths), 5)
    for layer in range(2):
        per_text = packed_hidden_per_text(hidden[layer], packed, len(lengths))
        for i, h in enumerate(per_text):
            want = naive_pool(h[None], np.ones((1, len(h)), int), mode)[0]
            np.testing.assert_allclose(got[layer, i], want, rtol=1e-5, atol=1e-5)


def test_embed_packed_equals_embed_on_minilm(minilm, stsb_dev_sentences):
    texts = stsb_dev_sentences[::61][:48]  # spread over the file: varied lengths
    encs = minilm.tokenizer.encode(texts)
    packed = minilm.tokenizer.pack(encs, length=64)
    padded = minilm.tokenizer.pad(encs)
    assert packed.input_ids.size < padded.input_ids.size
    for per_layer in (False, True):
        got = embed_packed(minilm.params, minilm.cfg, packed.input_ids, packed.segment_ids, packed.positions,
                           num_texts=len(texts), token_type_ids=packed.token_type_ids, per_layer=per_layer)
        want = embed(minilm.params, minilm.cfg, padded.input_ids, padded.attention_mask,
                     token_type_ids=padded.token_type_ids, per_layer=per_layer)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def collated(records, tokenizer, packing):
    fields = pipeline.fields_of(records)
    return pipeline.collate(list(enumerate(records)), tokenizer, len(records), fields, packing=packing)


OBJECTIVES = {
    "angle": (Objective(loss="angle", loss_kwargs=(("label_range", (0.0, 5.0)),), dropout=False), "scored"),
    "infonce_hard_negatives": (Objective(loss="infonce", dropout=False), "triplets"),
    "2dmse_matryoshka": (Objective(loss="cosent", layers="adaptive", matryoshka_dims=(384, 64), dropout=False),
                         "scored"),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_packed_batch_gives_the_padded_loss_and_gradient(name, minilm, stsb_dev_sentences):
    objective, kind = OBJECTIVES[name]
    s = stsb_dev_sentences
    if kind == "scored":
        records = [{"text_a": s[i], "text_b": s[i + 100], "score": float(i % 6)} for i in range(8)]
    else:
        records = [{"text_a": s[i], "text_b": s[i + 100], "text_n": s[i + 200]} for i in range(8)]
    packed = collated(records, minilm.tokenizer, pipeline.Packing(length=64, rows_multiple=2))
    padded = collated(records, minilm.tokenizer, None)
    assert packed.packed is not None and packed.a.ids is None and padded.a.ids is not None
    np.testing.assert_array_equal(packed.a.hashes, padded.a.hashes)
    model_keys = lambda b: b.model_inputs()  # noqa: E731
    key = jax.random.key(0)
    f = jax.value_and_grad(lambda p, b: batch_loss(p, minilm.cfg, objective, b, key))
    loss_p, grad_p = f(minilm.params, model_keys(packed))
    loss_d, grad_d = f(minilm.params, model_keys(padded))
    np.testing.assert_allclose(float(loss_p), float(loss_d), rtol=1e-5)
    for gp, gd in zip(jax.tree.leaves(grad_p), jax.tree.leaves(grad_d)):
        np.testing.assert_allclose(np.asarray(gp), np.asarray(gd), atol=2e-5 * max(1.0, float(np.abs(gd).max())))


def test_unsupervised_simcse_packs_each_text_twice(minilm, stsb_dev_sentences):
    records = stsb_dev_sentences[:8]
    batch = collated(records, minilm.tokenizer, pipeline.Packing(length=64, views=2))
    assert set(batch.a.text_index) | set(batch.b.text_index) == set(range(16))
    np.testing.assert_array_equal(batch.b.hashes, batch.a.hashes)
    ids = batch.packed.ids
    seg = batch.packed.segments
    for a, b in zip(batch.a.text_index, batch.b.text_index):
        np.testing.assert_array_equal(ids[seg == a + 1], ids[seg == b + 1])  # the same tokens twice
    cfg = dataclasses.replace(minilm.cfg, hidden_dropout=0.1, attention_dropout=0.1)
    model_batch = batch.model_inputs()
    from embedjax.train.objective import embed_batch

    objective = Objective(loss="simcse_unsup", dropout=True)
    za, zb, _ = embed_batch(minilm.params, cfg, objective, model_batch, jax.random.key(0))
    cos = np.sum(np.asarray(za) * np.asarray(zb), -1) / (
        np.linalg.norm(za, axis=-1) * np.linalg.norm(zb, axis=-1))
    assert 0.8 < cos.min() and cos.max() < 0.99999  # two different dropout views of one text
    with pytest.raises(ValueError, match="views=2"):
        embed_batch(minilm.params, cfg, objective,
                    dataclasses.replace(model_batch, b=None), jax.random.key(0))


def test_gradcache_refuses_a_packed_batch(minilm, stsb_dev_sentences):
    records = [{"text_a": a, "text_b": b} for a, b in zip(stsb_dev_sentences[:8], stsb_dev_sentences[8:16])]
    batch = collated(records, minilm.tokenizer, pipeline.Packing(length=64))
    batch = batch.model_inputs()
    with pytest.raises(ValueError, match="GradCache"):
        batch_loss(minilm.params, minilm.cfg, Objective(loss="infonce", gradcache_chunk=4), batch, jax.random.key(0))
