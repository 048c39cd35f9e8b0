"""Mesh, parameter rules, batch sharding and cross-device in-batch negatives on 8 fake CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from embedjax import sharding
from embedjax.embed import embed
from embedjax.encoders import bert
from embedjax.losses import infonce

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

CFG = bert.BertConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=16
)
B, K, T = 16, 2, 8  # global batch, hard negatives per anchor, sequence length


def test_eight_fake_devices():
    assert jax.device_count() == 8


# ---------------------------------------------------------------- mesh


def test_make_mesh_sizes_and_axis_types():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "model": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(sharding.make_mesh(data=2, fsdp=4).shape) == {"data": 2, "fsdp": 4, "model": 1}
    assert dict(sharding.make_mesh(data=-1, fsdp=2).shape) == {"data": 4, "fsdp": 2, "model": 1}
    assert dict(sharding.make_mesh(fsdp=2, model=2).shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert dict(sharding.mesh_from_config({"fsdp": 8}).shape) == {"data": 1, "fsdp": 8, "model": 1}
    assert dict(sharding.mesh_from_config({"fsdp": 4, "model": 2}).shape) == {"data": 1, "fsdp": 4, "model": 2}
    assert dict(sharding.make_mesh(devices=jax.devices()[:4]).shape) == {"data": 4, "fsdp": 1, "model": 1}
    with pytest.raises(ValueError):
        sharding.make_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError):
        sharding.make_mesh(data=-1, fsdp=3)
    with pytest.raises(ValueError):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_explicit_axes_reject_in_batch_similarity_auto_axes_gather():
    """Why the mesh is Auto: with Explicit axes za @ zb.T over a sharded batch is a type error."""
    rng = np.random.default_rng(0)
    za, zb = rng.normal(size=(2, B, 4)).astype(np.float32)
    sim = jax.jit(lambda a, b: a @ b.T)

    explicit = jax.make_mesh((8, 1, 1), sharding.AXES, axis_types=(AxisType.Explicit,) * 3)
    s = NamedSharding(explicit, P(sharding.BATCH_AXES))
    with pytest.raises(Exception, match="illegally sharded|ShardingTypeError"):
        sim(jax.device_put(za, s), jax.device_put(zb, s))

    mesh = sharding.make_mesh()
    out = sim(*sharding.to_global([za, zb], mesh))
    np.testing.assert_allclose(np.asarray(out), za @ zb.T, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- parameter rules

# Golden PartitionSpecs of every BERT parameter under bert.SHARDING_RULES (mesh without 'model') (written out by hand).
GOLDEN_FSDP = {
    "embeddings/word": P(None, "fsdp"),
    "embeddings/position": P(None, "fsdp"),
    "embeddings/token_type": P(),
    "embeddings/norm/scale": P(),
    "embeddings/norm/bias": P(),
    "layers/attention/query/kernel": P(None, "fsdp"),
    "layers/attention/query/bias": P(),
    "layers/attention/key/kernel": P(None, "fsdp"),
    "layers/attention/key/bias": P(),
    "layers/attention/value/kernel": P(None, "fsdp"),
    "layers/attention/value/bias": P(),
    "layers/attention/output/kernel": P(None, None, "fsdp"),
    "layers/attention/output/bias": P(),
    "layers/attention/norm/scale": P(),
    "layers/attention/norm/bias": P(),
    "layers/mlp/up/kernel": P(None, "fsdp"),
    "layers/mlp/up/bias": P(),
    "layers/mlp/down/kernel": P(None, None, "fsdp"),
    "layers/mlp/down/bias": P(),
    "layers/mlp/norm/scale": P(),
    "layers/mlp/norm/bias": P(),
}
# Per-device shard shapes on the data=2, fsdp=4 mesh for the tiny config (H=32, I=64, L=2).
GOLDEN_SHARD_SHAPES = {
    "embeddings/word": (64, 8),
    "embeddings/position": (16, 8),
    "layers/attention/query/kernel": (2, 8, 32),
    "layers/mlp/up/kernel": (2, 8, 64),
    "layers/mlp/down/kernel": (2, 64, 8),
    "layers/mlp/up/bias": (2, 64),
}


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]
    return {sharding.param_path(path): leaf for path, leaf in leaves}


def test_fsdp_rules_golden_specs():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    shapes = jax.eval_shape(functools.partial(bert.init, CFG), jax.random.key(0))
    specs = _flat(sharding.param_specs(shapes, mesh, bert.SHARDING_RULES))
    assert specs == GOLDEN_FSDP


def test_init_comes_out_sharded_by_fsdp_rules():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    key = jax.random.key(0)
    shapes = jax.eval_shape(functools.partial(bert.init, CFG), key)
    out_shardings = sharding.param_shardings(shapes, mesh, bert.SHARDING_RULES)
    params = jax.jit(bert.init, static_argnums=0, out_shardings=out_shardings)(CFG, key)
    reference = _flat(bert.init(CFG, key))
    for name, x in _flat(params).items():
        assert x.sharding.spec == GOLDEN_FSDP[name], name
        assert x.sharding.mesh.shape == mesh.shape
        shard = x.addressable_shards[0].data.shape
        expected = GOLDEN_SHARD_SHAPES.get(name, None if GOLDEN_FSDP[name] != P() else x.shape)
        if expected is not None:
            assert shard == expected, name
        np.testing.assert_allclose(np.asarray(x), np.asarray(reference[name]), rtol=1e-6)  # same values, 1-ulp fusion noise


def test_model_axis_splits_heads_and_mlp_megatron_style():
    """With a 'model' axis, q/k/v/up split their outputs and output/down their inputs."""
    mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
    specs = _flat(sharding.param_specs(jax.eval_shape(functools.partial(bert.init, CFG), jax.random.key(0)), mesh,
                                       sharding.rules_for(CFG, "fsdp")))
    assert specs["layers/attention/query/kernel"] == P(None, "fsdp", "model")
    assert specs["layers/attention/output/kernel"] == P(None, "model", "fsdp")
    assert specs["layers/mlp/up/kernel"] == P(None, "fsdp", "model")
    assert specs["layers/mlp/down/kernel"] == P(None, "model", "fsdp")
    assert specs["embeddings/word"] == P(None, "fsdp")


def test_replicated_rules():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    specs = _flat(sharding.param_specs(jax.eval_shape(functools.partial(bert.init, CFG), jax.random.key(0)), mesh, sharding.REPLICATED_RULES))
    assert set(specs) == set(GOLDEN_FSDP) and all(s == P() for s in specs.values())


def test_rule_errors_name_the_parameter():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    shapes = {"head": {"kernel": jax.ShapeDtypeStruct((6, 32), jnp.float32)}, "extra": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(ValueError, match="'extra'"):  # no rule matches
        sharding.param_specs(shapes, mesh, [(r"kernel$", P())])
    with pytest.raises(ValueError, match="'head/kernel'.*not divisible"):  # 6 % 4
        sharding.param_specs(shapes, mesh, [(r"kernel$", P("fsdp")), (r".*", P())])
    with pytest.raises(ValueError, match="more axes"):
        sharding.param_specs(shapes, mesh, [(r".*", P(None, None, "fsdp"))])
    with pytest.warns(UserWarning, match="head/kernel"):
        specs = sharding.param_specs(shapes, mesh, [(r"kernel$", P("fsdp", "data")), (r".*", P())], strict=False)
    assert specs["head"]["kernel"] == P(None, "data")  # only the indivisible axis replicated
    # first match wins
    specs = sharding.param_specs(shapes, mesh, [(r"kernel$", P(None, "fsdp")), (r"head", P()), (r".*", P())])
    assert specs["head"]["kernel"] == P(None, "fsdp")


# ---------------------------------------------------------------- batch


def test_to_global_splits_batch_over_every_device():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    host = {"ids": np.arange(B * T, dtype=np.int32).reshape(B, T), "neg": np.arange(B * K * T).reshape(B, K, T)}
    glob = sharding.to_global(host, mesh)
    for name, x in glob.items():
        assert x.sharding == sharding.batch_sharding(mesh)
        assert x.sharding.spec == P(("data", "fsdp"))
        np.testing.assert_array_equal(np.asarray(x), host[name])
        rows = sorted(int(s.index[0].start) for s in x.addressable_shards)
        assert rows == list(range(0, B, B // 8))  # 8 distinct slices of 2 examples


# ---------------------------------------------------------------- InfoNCE across devices


def _batch(seed=0):
    rng = np.random.default_rng(seed)

    def side(*lead):
        ids = rng.integers(1, CFG.vocab_size, size=(*lead, T)).astype(np.int32)
        lengths = rng.integers(2, T + 1, size=lead)
        mask = (np.arange(T) < lengths[..., None]).astype(np.int32)
        return ids * mask, mask

    out = {}
    for name, lead in (("a", (B,)), ("b", (B,)), ("n", (B, K))):
        out[f"{name}_ids"], out[f"{name}_mask"] = side(*lead)
    return out


def _embeddings(params, batch):
    za = embed(params, CFG, batch["a_ids"], batch["a_mask"])
    zb = embed(params, CFG, batch["b_ids"], batch["b_mask"])
    n = batch["n_ids"].shape[0]
    zn = embed(params, CFG, batch["n_ids"].reshape(-1, T), batch["n_mask"].reshape(-1, T))
    return za, zb, zn.reshape(n, -1, za.shape[-1])


def _loss(params, batch):
    return infonce(*_embeddings(params, batch))


def np_infonce(a, b, n, scale=20.0):
    """Naive InfoNCE: anchor i against every positive and every hard negative, target b_i."""
    a, b, n = (np.asarray(x, np.float64) for x in (a, b, n))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    a, b, n = unit(a), unit(b), unit(n)
    cands = list(b) + [n[j, m] for j in range(n.shape[0]) for m in range(n.shape[1])]
    total = 0.0
    for i in range(a.shape[0]):
        logits = np.array([scale * a[i] @ c for c in cands])
        total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - scale * a[i] @ b[i]
    return total / a.shape[0]


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4)])
def test_sharded_infonce_with_hard_negatives_equals_single_device(data, fsdp):
    params = bert.init(CFG, jax.random.key(1))
    batch = _batch()
    value_and_grad = jax.value_and_grad(_loss)

    # Single device: everything on device 0.
    dev0 = jax.devices()[0]
    loss1, grads1 = jax.jit(value_and_grad)(jax.device_put(params, dev0), jax.device_put(batch, dev0))
    za, zb, zn = jax.jit(_embeddings)(params, batch)
    np.testing.assert_allclose(float(loss1), np_infonce(za, zb, zn), rtol=1e-5)

    # Sharded: batch over every device, params by FSDP_RULES (replicated when fsdp == 1).
    mesh = sharding.make_mesh(data=data, fsdp=fsdp)
    p_shard = sharding.param_shardings(params, mesh, bert.SHARDING_RULES)
    step = jax.jit(value_and_grad, out_shardings=(NamedSharding(mesh, P()), p_shard))
    sharded_params = jax.device_put(params, p_shard)
    sharded_batch = sharding.to_global(batch, mesh)
    assert "all-reduce" in step.lower(sharded_params, sharded_batch).compile().as_text()  # really distributed
    loss8, grads8 = step(sharded_params, sharded_batch)

    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    for g8, g1 in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-4, atol=1e-6)
    assert jax.tree.leaves(grads8)[0].sharding.mesh.shape == mesh.shape


def test_local_negatives_differs_from_global_and_matches_per_shard_numpy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, B, 16)).astype(np.float32)
    n = rng.normal(size=(B, K, 16)).astype(np.float32)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    args = sharding.to_global([a, b, n], mesh)

    global_loss = float(jax.jit(infonce)(*args))
    local_loss = float(jax.jit(sharding.local_negatives(functools.partial(infonce, scale=20.0), mesh))(*args))

    s = B // 8  # examples per device
    per_shard = [np_infonce(a[i : i + s], b[i : i + s], n[i : i + s]) for i in range(0, B, s)]
    np.testing.assert_allclose(global_loss, np_infonce(a, b, n), rtol=1e-5)
    np.testing.assert_allclose(local_loss, np.mean(per_shard), rtol=1e-5)
    assert abs(local_loss - global_loss) > 0.1  # fewer candidates -> a clearly different loss


def test_local_negatives_is_differentiable():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(2, B, 16)).astype(np.float32)
    mesh = sharding.make_mesh()
    local = sharding.local_negatives(infonce, mesh)
    ga = jax.jit(jax.grad(local))(*sharding.to_global([a, b], mesh))
    # Each shard's loss is independent: the gradient of shard 0's rows equals the gradient
    # of a single-device InfoNCE on shard 0 alone, divided by the 8 shards of the mean.
    s = B // 8
    g0 = jax.grad(infonce)(a[:s], b[:s]) / 8
    np.testing.assert_allclose(np.asarray(ga)[:s], np.asarray(g0), rtol=1e-5, atol=1e-7)
