"""embedjax.lora against Hugging Face PEFT: adapters PEFT trained load here and compute PEFT's hidden
states, adapters attached here load into PEFT and compute ours; merge, rsLoRA, adapter dropout;
a training step moves the adapters alone; GradCache stays exact over the trainable part."""
import dataclasses
import functools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft  # the `test` extra installs it: a broken install fails, never skips
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from embedjax import hf, lora
from embedjax.embed import embed
from embedjax.encoders import registry
from embedjax.gradcache import gradcache_value_and_grad
from embedjax.losses import infonce

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

T = 8
TINY_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=16, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def batch(b=4, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(b, T)).astype(np.int32)
    mask = (np.arange(T) < rng.integers(3, T + 1, size=b)[:, None]).astype(np.int32)
    mask[0] = 1  # one full row
    return ids * mask, mask


@functools.partial(jax.jit, static_argnums=1)
def _hidden(params, cfg, ids, mask):
    return registry.of(cfg).apply(params, cfg, ids, mask, all_layers=False)


def hidden_jax(params, cfg, ids, mask):
    return np.asarray(_hidden(params, cfg, jnp.asarray(ids), jnp.asarray(mask)))


def embed_pair(params, cfg, x, key=None):
    """Both sides of a pair batch ``x = (ids, mask, ids2, mask2)`` in one forward pass."""
    ids, mask = jnp.concatenate([x[0], x[2]]), jnp.concatenate([x[1], x[3]])
    z = embed(params, cfg, ids, mask, dropout_key=key)
    return z[: x[0].shape[0]], z[x[0].shape[0]:]


@torch.no_grad()
def hidden_torch(model, ids, mask):
    model.eval()
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask, dtype=torch.long))
    return out.last_hidden_state.numpy()


def assert_close_on_tokens(got, want, mask, atol=1e-5):
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**TINY_BERT))
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert(bert_dir):
    params, cfg, _ = hf.load_checkpoint(bert_dir)
    return jax.tree.map(jnp.asarray, params), cfg


def randomize_lora_torch(model, seed):
    """Nonzero A and B on every PEFT LoRA module (B starts at zero). Moderate sizes: the adapted
    kernels stay well conditioned, so float32 rounding stays below the 1e-5 comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def randomize_lora_jax(params, seed):
    """Nonzero A and B on every adapter (drawn with NumPy: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(0.05 * rng.standard_normal(x.shape), jnp.float32) if lora.is_adapter(path) else x,
        params)


# --------------------------------------------------------------------------- PEFT -> embedjax


@pytest.mark.parametrize("targets,rslora", [(["query", "value"], True), (["key", "attention.output.dense", "intermediate.dense"], False)])
def test_peft_adapters_load_and_match_peft(bert_dir, bert, tmp_path, targets, rslora):
    torch.manual_seed(1)
    base = transformers.BertModel.from_pretrained(bert_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets,
                                                      use_rslora=rslora))
    randomize_lora_torch(model, 0)
    model.save_pretrained(tmp_path)
    params, cfg = lora.load_peft(tmp_path, *bert)
    assert cfg.lora == lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1, targets=cfg.lora.targets, rslora=rslora)
    n_modules = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert len(lora.adapted_paths(params)) * cfg.num_layers == n_modules
    ids, mask = batch()
    want = hidden_torch(model, ids, mask)
    with model.disable_adapter():
        assert_close_on_tokens(hidden_jax(*bert, ids, mask), hidden_torch(model, ids, mask), mask)
    assert not np.allclose(want, hidden_jax(*bert, ids, mask), atol=1e-3)  # the adapters matter
    assert_close_on_tokens(hidden_jax(params, cfg, ids, mask), want, mask)

    # merge: one kernel per module, as PEFT's merge_and_unload computes it (and the same outputs)
    merged, mcfg = lora.merge(params, cfg)
    assert mcfg.lora is None and not lora.adapted_paths(merged)
    assert_close_on_tokens(hidden_jax(merged, mcfg, ids, mask), want, mask)
    state = {k: v.numpy() for k, v in model.merge_and_unload().state_dict().items()}
    ours = hf.state_dict_from_params(merged, mcfg)
    for k, v in ours.items():
        np.testing.assert_allclose(v, state[k], atol=1e-6, rtol=1e-6, err_msg=k)


def test_peft_adapters_on_modules_without_params_need_strict_false(bert_dir, bert, tmp_path):
    """'dense' also selects BERT's pooler, which no embedding computes: strict refuses it, by name."""
    base = transformers.BertModel.from_pretrained(bert_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "dense"]))
    randomize_lora_torch(model, 1)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*pooler\.dense\.lora_A"):
        lora.load_peft(tmp_path, *bert)
    params, cfg = lora.load_peft(tmp_path, *bert, strict=False)
    assert lora.adapted_paths(params) == ["layers/attention/output", "layers/attention/query", "layers/mlp/down",
                                          "layers/mlp/up"]
    ids, mask = batch(seed=1)
    assert_close_on_tokens(hidden_jax(params, cfg, ids, mask), hidden_torch(model, ids, mask), mask)


# --------------------------------------------------------------------------- embedjax -> PEFT


@pytest.mark.parametrize("targets,want_targets", [
    (r"attention/(query|value)$", ["query", "value"]),              # unique short names
    ("", None),                                                      # default: all dense, a regex (PEFT's 'dense' is ambiguous)
    (r"attention/output$|mlp/down$", None),
])
def test_save_peft_loads_in_peft_and_matches(bert_dir, bert, tmp_path, targets, want_targets):
    spec = lora.LoraSpec(rank=4, alpha=16, dropout=0.05, targets=targets, rslora=targets == "")
    params, cfg = lora.attach(*bert, spec, jax.random.key(0))
    params = randomize_lora_jax(params, 3)
    lora.save_peft(tmp_path, params, cfg, base_model_name_or_path=str(bert_dir))
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 16 and conf["use_rslora"] == (targets == "")
    if want_targets is not None:
        assert conf["target_modules"] == want_targets
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(transformers.BertModel.from_pretrained(bert_dir), tmp_path)
    assert not [w for w in caught if "adapter" in str(w.message).lower() or "missing" in str(w.message).lower()]
    names = sorted(n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A"))
    templates = dict(registry.of(cfg).dense_modules)
    assert names == sorted(f"base_model.model.{templates[p].format(i=i)}"
                           for p in lora.adapted_paths(params) for i in range(cfg.num_layers))
    ids, mask = batch(seed=2)
    assert_close_on_tokens(hidden_jax(params, cfg, ids, mask), hidden_torch(model, ids, mask), mask)
    # and back: the file round-trips bit for bit
    again, cfg2 = lora.load_peft(tmp_path, *bert)
    assert cfg2.lora == cfg.lora or cfg2.lora.targets != cfg.lora.targets  # same numbers; targets may be spelled out
    assert dataclasses.replace(cfg2.lora, targets="") == dataclasses.replace(cfg.lora, targets="")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- attach, merge, scale, dropout


def test_attach_init_is_peft_and_changes_nothing(bert):
    params, cfg = bert
    new, ncfg = lora.attach(params, cfg, lora.LoraSpec(rank=8, targets="mlp"), jax.random.key(0))
    assert lora.adapted_paths(new) == ["layers/mlp/down", "layers/mlp/up"] and ncfg.lora.targets == "mlp"
    up, down = new["layers"]["mlp"]["up"], new["layers"]["mlp"]["down"]
    assert up["lora_a"].shape == (2, 32, 8) and up["lora_b"].shape == (2, 8, 64) and down["lora_a"].shape == (2, 64, 8)
    for d in (up, down):
        bound = 1 / np.sqrt(d["lora_a"].shape[1])
        a = np.asarray(d["lora_a"])
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound and abs(a.mean()) < 0.1 * bound
        assert not np.asarray(d["lora_b"]).any()
    assert not np.array_equal(up["lora_a"][0], up["lora_a"][1])  # each stacked layer its own draw
    assert up["kernel"] is params["layers"]["mlp"]["up"]["kernel"]  # the base leaves are shared, not copied
    assert "lora_a" not in params["layers"]["mlp"]["up"]  # the input tree is untouched
    ids, mask = batch()
    np.testing.assert_allclose(hidden_jax(new, ncfg, ids, mask), hidden_jax(params, cfg, ids, mask), atol=1e-6)
    with pytest.raises(ValueError, match=r"match no dense layer.*layers/attention/query"):
        lora.attach(params, cfg, lora.LoraSpec(targets="nothing_here"), jax.random.key(0))
    with pytest.raises(ValueError, match="already carry"):
        lora.attach(new, ncfg, lora.LoraSpec(), jax.random.key(0))
    stripped, scfg = lora.strip(new, ncfg)
    assert scfg == cfg and jax.tree.structure(stripped) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(stripped), jax.tree.leaves(params)))


def test_partition_and_combine():
    p = {"a": {"kernel": jnp.ones((2, 3)), "lora_a": jnp.zeros((2, 1)), "lora_b": jnp.zeros((1, 3))}, "b": jnp.ones(3)}
    t, f = lora.partition(p)
    assert t == {"a": {"kernel": None, "lora_a": p["a"]["lora_a"], "lora_b": p["a"]["lora_b"]}, "b": None}
    assert f == {"a": {"kernel": p["a"]["kernel"], "lora_a": None, "lora_b": None}, "b": p["b"]}
    for mask in (None, jax.tree.map(lambda _: True, p), jax.tree.map(lambda _: False, p)):  # also all / nothing trainable
        t, f = lora.partition(p, mask)
        back = lora.combine(t, f)
        assert jax.tree.structure(back) == jax.tree.structure(p)
        assert all(x is y for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(p)))
    assert lora.trainable_mask(p) == {"a": {"kernel": False, "lora_a": True, "lora_b": True}, "b": False}
    assert lora.is_adapter("layers/mlp/up/lora_b") and not lora.is_adapter("layers/mlp/up/kernel")


def test_merge_equals_unmerged_and_rslora_scale(bert):
    assert lora.LoraSpec(rank=4, alpha=8).scale == 2.0
    assert lora.LoraSpec(rank=4, alpha=8, rslora=True).scale == 4.0
    ids, mask = batch(seed=3)
    outs = {}

    @functools.partial(jax.jit, static_argnums=1)
    def unmerged_and_merged(params, cfg):
        return embed(params, cfg, ids, mask), embed(*lora.merge(params, cfg), ids, mask)

    for rslora in (False, True):
        params, cfg = lora.attach(*bert, lora.LoraSpec(rank=4, alpha=8, rslora=rslora), jax.random.key(1))
        params = randomize_lora_jax(params, 4)
        merged, mcfg = lora.merge(params, cfg)
        outs[rslora], got = map(np.asarray, unmerged_and_merged(params, cfg))
        np.testing.assert_allclose(got, outs[rslora], atol=1e-5)
        q = params["layers"]["attention"]["query"]
        want = q["kernel"] + cfg.lora.scale * np.einsum("lir,lro->lio", q["lora_a"], q["lora_b"])
        np.testing.assert_allclose(merged["layers"]["attention"]["query"]["kernel"], want, atol=1e-6)
    assert not np.allclose(outs[False], outs[True], atol=1e-4)  # the scale differs (2 vs 4)


def test_adapter_dropout_needs_a_key(bert):
    params, cfg = bert
    cfg = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0)  # only the adapters' dropout left
    ids, mask = batch(seed=4)
    p, c = lora.attach(params, cfg, lora.LoraSpec(rank=4, dropout=0.5), jax.random.key(2))
    p = randomize_lora_jax(p, 5)

    @jax.jit
    def three_ways(p):
        return (embed(p, c, ids, mask), embed(p, c, ids, mask, dropout_key=jax.random.key(9)),
                embed(*lora.merge(p, c), ids, mask))

    no_key, with_key, merged = map(np.asarray, three_ways(p))
    np.testing.assert_allclose(no_key, merged, atol=1e-5)  # no key: no dropout (the merged model has none)
    assert not np.allclose(with_key, no_key, atol=1e-3)  # a key turns it on


# --------------------------------------------------------------------------- training


def test_training_step_moves_the_adapters_alone(bert):
    params, cfg = lora.attach(*bert, lora.LoraSpec(rank=4, alpha=8, dropout=0.1), jax.random.key(3))
    trainable, frozen = lora.partition(params)
    assert jax.tree.structure(trainable, is_leaf=lambda x: x is None) == jax.tree.structure(frozen, is_leaf=lambda x: x is None)
    n_adapters = 2 * len(lora.adapted_paths(params))
    assert len(jax.tree.leaves(trainable)) == n_adapters
    assert len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(params)) - n_adapters
    pairs = (*batch(4, seed=5), *batch(4, seed=6))
    opt = optax.adamw(1e-2, weight_decay=0.01)
    state = opt.init(trainable)
    adapter_shapes = {x.shape for x in jax.tree.leaves(trainable)}
    assert all(x.shape in adapter_shapes for x in jax.tree.leaves(state) if x.ndim)
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * sum(x.size for x in jax.tree.leaves(trainable)) + 1

    @jax.jit
    def step(trainable, frozen, state, key):
        def loss(t):
            return infonce(*embed_pair(lora.combine(t, frozen), cfg, pairs, key))

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, state = opt.update(grads, state, trainable)
        return value, optax.apply_updates(trainable, updates), state

    value, new_trainable, state = step(trainable, frozen, state, jax.random.key(4))
    assert np.isfinite(float(value))
    new = lora.combine(new_trainable, frozen)
    flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(new)[0]:
        changed = not np.array_equal(np.asarray(leaf), np.asarray(flat_old[path]))
        assert changed == lora.is_adapter(path), (jax.tree_util.keystr(path), changed)


def test_gradcache_is_exact_over_the_trainable_part(bert):
    params, cfg = lora.attach(*bert, lora.LoraSpec(rank=4, alpha=8), jax.random.key(5))
    params = randomize_lora_jax(params, 6)
    trainable, frozen = lora.partition(params)
    inputs = (*batch(16, seed=7), *batch(16, seed=8))

    def embed_fn(t, x, key):
        return embed_pair(lora.combine(t, frozen), cfg, x, key)

    loss_fn = lambda z: infonce(*z, symmetric=True)
    got_v, got_g = jax.jit(gradcache_value_and_grad(embed_fn, loss_fn, 4))(trainable, inputs)
    want_v, want_g = jax.jit(jax.value_and_grad(lambda t: loss_fn(embed_fn(t, inputs, None))))(trainable)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
    assert jax.tree.structure(got_g) == jax.tree.structure(trainable)
    assert len(jax.tree.leaves(got_g)) == 2 * len(lora.adapted_paths(params))
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(got_g)) > 1e-3


# --------------------------------------------------------------------------- bad files


def test_load_peft_errors_name_the_file_and_key(bert, tmp_path):
    params, cfg = lora.attach(*bert, lora.LoraSpec(rank=4, targets="attention/(query|value)$"), jax.random.key(6))
    good = tmp_path / "good"
    lora.save_peft(good, params, cfg)

    def variant(name, conf_edit=None, tensors_edit=None):
        d = tmp_path / name
        d.mkdir()
        conf = json.loads((good / "adapter_config.json").read_text())
        tensors = load_file(str(good / "adapter_model.safetensors"))
        if conf_edit:
            conf_edit(conf)
        if tensors_edit:
            tensors_edit(tensors)
        (d / "adapter_config.json").write_text(json.dumps(conf))
        save_file(tensors, str(d / "adapter_model.safetensors"))
        return d

    key = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"
    bad_rank = variant("rank", lambda c: c.update(r=8))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*lora_A\.weight' has shape \(4, 32\), expected \(8, 32\)"):
        lora.load_peft(bad_rank, *bert)
    missing = variant("missing", tensors_edit=lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: missing tensor '" + key.replace(".", r"\.")):
        lora.load_peft(missing, *bert)
    also_key = variant("targets", lambda c: c.update(target_modules=["query", "value", "key"]))
    with pytest.raises(ValueError, match=r"missing tensor '.*attention\.self\.key\.lora_A\.weight'.*target_modules"):
        lora.load_peft(also_key, *bert)
    bias = variant("bias", lambda c: c.update(bias="all"))
    with pytest.raises(ValueError, match=r"adapter_config\.json: bias='all' is not supported"):
        lora.load_peft(bias, *bert)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_peft(tmp_path / "nowhere", *bert)
    with pytest.raises(ValueError, match="nothing to save"):
        lora.save_peft(tmp_path / "x", *bert)


# --------------------------------------------------------------------------- a decoder (Qwen2: q/k/v biases, GQA)

TINY_QWEN2 = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A tiny Qwen2 *causal LM* (PEFT users adapt those): its checkpoint has ``model.``-prefixed
    names and an lm_head, which hf.load_checkpoint strips / ignores."""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY_QWEN2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen2(qwen2_dir):
    params, cfg, _ = hf.load_checkpoint(qwen2_dir)
    assert cfg.model_type == "qwen2" and cfg.attention == "causal"
    return jax.tree.map(jnp.asarray, params), cfg


def test_decoder_peft_causal_lm_adapters_load_and_match(qwen2_dir, qwen2, tmp_path):
    """PEFT on the causal LM ('all-linear': every projection, not lm_head; less k_proj) writes
    ``base_model.model.model.layers...``: the ``model.`` wrapper prefix is recognised."""
    base = transformers.Qwen2ForCausalLM.from_pretrained(qwen2_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      exclude_modules=["k_proj"]))
    randomize_lora_torch(model, 2)
    model.save_pretrained(tmp_path)
    params, cfg = lora.load_peft(tmp_path, *qwen2)
    assert lora.adapted_paths(params) == sorted(p for p, _ in registry.of(cfg).dense_modules if p != "layers/attention/k")
    ids, mask = batch(seed=9)
    want = hidden_torch(model.base_model.model.model, ids, mask)
    assert not np.allclose(want, hidden_jax(*qwen2, ids, mask), atol=1e-3)
    assert_close_on_tokens(hidden_jax(params, cfg, ids, mask), want, mask)
    merged, mcfg = lora.merge(params, cfg)
    assert_close_on_tokens(hidden_jax(merged, mcfg, ids, mask), want, mask)


def test_decoder_save_peft_loads_on_the_base_model(qwen2_dir, qwen2, tmp_path):
    params, cfg = lora.attach(*qwen2, lora.LoraSpec(rank=4, alpha=16, rslora=True), jax.random.key(7))
    params = randomize_lora_jax(params, 8)
    lora.save_peft(tmp_path, params, cfg)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(qwen2_dir), tmp_path)
    assert not [w for w in caught if "adapter" in str(w.message).lower() or "missing" in str(w.message).lower()]
    assert sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A")) == 7 * cfg.num_layers
    ids, mask = batch(seed=10)
    assert_close_on_tokens(hidden_jax(params, cfg, ids, mask), hidden_torch(model, ids, mask), mask)
