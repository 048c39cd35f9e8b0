"""Pooling and prompts for decoder-LLM embedders: the appended EOS with last-token pooling,
NV-Embed's latent-attention pooling (arXiv:2405.17428) and instruction prompts excluded from
pooling in training, each against an independent NumPy reference written here."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, processors

import embedjax
from embedjax import export, pooling, tokenize
from embedjax.data import pipeline
from embedjax.embed import embed, embed_packed
from embedjax.encoders import registry
from embedjax.train.objective import Objective, embed_batch

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

@pytest.fixture(scope="module")
def tiny(tiny_model):
    """The random 2-layer BERT of tests/conftest.py (MiniLM's tokenizer): fast un-jitted forward passes."""
    return embedjax.load_pretrained(tiny_model)


WORDS = ["<pad>", "<unk>", "<s>", "</s>", "instruct", ":", "query", "the", "cat", "sat", "on", "mat", "a", "dog"]
VOCAB = {w: i for i, w in enumerate(WORDS)}
PAD, BOS, EOS = VOCAB["<pad>"], VOCAB["<s>"], VOCAB["</s>"]


def word_tokenizer(template: str | None = None) -> HFTokenizer:
    """A WordLevel tokenizer; ``template`` e.g. "<s> $A </s>" adds a post-processor."""
    tok = HFTokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    if template:
        specials = [(t, VOCAB[t]) for t in ("<s>", "</s>") if t in template.split()]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    return tok


# ------------------------------------------------------------------ EOS append + last token


def test_eos_is_appended_once_and_truncation_leaves_room():
    bare = tokenize.Tokenizer(word_tokenizer(), 6, PAD, buckets=(4, 8), eos_token_id=EOS)
    assert bare.appends_eos
    encs = bare.encode(["the cat sat", "the cat sat on the mat a dog", ""])
    assert [e.ids for e in encs] == [[7, 8, 9, EOS], [7, 8, 9, 10, 7, EOS], [EOS]]
    assert [e.special_tokens_mask[-1] for e in encs] == [1, 1, 1]

    # A post-processor that already ends texts with the EOS: nothing appended, no double EOS.
    templ = tokenize.Tokenizer(word_tokenizer("<s> $A </s>"), 6, PAD, buckets=(4, 8), eos_token_id=EOS)
    assert not templ.appends_eos
    assert [e.ids for e in templ.encode(["the cat sat", "the cat sat on the mat a dog"])] == [
        [BOS, 7, 8, 9, EOS], [BOS, 7, 8, 9, 10, EOS]]
    # BOS only (Llama-style): the EOS goes after the text, the BOS stays first.
    bos = tokenize.Tokenizer(word_tokenizer("<s> $A"), 6, PAD, buckets=(4, 8), eos_token_id=EOS)
    assert bos.appends_eos
    assert bos.encode(["the cat sat on the mat a dog"])[0].ids == [BOS, 7, 8, 9, 10, EOS]
    # replace keeps the option (the training tokenizer).
    again = bare.replace(buckets=(8,))
    assert again.appends_eos and again.buckets == (6,) and again.encode(["a dog"])[0].ids == [12, 13, EOS]

    # pad and pack carry the EOS.
    batch = bare.pad(encs, rows=4)
    assert batch.input_ids.shape == (4, 6)  # buckets are capped at max_length
    np.testing.assert_array_equal(batch.input_ids[0], [7, 8, 9, EOS, PAD, PAD])
    packed = bare.pack(encs, length=8)
    for i, e in enumerate(encs):
        np.testing.assert_array_equal(packed.input_ids[packed.segment_ids == i + 1], e.ids)


def numpy_last(hidden, ids):
    """The state at the (last) EOS of each row: an index search, not a mask reduction."""
    return np.stack([hidden[b, np.nonzero(ids[b] == EOS)[0][-1]] for b in range(len(ids))])


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pools_the_appended_eos(side):
    tok = tokenize.Tokenizer(word_tokenizer("<s> $A"), 8, PAD, buckets=(8,), eos_token_id=EOS)
    batch = tok(["the cat sat", "a dog", "the cat sat on the mat a dog", ""])
    ids, mask = batch.input_ids, batch.attention_mask
    if side == "left":  # move every row's tokens to the end
        n = mask.sum(1)
        ids = np.stack([np.roll(r, len(r) - k) for r, k in zip(ids, n)])
        mask = np.stack([np.roll(r, len(r) - k) for r, k in zip(mask, n)])
        assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
    hidden = np.random.default_rng(0).normal(size=(*ids.shape, 5)).astype(np.float32)
    got = np.asarray(pooling.pool(hidden, mask, "last_token"))
    np.testing.assert_array_equal(got, numpy_last(hidden, ids))


def test_load_pretrained_appends_the_config_eos_for_last_token(tiny_model, tmp_path):
    """BERT's tokenizer ends with [SEP]: named as the EOS nothing is appended; another id is."""
    def checkpoint(eos):
        d = tmp_path / f"eos{eos}"
        if d.is_dir():
            return d
        shutil.copytree(tiny_model, d)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))
        return d

    sep = embedjax.load_pretrained(tiny_model).tokenizer.encode(["a"])[0].ids[-1]
    assert not embedjax.load_pretrained(checkpoint(sep), pooling="last_token").tokenizer.appends_eos
    enc = embedjax.load_pretrained(checkpoint(1), pooling="last_token")
    assert enc.tokenizer.appends_eos and enc.tokenizer.encode(["a b"])[0].ids[-2:] == [sep, 1]
    assert not embedjax.load_pretrained(checkpoint(1)).tokenizer.appends_eos  # mean pooling: as is
    # The export records the appended id (and refuses sentence-transformers, whose tokenizer would not).
    with pytest.raises(ValueError, match="appends an EOS"):
        export.save_pretrained(enc, tmp_path / "out")
    out = export.save_pretrained(enc, tmp_path / "out", sentence_transformers=False)
    assert json.loads((out / "embedjax_config.json").read_text())["append_eos_token_id"] == 1
    back = embedjax.load_pretrained(out)
    assert back.tokenizer.appends_eos and back.tokenizer.eos_token_id == 1
    np.testing.assert_array_equal(back.encode(["a b", "c"]), enc.encode(["a b", "c"]))


# ------------------------------------------------------------------ latent attention


def numpy_latent_attention(p, hidden, mask):
    """Per text, per token, per head loops: pre-LayerNorm cross-attention onto the latents with a
    residual, pre-LayerNorm (GE)GELU MLP with a residual, then the mean over masked-in tokens."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    erf = np.vectorize(math.erf)
    gelu = lambda x: 0.5 * x * (1 + erf(x / math.sqrt(2)))  # noqa: E731

    def ln(x, q):
        return (x - x.mean()) / math.sqrt(x.var() + 1e-5) * q["scale"] + q["bias"]

    latents = np.stack([ln(l, p["norm_kv"]) for l in p["latents"]])
    heads, head_dim = p["q"]["kernel"].shape[1:]
    mlp_dim = p["mlp_out"]["kernel"].shape[0]
    out = []
    for b in range(hidden.shape[0]):
        states = []
        for t in range(hidden.shape[1]):
            if not mask[b, t]:
                continue
            h = hidden[b, t].astype(np.float64)
            hn = ln(h, p["norm_q"])
            att = np.zeros_like(h)
            for n in range(heads):
                q = hn @ p["q"]["kernel"][:, n]
                k = latents @ p["k"]["kernel"][:, n]
                v = latents @ p["v"]["kernel"][:, n]
                s = k @ q / math.sqrt(head_dim)
                w = np.exp(s - s.max())
                att += (w / w.sum()) @ v @ p["o"]["kernel"][n]
            x = h + att
            u = ln(x, p["norm_mlp"]) @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"]
            u = u[:mlp_dim] * gelu(u[mlp_dim:]) if len(u) == 2 * mlp_dim else gelu(u)
            states.append(x + u @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"])
        out.append(np.mean(states, axis=0))
    return np.stack(out)


def small_pooler(hidden, gated, seed=0):
    p = pooling.init_latent_attention(jax.random.key(seed), hidden, num_latents=6, num_heads=2, mlp_dim=10,
                                      gated=gated)
    # non-trivial norms and biases, so the reference checks where each one applies
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), p)


@pytest.mark.parametrize("gated", [True, False], ids=["geglu", "gelu"])
def test_latent_attention_matches_numpy_and_ignores_masked_tokens(gated):
    rng = np.random.default_rng(1)
    params = small_pooler(8, gated)
    assert params["q"]["kernel"].shape == (8, 2, 4) and params["mlp_in"]["kernel"].shape == (8, 20 if gated else 10)
    hidden = rng.normal(size=(3, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]], np.int32)  # right, full, left + gap
    pool = jax.jit(lambda h, p: pooling.pool(h, mask, "latent_attention", params=p))
    got = np.asarray(pool(hidden, params))
    np.testing.assert_allclose(got, numpy_latent_attention(params, hidden, mask), rtol=2e-5, atol=2e-5)
    noisy = np.where(mask[..., None] > 0, hidden, 100 * rng.normal(size=hidden.shape).astype(np.float32))
    np.testing.assert_allclose(np.asarray(pool(noisy, params)), got, rtol=1e-6, atol=1e-6)
    # a stack of layers: every layer through the same pooler
    stack = np.stack([hidden, hidden[::-1]])
    got2 = np.asarray(pool(stack, params))
    np.testing.assert_allclose(got2[1], numpy_latent_attention(params, hidden[::-1], mask), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="needs its params"):
        pooling.pool(hidden, mask, "latent_attention")


def test_latent_attention_packed_equals_padded(tiny):
    minilm = tiny
    params = {**minilm.params, "pooler": small_pooler(minilm.cfg.hidden_size, True)}
    texts = ["a short one", "the cat sat on the mat while the dog slept", "x", "two words"]
    encs = minilm.tokenizer.encode(texts)
    padded, packed = minilm.tokenizer.pad(encs), minilm.tokenizer.pack(encs, length=32)
    assert packed.input_ids.shape[0] < len(texts)
    want = jax.jit(lambda p: embed(p, minilm.cfg, padded.input_ids, padded.attention_mask,
                                   token_type_ids=padded.token_type_ids, pooling="latent_attention"))(params)
    got = jax.jit(lambda p: embed_packed(p, minilm.cfg, packed.input_ids, packed.segment_ids, packed.positions,
                                         num_texts=len(texts), token_type_ids=packed.token_type_ids,
                                         pooling="latent_attention"))(params)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_latent_attention_export_round_trip(tiny_model, tmp_path):
    pooler_init = dict(num_latents=16, num_heads=4, mlp_dim=48)
    enc = embedjax.load_pretrained(tiny_model, pooling="latent_attention", pooler_init=pooler_init, seed=3)
    assert enc.params["pooler"]["latents"].shape == (16, enc.cfg.hidden_size)
    trained = jax.tree.map(lambda x: x + 0.01, enc.params)  # as after training: pooler leaves moved too
    enc = dataclasses.replace(enc, params=trained)
    with pytest.raises(ValueError, match="latent_attention"):
        export.save_pretrained(enc, tmp_path / "out")
    out = export.save_pretrained(enc, tmp_path / "out", sentence_transformers=False)
    record = json.loads((out / "embedjax_config.json").read_text())
    assert record["pooler"] == {"type": "latent_attention", "hidden": enc.cfg.hidden_size, "num_latents": 16,
                                "num_heads": 4, "head_dim": enc.cfg.hidden_size // 4, "mlp_dim": 48, "gated": True}
    assert not (out / "modules.json").exists()
    back = embedjax.load_pretrained(out)
    assert back.pooling == "latent_attention"
    jax.tree.map(np.testing.assert_array_equal, back.params["pooler"], trained["pooler"])
    texts = ["a query about cats", "b", "the mat"]
    np.testing.assert_array_equal(back.encode(texts), enc.encode(texts))
    # the backbone's file holds no pooler tensor
    from safetensors.numpy import load_file
    assert not any("latents" in k for k in load_file(str(out / "model.safetensors")))


# ------------------------------------------------------------------ prompts excluded from pooling


def numpy_mean(hidden, mask):
    return np.stack([hidden[b][mask[b] > 0].mean(0) for b in range(len(hidden))])


def test_prompt_length_counts_like_sentence_transformers():
    bare = tokenize.Tokenizer(word_tokenizer(), 16, PAD, buckets=(16,))
    assert bare.prompt_length("instruct : query :") == 4  # no special token: every token is the prompt's
    assert bare.prompt_length("") == 0
    eos = tokenize.Tokenizer(word_tokenizer(), 16, PAD, buckets=(16,), eos_token_id=EOS)
    assert eos.prompt_length("instruct : query :") == 4  # the appended EOS closes the prompt alone: not counted
    templ = tokenize.Tokenizer(word_tokenizer("<s> $A </s>"), 16, PAD, buckets=(16,))
    assert templ.prompt_length("instruct : query :") == 5  # <s> is the prompt's, </s> is not


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_prompt_is_excluded_from_pooling(tiny, packed):
    minilm = tiny
    records = [{"text_a": "the cat sat", "text_b": "a cat was sitting"},
               {"text_a": "where is the dog", "text_b": "the dog is in the garden today"}]
    prompts = pipeline.side_prompts({"a": "Instruct: {task}\nQuery: "}, task="find the answer")
    assert prompts == {"a": "Instruct: find the answer\nQuery: ", "b": "", "n": ""}
    packing = pipeline.Packing(length=32) if packed else None
    batch = pipeline.collate(list(enumerate(records)), minilm.tokenizer, 2, ("text_a", "text_b"),
                             packing=packing, prompts=prompts, include_prompt=False)
    assert (batch.packed is not None and batch.packed.pool is not None) == packed
    assert (batch.a.pool is not None) != packed and batch.b.pool is None
    za, zb, _ = jax.jit(lambda b: embed_batch(minilm.params, minilm.cfg, Objective(pooling="mean", dropout=False),
                                              b, jax.random.key(0)))(batch)

    # By hand: token states of "prompt + text" alone, mean over the tokens after the prompt.
    skip = len(minilm.tokenizer.backend.encode(prompts["a"]).ids) - 1  # [CLS] + prompt words, not [SEP]
    apply = jax.jit(lambda ids: registry.of(minilm.cfg).apply(minilm.params, minilm.cfg, ids, jnp.ones_like(ids),
                                                              token_type_ids=jnp.zeros_like(ids), all_layers=False))
    for i, r in enumerate(records):
        ids = np.asarray([minilm.tokenizer.backend.encode(prompts["a"] + r["text_a"]).ids])
        hidden = np.asarray(apply(ids))
        mask = np.ones_like(ids)
        mask[:, :skip] = 0
        np.testing.assert_allclose(np.asarray(za[i]), numpy_mean(hidden, mask)[0], atol=2e-5)
        ids = np.asarray([minilm.tokenizer.backend.encode(r["text_b"]).ids])
        hidden = np.asarray(apply(ids))
        np.testing.assert_allclose(np.asarray(zb[i]), hidden[0].mean(0), atol=2e-5)


def test_encoder_include_prompt_false_matches_sentence_transformers(minilm, st_minilm):
    texts = ["A man is playing a guitar.", "what is the capital of France?", ""]
    prompt = "query: "
    enc = dataclasses.replace(minilm, include_prompt=False)
    pool_module = next(m for m in st_minilm if type(m).__name__ == "Pooling")
    old = pool_module.include_prompt
    pool_module.include_prompt = False
    try:
        want = st_minilm.encode(texts, prompt=prompt)
    finally:
        pool_module.include_prompt = old
    got = enc.encode(texts, prompt=prompt)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert not np.allclose(got, minilm.encode(texts, prompt=prompt), atol=1e-3)  # the prompt did matter
