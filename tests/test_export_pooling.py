"""One pooling per model: export -> reload (embedjax and sentence-transformers) keeps every pooling mode,
the Normalize setting and include_prompt; references are sentence-transformers and NumPy pooling."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import embedjax
from embedjax import export, hf, pooling

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

TEXTS = ["A man is playing a flute.", "Two dogs run on the beach while a child watches them closely.", "",
         "short", "query: where is the flute?"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """The random 2-layer BERT of tests/conftest.py (MiniLM's tokenizer and ST files: mean pooling + Normalize)."""
    return tiny_model


def sentence_transformer(path):
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    return SentenceTransformer(str(path), device="cpu")


def numpy_pool(hidden, mask, mode):
    """Pooling written from the definitions, one text at a time (right padding, float64)."""
    out = []
    for h, m in zip(hidden.astype(np.float64), mask):
        n = int(m.sum())
        real = h[:n]
        w = np.arange(1, n + 1, dtype=np.float64)[:, None]
        out.append({
            "cls": real[0],
            "mean": real.mean(0),
            "max": real.max(0),
            "cls_avg": (real[0] + real.mean(0)) / 2,
            "last_token": real[-1],
            "weighted_mean": (real * w).sum(0) / w.sum(),
            "mean_sqrt_len": real.sum(0) / np.sqrt(n),
        }[mode])
    return np.stack(out)


def torch_reference(directory, encoder, texts, mode, normalize):
    """transformers' BertModel on the exported directory + NumPy pooling (+ L2 normalisation)."""
    model = transformers.AutoModel.from_pretrained(str(directory), add_pooling_layer=False).eval()
    batch = encoder.tokenizer(texts)
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(batch.input_ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64))).last_hidden_state
    z = numpy_pool(hidden.numpy()[: len(texts)], batch.attention_mask[: len(texts)], mode)
    return z / np.linalg.norm(z, axis=1, keepdims=True) if normalize else z


def trained_like(encoder, mode):
    """The encoder with perturbed params (what a run exports) and ``mode`` pooling."""
    import dataclasses

    params = jax.tree.map(lambda x: x + 0.01 * np.sign(np.asarray(x) + 0.5), encoder.params)
    return dataclasses.replace(encoder, params=params, pooling=mode)


# ------------------------------------------------------------------ every mode: export -> reload


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("mode", pooling.FIXED_MODES)
def test_every_mode_reloads_with_its_pooling_and_matches_sentence_transformers(tiny, tmp_path, mode, normalize):
    enc = trained_like(embedjax.load_pretrained(tiny), mode)
    out = export.save_pretrained(enc, tmp_path / "out", normalize=normalize)

    back = embedjax.load_pretrained(out)  # no pooling argument: the export says
    assert (back.pooling, back.normalize, back.include_prompt) == (mode, normalize, True)
    ours = back.encode(TEXTS)
    np.testing.assert_array_equal(ours, enc.encode(TEXTS, normalize=normalize))  # the encoder, exactly
    np.testing.assert_allclose(ours, torch_reference(out, back, TEXTS, mode, normalize), atol=1e-5)
    norms = np.linalg.norm(ours, axis=1)
    assert np.allclose(norms, 1, atol=1e-5) if normalize else not np.allclose(norms, 1, atol=1e-2)

    # SentenceTransformer reads the same directory to the same embeddings, unit norm exactly when exported so.
    ref = sentence_transformer(out).encode(TEXTS)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_cls_avg_is_pooling_cls_mean_plus_an_averaging_dense(tiny, tmp_path):
    enc = trained_like(embedjax.load_pretrained(tiny), "cls_avg")
    out = export.save_pretrained(enc, tmp_path / "out", normalize=True)
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    st = sentence_transformer(out)
    assert st.get_embedding_dimension() == 32
    assert hf.read_sentence_transformers(out).pooling == "cls_avg"

    # Any other Dense is refused, and Pooling(cls, mean) alone (a 2H concatenation) too.
    weight = load_file(str(out / "2_Dense" / "model.safetensors"))["linear.weight"]
    weight[0, 0] += 1e-3
    save_file({"linear.weight": weight}, str(out / "2_Dense" / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match="Dense' is not supported"):
        hf.read_sentence_transformers(out)
    (out / "modules.json").write_text(json.dumps([m for m in modules if m["path"] != "2_Dense"]))
    with pytest.raises(ValueError, match="concatenated"):
        hf.read_sentence_transformers(out)


# ------------------------------------------------------------------ precedence and the real model


def test_pooling_precedence_argument_record_sentence_transformers_mean(tiny, tmp_path):
    enc = embedjax.load_pretrained(tiny, pooling="cls")
    out = export.save_pretrained(enc, tmp_path / "out")
    pool_cfg = out / "1_Pooling" / "config.json"
    pool_cfg.write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode": "max"}))
    assert embedjax.load_pretrained(out).pooling == "cls"  # the embedjax record first
    assert embedjax.load_pretrained(out, pooling="last_token").pooling == "last_token"  # an argument above all
    (out / hf.EMBEDJAX_CONFIG).unlink()
    assert embedjax.load_pretrained(out).pooling == "max"  # then sentence-transformers' Pooling
    (out / "modules.json").unlink()
    plain = embedjax.load_pretrained(out)
    assert (plain.pooling, plain.normalize) == ("mean", False)  # then the defaults

    (out / hf.EMBEDJAX_CONFIG).write_text(json.dumps({"pooling": "median"}))
    with pytest.raises(hf.CheckpointError, match="pooling 'median' is not one of"):
        embedjax.load_pretrained(out)
    (out / hf.EMBEDJAX_CONFIG).write_text(json.dumps({"pooling": "cls", "normalize": "yes"}))
    with pytest.raises(hf.CheckpointError, match="normalize must be true or false"):
        embedjax.load_pretrained(out)


def test_minilm_exported_with_cls_reloads_as_cls(minilm, minilm_path, tmp_path, stsb_dev_sentences):
    import dataclasses

    enc = dataclasses.replace(minilm, pooling="cls")
    out = export.save_pretrained(enc, tmp_path / "cls")
    back = embedjax.load_pretrained(out)
    assert back.pooling == "cls" and back.normalize
    texts = stsb_dev_sentences[:16]
    ours = back.encode(texts)
    np.testing.assert_allclose(ours, enc.encode(texts), atol=1e-6)
    np.testing.assert_allclose(ours, sentence_transformer(out).encode(texts), atol=1e-5)
    assert np.abs(ours - minilm.encode(texts)).max() > 1e-2  # cls is not MiniLM's mean


# ------------------------------------------------------------------ Normalize is the checkpoint's


@pytest.mark.parametrize("with_normalize", [True, False])
def test_encode_default_follows_the_normalize_module_like_sentence_transformers(tiny, tmp_path, with_normalize):
    d = tmp_path / "m"
    shutil.copytree(tiny, d)
    modules = json.loads((d / "modules.json").read_text())
    if not with_normalize:
        (d / "modules.json").write_text(json.dumps([m for m in modules if not m["type"].endswith("Normalize")]))
    enc = embedjax.load_pretrained(d)
    assert enc.normalize is with_normalize
    ours = enc.encode(TEXTS)
    ref = sentence_transformer(d).encode(TEXTS)  # not normalize_embeddings=True: the checkpoint decides
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5) is with_normalize
    # Explicit arguments still win, either way.
    raw = enc.encode(TEXTS, normalize=False)
    np.testing.assert_allclose(enc.encode(TEXTS, normalize=True), raw / np.linalg.norm(raw, axis=1, keepdims=True),
                               atol=1e-6)
    # The export keeps the setting when not told otherwise, and writes Normalize when told so.
    out = export.save_pretrained(enc, tmp_path / "out")
    assert embedjax.load_pretrained(out).normalize is with_normalize
    assert any(m["type"].endswith("Normalize") for m in json.loads((out / "modules.json").read_text())) is with_normalize
    out = export.save_pretrained(enc, tmp_path / "out", normalize=True)
    np.testing.assert_allclose(sentence_transformer(out).encode(TEXTS), enc.encode(TEXTS, normalize=True), atol=1e-5)


def test_sts_cosine_is_unaffected_by_the_normalize_setting(tiny):
    import dataclasses

    from embedjax.data.readers import ScoredPair
    from embedjax.eval import STSEvaluator

    pairs = [ScoredPair(a, b, float(i)) for i, (a, b) in enumerate(zip(TEXTS, TEXTS[1:] + TEXTS[:1]))]
    enc = embedjax.load_pretrained(tiny)
    evaluator = STSEvaluator(pairs, "dev", metrics=("cosine", "dot"))
    unit, raw = evaluator(dataclasses.replace(enc, normalize=True)), evaluator(dataclasses.replace(enc, normalize=False))
    assert unit["dev/cosine_spearman"] == pytest.approx(raw["dev/cosine_spearman"], abs=1e-6)
    # the embeddings are scored as the checkpoint gives them (as sentence-transformers does): dot is not unit-norm
    assert unit["dev/dot_spearman"] == pytest.approx(unit["dev/cosine_spearman"], abs=1e-6)
    assert raw["dev/dot_pearson"] != pytest.approx(raw["dev/cosine_pearson"], abs=1e-3)


# ------------------------------------------------------------------ prompts and what ST cannot express


@pytest.mark.parametrize("mode", ["cls", "cls_avg", "mean", "last_token"])
def test_include_prompt_false_matches_sentence_transformers(tiny, tmp_path, mode):
    enc = trained_like(embedjax.load_pretrained(tiny), mode)
    import dataclasses

    enc = dataclasses.replace(enc, include_prompt=False, prompts={"query": "query: "})
    out = export.save_pretrained(enc, tmp_path / "out")
    back = embedjax.load_pretrained(out)
    assert not back.include_prompt and back.pooling == mode
    ours = back.encode(TEXTS[:4], prompt_name="query")
    np.testing.assert_allclose(ours, sentence_transformer(out).encode(TEXTS[:4], prompt_name="query"), atol=1e-5)
    if mode != "last_token":  # the last token is the same either way
        assert np.abs(ours - back.encode(["query: " + t for t in TEXTS[:4]])).max() > 1e-3  # the prompt is excluded


def test_a_mode_sentence_transformers_cannot_express_is_refused_or_exported_for_embedjax_only(
        tiny, tmp_path, caplog):
    import dataclasses

    enc = dataclasses.replace(trained_like(embedjax.load_pretrained(tiny), "weighted_mean"), include_prompt=False,
                              prompts={"query": "query: "})
    out = tmp_path / "out"
    export.save_pretrained(dataclasses.replace(enc, include_prompt=True), out)  # an earlier, ST-loadable export
    assert (out / "modules.json").is_file()
    with pytest.raises(ValueError, match="weighted_mean with include_prompt=False.*sentence_transformers=False"):
        export.save_pretrained(enc, out)
    with caplog.at_level(logging.WARNING, logger="embedjax.export"):
        export.save_pretrained(enc, out, sentence_transformers=False)
    assert "cannot load it as-is" in caplog.text
    assert not (out / "modules.json").exists()  # the earlier one described another model
    back = embedjax.load_pretrained(out)
    assert (back.pooling, back.include_prompt, back.normalize) == ("weighted_mean", False, True)
    np.testing.assert_array_equal(back.encode(TEXTS, prompt_name="query"), enc.encode(TEXTS, prompt_name="query"))

    # Why it is refused: sentence-transformers weights the text tokens from the prompt's start, embedjax from 1.
    st_dir = tmp_path / "st"
    export.save_pretrained(dataclasses.replace(enc, include_prompt=True), st_dir)
    pool_cfg = json.loads((st_dir / "1_Pooling" / "config.json").read_text())
    (st_dir / "1_Pooling" / "config.json").write_text(json.dumps({**pool_cfg, "include_prompt": False}))
    (st_dir / hf.EMBEDJAX_CONFIG).unlink()
    ours = embedjax.load_pretrained(st_dir).encode(TEXTS[:4], prompt_name="query")
    ref = sentence_transformer(st_dir).encode(TEXTS[:4], prompt_name="query")
    assert np.abs(ours - ref).max() > 1e-4


def test_cls_reads_the_first_pooled_token_as_sentence_transformers():
    """Left padding: the first real token, not position 0 (sentence-transformers' argmax of the mask)."""
    from sentence_transformers.models import Pooling

    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 6, 4)).astype(np.float32)
    m = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]], np.int64)
    for mode, st_mode in (("cls", "cls"), ("last_token", "lasttoken"), ("weighted_mean", "weightedmean"),
                          ("mean_sqrt_len", "mean_sqrt_len_tokens"), ("max", "max"), ("mean", "mean")):
        ref = Pooling(4, pooling_mode=st_mode)({"token_embeddings": torch.from_numpy(h),
                                                "attention_mask": torch.from_numpy(m)})["sentence_embedding"]
        np.testing.assert_allclose(np.asarray(pooling.pool(h, m, mode)), ref.numpy(), atol=1e-6, err_msg=mode)


def test_a_bidirectional_decoder_is_exported_for_embedjax_only(tmp_path):
    """LLM2Vec-style models run their decoder bidirectionally; transformers' AutoModel (and so
    SentenceTransformer) runs it causally, so the export must not claim sentence-transformers."""
    from embedjax import tiny

    path = tiny.write_random_checkpoint(tmp_path / "llama", "llama", texts=TEXTS * 4)
    bidirectional = embedjax.load_pretrained(path, pooling="mean", attention="bidirectional")
    with pytest.raises(ValueError, match="bidirectional attention"):
        export.save_pretrained(bidirectional, tmp_path / "bi")
    export.save_pretrained(bidirectional, tmp_path / "bi", sentence_transformers=False)
    assert not (tmp_path / "bi" / "modules.json").exists()
    back = embedjax.load_pretrained(tmp_path / "bi")
    assert back.cfg.attention == "bidirectional"
    np.testing.assert_allclose(back.encode(TEXTS), bidirectional.encode(TEXTS), atol=1e-6)
    # Why: the same weights exported causally load in sentence-transformers with other embeddings.
    causal = embedjax.load_pretrained(path, pooling="mean")
    export.save_pretrained(causal, tmp_path / "causal")
    ref = sentence_transformer(tmp_path / "causal").encode(TEXTS)
    np.testing.assert_allclose(ref, causal.encode(TEXTS), atol=1e-5)
    assert np.abs(ref - bidirectional.encode(TEXTS)).max() > 1e-3
