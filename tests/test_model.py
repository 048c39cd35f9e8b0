"""``load_pretrained`` / ``Encoder.encode`` against sentence-transformers on real weights and data.
``encode``'s batching (the caller's order, bucketed shapes) runs on a tiny random BERT with MiniLM's
tokenizer instead: it does not depend on the weights, and each shape is a compile."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from scipy import stats

import embedjax
from embedjax import tokenize
from embedjax.data import read_stsb
from embedjax.eval import STSEvaluator


def test_minilm_matches_sentence_transformers_on_stsb_dev(minilm, minilm_stsb_dev, st_stsb_dev):
    assert minilm.pooling == "mean" and minilm.max_length == 256  # read from the ST files
    # minilm.encode / SentenceTransformer.encode of the 3,000 dev sentences (conftest: encoded once a session,
    # through the STS evaluator)
    ours = np.concatenate([minilm_stsb_dev["a"], minilm_stsb_dev["b"]])
    ref = np.concatenate([st_stsb_dev["a"], st_stsb_dev["b"]])
    assert ours.shape == ref.shape == (3000, 384) and ours.dtype == np.float32
    diff = np.abs(ours - ref).max()
    assert diff <= 1e-5, f"max |embedjax - sentence-transformers| = {diff}"


def test_zero_shot_stsb_dev_spearman_equals_sentence_transformers(minilm_stsb_dev, st_stsb_dev, stsb_dir):
    pairs = read_stsb(stsb_dir / "sts-dev.csv")
    # STSEvaluator(pairs).embed(minilm), computed once a session (conftest), scored here
    ours = STSEvaluator(pairs, "dev", metrics=("cosine",)).score(minilm_stsb_dev)["cosine_spearman"]
    a, b = st_stsb_dev["a"], st_stsb_dev["b"]  # SentenceTransformer.encode(..., normalize_embeddings=True)
    ref = 100 * stats.spearmanr((a * b).sum(1), [p.score for p in pairs]).statistic
    assert abs(ours - ref) <= 0.01, (ours, ref)
    assert 86.0 < ours < 87.5  # the published zero-shot figure is ~86.7


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """conftest's tiny random BERT (MiniLM's tokenizer) with its longest texts: 128 tokens, 20 buckets."""
    enc = embedjax.load_pretrained(tiny_model, max_length=128)
    assert len(enc.tokenizer.buckets) >= 20
    return enc


def test_results_come_back_in_callers_order_whatever_the_batching(tiny, stsb_dev_sentences):
    texts = stsb_dev_sentences[:37] + ["", "x " * 400]  # empty and over-long texts too
    one_by_one = np.stack([tiny.encode(t) for t in texts])
    for batch_size in (1, 5, 64):
        np.testing.assert_allclose(tiny.encode(texts, batch_size=batch_size), one_by_one, atol=2e-6)


def test_long_text_is_truncated_to_max_length(minilm, st_minilm):
    text = "lorem ipsum dolor " * 300
    assert len(minilm.tokenizer.encode([text])[0].ids) == 256
    np.testing.assert_allclose(minilm.encode(text), st_minilm.encode(text, normalize_embeddings=True), atol=1e-5)


def test_empty_and_bad_inputs(minilm, st_minilm):
    assert minilm.encode([]).shape == (0, 384)
    assert minilm.encode([], dim=64).shape == (0, 64)
    single = minilm.encode("a single sentence")
    assert single.shape == (384,)
    np.testing.assert_allclose(minilm.encode(""), st_minilm.encode("", normalize_embeddings=True), atol=1e-5)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        minilm.encode(["fine", 3])
    with pytest.raises(TypeError, match=r"texts\[0\] is NoneType"):
        minilm.encode([None])
    with pytest.raises(ValueError, match="dim must be in 1..384"):
        minilm.encode(["x"], dim=0)
    with pytest.raises(ValueError, match="num_layers must be in 1..6"):
        minilm.encode(["x"], num_layers=7)
    with pytest.raises(ValueError, match="batch_size"):
        minilm.encode(["x"], batch_size=0)


def test_matryoshka_dim_and_layer_truncation(minilm, minilm_path, stsb_dev_sentences):
    texts = stsb_dev_sentences[:20]
    raw = minilm.encode(texts, normalize=False)
    cut = minilm.encode(texts, dim=64)
    want = raw[:, :64] / np.linalg.norm(raw[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, want, atol=1e-6)
    np.testing.assert_allclose(minilm.encode(texts, dim=64, normalize=False), raw[:, :64], atol=1e-6)

    # num_layers=k: mean-pooled k-th hidden state of the PyTorch BertModel.
    model = transformers.BertModel.from_pretrained(str(minilm_path)).eval()
    batch = minilm.tokenizer(texts)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(batch.input_ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64)),
                       output_hidden_states=True).hidden_states
    m = batch.attention_mask[..., None].astype(np.float32)
    for k in (1, 3):
        pooled = (hidden[k].numpy() * m).sum(1) / m.sum(1)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        np.testing.assert_allclose(minilm.encode(texts, num_layers=k), pooled, atol=1e-5)


def test_shapes_are_bucketed_so_compiles_are_bounded(tiny, monkeypatch, stsb_dev_sentences):
    shapes = set()
    real_pad = tokenize.Tokenizer.pad

    def spy(self, encodings, rows=None):
        batch = real_pad(self, encodings, rows)
        shapes.add(batch.input_ids.shape)
        return batch

    monkeypatch.setattr(tokenize.Tokenizer, "pad", spy)
    tiny.encode(stsb_dev_sentences[:1000], batch_size=32)
    assert all(t in tiny.tokenizer.buckets for _, t in shapes)
    assert all(r in (1, 2, 4, 8, 16, 32) for r, _ in shapes)
    assert len(shapes) <= len(tiny.tokenizer.buckets) + 6


def _copy_minilm(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


def test_named_prompts_and_include_prompt_match_sentence_transformers(minilm_path, tmp_path, stsb_dev_sentences):
    from sentence_transformers import SentenceTransformer

    d = _copy_minilm(minilm_path, tmp_path / "m")
    (d / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "doc": "passage: "}, "default_prompt_name": None}))
    pool_cfg = json.loads((d / "1_Pooling" / "config.json").read_text())
    (d / "1_Pooling" / "config.json").write_text(json.dumps({**pool_cfg, "include_prompt": False}))
    enc = embedjax.load_pretrained(d)
    st = SentenceTransformer(str(d), device="cpu")
    texts = stsb_dev_sentences[:16]
    assert enc.prompts["query"] == "query: " and not enc.include_prompt
    ours = enc.encode(texts, prompt_name="query")
    np.testing.assert_allclose(ours, enc.encode(texts, prompt="query: "), atol=1e-6)
    np.testing.assert_allclose(ours, st.encode(texts, prompt_name="query", normalize_embeddings=True), atol=1e-5)
    assert np.abs(ours - enc.encode(texts)).max() > 1e-3  # the prompt changes the tokens attended
    with pytest.raises(KeyError, match="'nope' not in"):
        enc.encode(texts, prompt_name="nope")


def test_checkpoint_pooling_config_is_the_default(minilm_path, tmp_path, stsb_dev_sentences):
    from sentence_transformers import SentenceTransformer

    d = _copy_minilm(minilm_path, tmp_path / "cls")
    (d / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    enc = embedjax.load_pretrained(d)
    assert enc.pooling == "cls"
    texts = stsb_dev_sentences[:8]
    ref = SentenceTransformer(str(d), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(enc.encode(texts), ref, atol=1e-5)
    assert embedjax.load_pretrained(d, pooling="max", max_length=64).max_length == 64
    with pytest.raises(ValueError, match="unknown pooling"):
        embedjax.load_pretrained(d, pooling="median")
    with pytest.raises(ValueError, match="max_length must be in 1..512"):
        embedjax.load_pretrained(d, max_length=1000)


def test_encode_reads_the_layers_as_views_of_the_stack(minilm, stsb_dev_sentences):
    """On CPU ``encode`` passes each layer's weights as its own array (no weight copy in any compiled
    call) sharing the stacked params' memory; the embeddings are the stacked program's."""
    from embedjax import sharding
    from embedjax.embed import embed_jit

    stack = minilm.params["layers"]["mlp"]["up"]["kernel"]
    for mesh in (None, sharding.local_mesh()):  # one device, and 8 with the params replicated
        layers = minilm._inference_params(mesh)["layers"]
        assert isinstance(layers, tuple) and len(layers) == minilm.cfg.num_layers == stack.shape[0]
        view = layers[2]["mlp"]["up"]["kernel"]
        assert view.shape == stack.shape[1:]
        if mesh is None:  # the same bytes, not a copy
            assert view.unsafe_buffer_pointer() == stack.unsafe_buffer_pointer() + 2 * view.nbytes
    texts = stsb_dev_sentences[:16]
    b = minilm.tokenizer(texts)
    args = (minilm.cfg, b.input_ids, b.attention_mask, b.token_type_ids, b.attention_mask)
    kw = dict(pooling=minilm.pooling, normalize=True, dim=None, num_layers=None)
    stacked = np.asarray(embed_jit(minilm.params, *args, **kw))  # the computation before: lax.scan over the stack
    np.testing.assert_allclose(np.asarray(embed_jit(minilm._inference_params(None), *args, **kw)), stacked, atol=1e-6)
    np.testing.assert_allclose(minilm.encode(texts), stacked[: len(texts)], atol=1e-5)
    kw["num_layers"] = 3  # depth truncation slices the tuple
    np.testing.assert_allclose(np.asarray(embed_jit(minilm._inference_params(None), *args, **kw)),
                               np.asarray(embed_jit(minilm.params, *args, **kw)), atol=1e-6)
    # every layer's embedding (the layer loop's stacked outputs) from a tuple of layers, copied here
    from embedjax.encoders import layers

    copied = {**minilm.params, "layers": layers.unstacked(minilm.params["layers"], minilm.cfg.num_layers)}
    per_layer = jax.jit(lambda p: embedjax.embed(p, minilm.cfg, b.input_ids, b.attention_mask, per_layer=True))
    np.testing.assert_allclose(np.asarray(per_layer(copied)), np.asarray(per_layer(minilm.params)), atol=1e-6)


def test_public_embed_is_the_function_behind_encode(minilm, stsb_dev_sentences):
    texts = stsb_dev_sentences[:4]
    batch = minilm.tokenizer(texts)
    z = embedjax.embed(minilm.params, minilm.cfg, batch.input_ids, batch.attention_mask, pooling=minilm.pooling)
    np.testing.assert_allclose(np.asarray(z), minilm.encode(texts), atol=1e-6)
