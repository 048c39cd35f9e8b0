"""Encoder parity against the PyTorch reference models (transformers' BertModel & co.)."""

import jax
import numpy as np
import pytest
import torch
import transformers

from embedjax import hf
from embedjax.encoders import bert

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

TINY = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)
ARCHS = {
    "bert": (transformers.BertConfig, transformers.BertModel, dict(type_vocab_size=2, pad_token_id=0)),
    "roberta": (transformers.RobertaConfig, transformers.RobertaModel,
                dict(type_vocab_size=1, pad_token_id=1, max_position_embeddings=66)),
    "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel,
                    dict(type_vocab_size=1, pad_token_id=1, max_position_embeddings=66, hidden_act="gelu_new")),
}


def make_tiny(arch: str, directory, **kw):
    """A randomly initialised PyTorch model of ``arch`` saved as safetensors in ``directory``."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, **extra, **kw}), add_pooling_layer=True).eval()
    # Random (not default 1/0) layer norms so that a swapped scale/bias would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


def random_batch(rng, cfg, batch=5, length=12):
    """Ids avoiding the pad id, right padding with the pad id, ragged lengths (one full row)."""
    lengths = rng.integers(2, length + 1, batch)
    lengths[0] = length
    ids = rng.integers(cfg.pad_token_id + 1, cfg.vocab_size, (batch, length))
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask > 0, ids, cfg.pad_token_id)
    types = np.zeros_like(ids) if cfg.type_vocab_size < 2 else rng.integers(0, 2, ids.shape) * mask
    return ids, mask, types


def torch_hidden(model, ids, mask, types):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
            output_hidden_states=True,
        )
    return np.stack([h.numpy() for h in out.hidden_states])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_tiny_checkpoint_every_layer_matches_pytorch(arch, tmp_path):
    model = make_tiny(arch, tmp_path)
    params, cfg, _ = hf.load_checkpoint(tmp_path)
    assert cfg.model_type == arch and cfg.num_layers == 3
    ids, mask, types = random_batch(np.random.default_rng(0), cfg)
    want = torch_hidden(model, ids, mask, types)
    got = np.asarray(bert.apply(params, cfg, ids, mask, token_type_ids=types))
    assert got.shape == want.shape == (4, 5, 12, 32)
    valid = mask[None, :, :, None] > 0  # padded positions are don't-care in both
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-5, rtol=0)

    for k in (1, 2):
        truncated = np.asarray(bert.apply(params, cfg, ids, mask, token_type_ids=types, num_layers=k))
        assert truncated.shape[0] == k + 1
        np.testing.assert_allclose(np.where(valid[0], truncated[k], 0), np.where(valid[0], want[k], 0), atol=2e-5)
        last = np.asarray(bert.apply(params, cfg, ids, mask, token_type_ids=types, num_layers=k, all_layers=False))
        np.testing.assert_allclose(last, truncated[k], atol=1e-6)


def scan_lengths(jaxpr) -> list[int]:
    return [eqn.params["length"] for eqn in jaxpr.eqns if eqn.primitive.name == "scan"]


def test_num_layers_really_skips_compute():
    cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=6, num_heads=2, intermediate_size=32,
                          max_position_embeddings=16)
    params = bert.init(cfg, jax.random.key(0))
    ids = np.ones((2, 8), np.int32)
    for k in (1, 4, 6):
        jaxpr = jax.make_jaxpr(lambda p: bert.apply(p, cfg, ids, ids, num_layers=k))(params)
        assert scan_lengths(jaxpr.jaxpr) == [k]  # the loop runs k layers, not 6
    with pytest.raises(ValueError, match="num_layers must be in 1..6"):
        bert.apply(params, cfg, ids, ids, num_layers=7)


def test_dropout_is_keyed_and_off_by_default():
    cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                          max_position_embeddings=16, hidden_dropout=0.3, attention_dropout=0.3)
    params = bert.init(cfg, jax.random.key(0))
    ids = np.arange(16, dtype=np.int32).reshape(2, 8) + 1
    mask = np.ones_like(ids)
    plain = np.asarray(bert.apply(params, cfg, ids, mask, all_layers=False))
    np.testing.assert_array_equal(plain, np.asarray(bert.apply(params, cfg, ids, mask, all_layers=False)))
    a = np.asarray(bert.apply(params, cfg, ids, mask, dropout_key=jax.random.key(1), all_layers=False))
    b = np.asarray(bert.apply(params, cfg, ids, mask, dropout_key=jax.random.key(1), all_layers=False))
    c = np.asarray(bert.apply(params, cfg, ids, mask, dropout_key=jax.random.key(2), all_layers=False))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - plain).max() > 1e-2 and np.abs(a - c).max() > 1e-2


def test_bfloat16_compute_keeps_float32_params(tmp_path):
    make_tiny("bert", tmp_path)
    params, cfg32, _ = hf.load_checkpoint(tmp_path)
    _, cfg16, _ = hf.load_checkpoint(tmp_path, dtype="bfloat16")
    ids, mask, types = random_batch(np.random.default_rng(1), cfg32)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
    h32 = np.asarray(bert.apply(params, cfg32, ids, mask, all_layers=False))
    h16 = bert.apply(params, cfg16, ids, mask, all_layers=False)
    assert h16.dtype == np.dtype("bfloat16")
    cos = (h32 * np.asarray(h16, np.float32)).sum(-1) / (
        np.linalg.norm(h32, axis=-1) * np.linalg.norm(np.asarray(h16, np.float32), axis=-1))
    assert cos[mask > 0].min() > 0.99


def test_minilm_every_hidden_state_matches_bertmodel(minilm_path, minilm, stsb_dev_sentences):
    model = transformers.BertModel.from_pretrained(str(minilm_path), attn_implementation="eager").eval()
    texts = stsb_dev_sentences[:48] + ["", "a much longer sentence " * 12]
    batch = minilm.tokenizer(texts)
    ids, mask, types = (np.asarray(x, np.int64) for x in (batch.input_ids, batch.attention_mask, batch.token_type_ids))
    want = torch_hidden(model, ids, mask, types)
    got = np.asarray(bert.apply(minilm.params, minilm.cfg, ids, mask, token_type_ids=types))
    valid = mask[None, :, :, None] > 0
    diff = np.abs(np.where(valid, got - want, 0)).max()
    assert got.shape == want.shape == (7, 50, ids.shape[1], 384)
    assert diff <= 1e-5, f"max |jax - torch| over all 7 hidden states = {diff}"
