"""Decoder-LLM backbones (embedjax/encoders/decoder.py) against tiny random transformers models:
Llama (llama3 RoPE), Mistral (sliding window), Qwen2 (biases, sliding layers), Qwen3 (q/k norm),
Gemma 2 (soft-capping, sandwich norms) and Gemma 3 (local RoPE base, layer_types)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from embedjax import hf
from embedjax.encoders import decoder, layers as L, registry

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

V, H, T = 100, 64, 10
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager")
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "llama_bias": lambda: transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True,
                                                   rope_parameters=dict(rope_type="linear", rope_theta=500.0,
                                                                        factor=2.0)),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                              max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=32),
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                                attn_logit_softcapping=2.0),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}),
}
LENGTHS = (10, 7, 3)


def _randomize(model, gemma: bool):
    """Weights large enough that every term (soft-capping, norms, biases) matters."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))


def _torch_model(family):
    cfg = FAMILIES[family]()
    model = transformers.AutoModel._model_mapping[type(cfg)](cfg).eval()
    _randomize(model, family.startswith("gemma"))
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, torch model, params, cfg) of one family, loaded through hf.load_checkpoint."""
    name = request.param
    model = _torch_model(name)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, safe_serialization=True)
    params, cfg, _ = hf.load_checkpoint(path)
    return name, model, params, cfg, path


def _batch(lengths=LENGTHS, t=T, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, (len(lengths), t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, 0).astype(np.int32), mask


def _torch_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=mask,
                    output_hidden_states=True)
    return np.stack([h.numpy() for h in out.hidden_states])


def _assert_close_on_real(got, want, mask, atol=1e-4):
    valid = np.asarray(mask)[None, :, :, None] > 0
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=atol, rtol=1e-4)


_jit_apply = jax.jit(decoder.apply, static_argnums=1, static_argnames=("num_layers", "all_layers"))


def _apply(params, cfg, ids, mask, **kw):
    return np.asarray(_jit_apply(params, cfg, ids, mask, **kw))


def test_config_and_registry(family):
    name, model, params, cfg, _ = family
    assert registry.of(cfg) is decoder.BACKBONE
    assert cfg.max_length == 128 and cfg.attention == "causal"
    assert decoder.DecoderConfig.from_hf(cfg.to_hf()) == cfg
    # The written config loads in transformers and rebuilds the same config.
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    assert decoder.DecoderConfig.from_hf(hf_cfg.to_dict()) == cfg
    if name == "gemma2":
        assert cfg.attn_logit_softcap == 2.0 and cfg.layer_types[0] == decoder.SLIDING
    if name == "gemma3":
        assert cfg.local_rope_theta == 100.0 and dict(cfg.rope_scaling)["rope_type"] == "linear"
    if name == "qwen2":
        assert cfg.qkv_bias and not cfg.o_bias and cfg.layer_types == (decoder.FULL, decoder.SLIDING)


def test_causal_matches_transformers(family):
    _, model, params, cfg, _ = family
    ids, mask = _batch()
    want = _torch_hidden(model, ids, torch.tensor(mask))
    got = _apply(params, cfg, ids, mask)
    assert got.shape == (cfg.num_layers + 1, len(LENGTHS), T, H)
    _assert_close_on_real(got, want, mask)


def _bidirectional_masks(mask, window):
    """Additive 4D masks: padding only, and padding within |i - j| <= window // 2."""
    keys = torch.tensor(mask, dtype=torch.bool)[:, None, None, :]
    i = torch.arange(mask.shape[1])
    near = ((i[:, None] - i[None, :]).abs() <= (window or 10**6) // 2)[None, None]
    neg = torch.finfo(torch.float32).min
    full = torch.zeros(keys.shape[0], 1, mask.shape[1], mask.shape[1]).masked_fill(~keys, neg)
    return full, full.masked_fill(~near, neg)


def test_bidirectional_matches_transformers_with_a_padding_only_mask(family):
    name, model, params, cfg, _ = family
    ids, mask = _batch()
    full, sliding = _bidirectional_masks(mask, cfg.sliding_window)
    if name in ("llama", "llama_bias"):
        torch_mask = full
    elif name == "mistral":
        torch_mask = sliding
    else:
        torch_mask = {decoder.FULL: full, decoder.SLIDING: sliding}
    want = _torch_hidden(model, ids, torch_mask)
    got = _apply(params, dataclasses.replace(cfg, attention="bidirectional"), ids, mask)
    _assert_close_on_real(got, want, mask)
    causal = _apply(params, cfg, ids, mask)
    assert not np.allclose(got[-1, 0, 0], causal[-1, 0, 0], atol=1e-3)  # the first token now sees the rest


def test_packed_rows_equal_separate_texts(family):
    """Texts packed into rows (segment_ids / positions) give their padded-batch hidden states;
    bidirectional too where sliding windows are in play."""
    name, _, params, cfg, _ = family
    ids, mask = _batch()
    rows = [[0], [1, 2]]  # LENGTHS (10, 7, 3) -> rows of 10 and 7 + 3 tokens
    pids, seg, pos = (np.zeros((3, T), np.int32) for _ in range(3))
    where = {}
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            n = LENGTHS[i]
            pids[r, start:start + n] = ids[i, :n]
            seg[r, start:start + n] = i + 1
            pos[r, start:start + n] = np.arange(n)
            where[i] = (r, start)
            start += n
    modes = ("causal", "bidirectional") if cfg.sliding_window else ("causal",)
    for attention in modes:
        c = dataclasses.replace(cfg, attention=attention)
        alone = _apply(params, c, ids, mask)
        packed = _apply(params, c, pids, (seg > 0).astype(np.int32), segment_ids=seg, positions=pos)
        for i, (r, start) in where.items():
            n = LENGTHS[i]
            np.testing.assert_allclose(packed[:, r, start:start + n], alone[:, i, :n], atol=1e-4, rtol=1e-4,
                                       err_msg=f"{attention} text {i}")


def test_export_round_trip_loads_in_transformers(family, tmp_path):
    name, model, params, cfg, _ = family
    state = decoder.state_dict_from_params(params, cfg)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    reloaded = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    ids, mask = _batch()
    want = _torch_hidden(model, ids, torch.tensor(mask))
    _assert_close_on_real(_torch_hidden(reloaded, ids, torch.tensor(mask)), want, mask, atol=1e-6)
    again, cfg2, _ = hf.load_checkpoint(tmp_path)
    assert cfg2 == cfg
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree_util.tree_leaves_with_path(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def test_missing_tensor_is_named(family, tmp_path):
    _, _, params, cfg, path = family
    state = load_file(str(path / "model.safetensors"))
    del state["layers.1.mlp.up_proj.weight"]
    state["layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_checkpoint(tmp_path)
    assert "missing (1): ['layers.1.mlp.up_proj.weight']" in str(err.value)
    assert "unexpected (1): ['layers.1.mlp.extra.weight']" in str(err.value)


# --------------------------------------------------------------------------- single-family checks


def test_causal_lm_names_load_and_wrong_shapes_fail(tmp_path):
    cfg = FAMILIES["llama"]()
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    _randomize(lm, False)
    lm.save_pretrained(tmp_path / "lm", safe_serialization=True)
    assert any(k.startswith("model.") for k in load_file(str(tmp_path / "lm" / "model.safetensors")))
    params, ecfg, _ = hf.load_checkpoint(tmp_path / "lm")
    ids, mask = _batch()
    _assert_close_on_real(_apply(params, ecfg, ids, mask), _torch_hidden(lm.model, ids, torch.tensor(mask)), mask)
    with pytest.raises(hf.CheckpointError, match="shapes"):
        hf.load_checkpoint(tmp_path / "lm", intermediate_size=80)


def test_gemma3_use_bidirectional_attention_matches_transformers(tmp_path):
    cfg = FAMILIES["gemma3"]()
    cfg.use_bidirectional_attention = True
    cfg.sliding_window = 4  # as read from a config.json with sliding_window=6 (Gemma 3 halves it)
    model = transformers.Gemma3TextModel(cfg).eval()
    _randomize(model, True)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["sliding_window"] == 6
    params, ecfg, _ = hf.load_checkpoint(tmp_path)
    assert ecfg.attention == "bidirectional" and ecfg.sliding_window == 6
    ids, mask = _batch()
    _assert_close_on_real(_apply(params, ecfg, ids, mask), _torch_hidden(model, ids, torch.tensor(mask)), mask)
    assert ecfg.to_hf()["use_bidirectional_attention"] is True


def test_multimodal_gemma3_checkpoint_loads_its_text_model(tmp_path):
    text = FAMILIES["gemma3"]().to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    mm = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
    _randomize(mm, True)
    mm.save_pretrained(tmp_path, safe_serialization=True)
    params, cfg, _ = hf.load_checkpoint(tmp_path)  # model_type gemma3: text_config, vision tensors ignored
    assert cfg.model_type == "gemma3_text" and cfg.local_rope_theta == 100.0
    ids, mask = _batch()
    want = _torch_hidden(mm.model.language_model, ids, torch.tensor(mask))
    _assert_close_on_real(_apply(params, cfg, ids, mask), want, mask)


def test_num_layers_remat_grads_lora_and_bf16(tmp_path):
    model = _torch_model("gemma3")
    model.save_pretrained(tmp_path, safe_serialization=True)
    params, cfg, _ = hf.load_checkpoint(tmp_path)
    ids, mask = _batch()
    want = _apply(params, cfg, ids, mask)

    # Gradients through the rolled, rematerialised scan (with a lax.switch between the sliding and
    # the full layer) equal PyTorch's autograd of the same loss.
    valid = mask[:, :, None] > 0

    def loss(p):
        last = decoder.apply(p, cfg, ids, mask, all_layers=False, remat="dots_with_no_batch_dims_saveable",
                             unroll=False)
        return jnp.sum(jnp.where(valid, last, 0) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
    (out * torch.tensor(valid)).pow(2).sum().backward()
    want_grads = decoder.params_from_state_dict({k: p.grad.numpy() for k, p in model.named_parameters()}, cfg)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree_util.tree_leaves_with_path(want_grads)):
        scale = np.abs(b).max() + 1e-6
        np.testing.assert_allclose(np.asarray(a) / scale, b / scale, atol=1e-4, err_msg=jax.tree_util.keystr(path))
    # num_layers=k: HF's hidden_states[:k + 1] (layer k's output without the final norm, which only
    # ends a full run); the layers above k are not computed.
    np.testing.assert_allclose(_apply(params, cfg, ids, mask, num_layers=1), want[:2], atol=1e-5)
    np.testing.assert_allclose(_apply(params, cfg, ids, mask, num_layers=1, all_layers=False), want[1], atol=1e-5)
    np.testing.assert_allclose(_apply(params, cfg, ids, mask, all_layers=False), want[-1], atol=1e-5)
    with pytest.raises(ValueError, match="num_layers"):
        decoder.apply(params, cfg, ids, mask, num_layers=3)

    # LoRA: adapters next to q and down; a zero lora_b leaves the output unchanged.
    spec = type("Spec", (), {"scale": 2.0, "dropout": 0.0})()
    lcfg = dataclasses.replace(cfg, lora=spec)
    adapted = jax.tree.map(lambda x: x, params)
    for group, name in (("attention", "q"), ("mlp", "down")):
        kernel = params["layers"][group][name]["kernel"]
        adapted["layers"][group][name] = {"kernel": kernel, "lora_a": jnp.ones((*kernel.shape[:2], 2)) * 0.1,
                                          "lora_b": jnp.zeros((kernel.shape[0], 2, kernel.shape[2]))}
    np.testing.assert_allclose(_apply(adapted, lcfg, ids, mask), want, atol=1e-5)
    adapted["layers"]["attention"]["q"]["lora_b"] += 0.1
    assert not np.allclose(_apply(adapted, lcfg, ids, mask), want, atol=1e-3)

    low = _apply(params, dataclasses.replace(cfg, dtype="bfloat16"), ids, mask)[-1].astype(np.float32)
    valid = mask[:, :, None] > 0
    assert np.abs(np.where(valid, low - want[-1], 0)).max() < 0.1 * np.abs(want[-1]).max()


def test_attention_helper_paths_agree():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 7, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32)
    lengths = jnp.asarray([7, 4])
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0], [1, 1, 2, 2, 2, 2, 0]])
    for kw in (dict(lengths=lengths, causal=True, window=(2, 0)), dict(segment_ids=seg, window=(1, 1))):
        fast = jax.jit(lambda q, k, v: L.attention(q, k, v, **kw))(q, k, v)
        # the einsum path; tanh(x / 1e6) * 1e6 ~ x
        explicit = jax.jit(lambda q, k, v: L.attention(q, k, v, **kw, softcap=1e6))(q, k, v)
        np.testing.assert_allclose(np.asarray(fast), np.asarray(explicit), atol=1e-4)


def test_sharded_fsdp_x_tensor_parallel_with_lora_equals_unsharded():
    """The backbone's SHARDING_RULES place every param (LoRA adapters included) on a
    data x fsdp x model mesh of the 8 test devices, and the sharded forward equals the plain one."""
    from embedjax import lora, sharding

    cfg = decoder.DecoderConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                                intermediate_size=48, qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=True,
                                norm_plus_one=True, sandwich_norm=True)
    params, cfg = lora.attach(decoder.init(cfg, jax.random.key(0)), cfg, lora.LoraSpec(rank=4), jax.random.key(1))
    params = jax.tree.map(lambda x: x + 0.05, params)  # nonzero lora_b
    mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
    specs = sharding.param_specs(params, mesh, sharding.rules_for(cfg, "fsdp"))
    assert specs["layers"]["attention"]["q"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "model")
    assert specs["layers"]["mlp"]["down"]["lora_a"] == jax.sharding.PartitionSpec(None, "model")
    assert specs["final_norm"]["scale"] == jax.sharding.PartitionSpec()
    placed = jax.device_put(params, sharding.param_shardings(params, mesh, sharding.rules_for(cfg, "fsdp")))
    ids, mask = _batch((6, 3, 6, 1), t=6)
    np.testing.assert_allclose(_apply(placed, cfg, ids, mask), np.asarray(decoder.apply(params, cfg, ids, mask)),
                               atol=1e-5)
    assert decoder.BACKBONE.dense_modules[0] == ("layers/attention/q", "layers.{i}.self_attn.q_proj")
    assert registry.of(cfg).no_decay == decoder.NO_DECAY
