"""GradCache equals the uncached loss and gradients (InfoNCE + hard negatives, Matryoshka, 2D),
with dropout, on one device and sharded over 8 fake devices; its memory does not grow with B."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax import sharding
from embedjax.embed import embed
from embedjax.encoders import bert
from embedjax.gradcache import chunked_embed, gradcache_value_and_grad
from embedjax.losses import adaptive_layer, infonce, matryoshka, matryoshka_2d

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

CFG = bert.BertConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_position_embeddings=16
)
assert CFG.hidden_dropout > 0 and CFG.attention_dropout > 0  # a key really turns dropout on
K, T = 2, 8  # hard negatives per anchor, sequence length


def make_batch(b, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, lead in (("a", (b,)), ("b", (b,)), ("n", (b, K))):
        ids = rng.integers(1, CFG.vocab_size, size=(*lead, T)).astype(np.int32)
        mask = (np.arange(T) < rng.integers(2, T + 1, size=lead)[..., None]).astype(np.int32)
        out[f"{name}_ids"], out[f"{name}_mask"] = ids * mask, mask
    return out


def make_embed_fn(per_layer=False):
    """Anchor, positive and hard-negative sides of one chunk; (c, D) / (c, k, D), or with
    ``per_layer`` the stacks (L, c, D) / (L, c, k, D) from one forward pass per side."""

    def embed_fn(params, x, key):
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        # the layer scan rolled: one compiled layer, not one per layer (the module compiles a third
        # faster; training's default unrolled scan runs GradCache in test_train and test_lora)
        kw = dict(per_layer=per_layer, unroll=False)
        za = embed(params, CFG, x["a_ids"], x["a_mask"], dropout_key=keys[0], **kw)
        zb = embed(params, CFG, x["b_ids"], x["b_mask"], dropout_key=keys[1], **kw)
        c, k = x["n_ids"].shape[:2]
        zn = embed(params, CFG, x["n_ids"].reshape(c * k, T), x["n_mask"].reshape(c * k, T), dropout_key=keys[2], **kw)
        return za, zb, zn.reshape(*zn.shape[:-2], c, k, zn.shape[-1])

    return embed_fn


def uncached(embed_fn, loss_fn, chunk, batch_axis=0):
    """The reference: plain autodiff through the embeddings of the whole batch. With a key,
    chunk j (rows j::n, gathered by explicit row indices) is embedded with fold_in(key, j) as
    GradCache documents, all chunks at once under ``jax.vmap`` (one traced encoder per side,
    not one per chunk: a quarter of the program to compile), and the rows are put back in
    order with an explicit inverse permutation."""

    def loss(params, inputs, key=None, *loss_args):
        if key is None:
            return loss_fn(embed_fn(params, inputs, None), *loss_args)
        b = inputs["a_ids"].shape[0]
        n = b // chunk
        rows = [np.arange(j, b, n) for j in range(n)]
        chunks = {k: jnp.stack([v[r] for r in rows]) for k, v in inputs.items()}
        keys = jnp.stack([jax.random.fold_in(key, j) for j in range(n)])
        parts = jax.vmap(lambda x, k: embed_fn(params, x, k))(chunks, keys)  # every leaf (n, ...)
        order = np.argsort(np.concatenate(rows))
        z = jax.tree.map(lambda p: jnp.take(jnp.concatenate(list(p), batch_axis), order, axis=batch_axis), parts)
        return loss_fn(z, *loss_args)

    return jax.value_and_grad(loss)


def assert_same(got, want, rtol=1e-4):
    (l1, g1), (l2, g2) = got, want
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        # float32: elementwise relative, plus an absolute slack scaled to the leaf's magnitude
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1)) > 1e-3  # non-trivial gradient


PARAMS = bert.init(CFG, jax.random.key(1))
BATCH = make_batch(16)
DROPOUT = jax.random.key(7)
DIMS = (32, 16, 8)

LOSSES = {
    "infonce": (False, 0, lambda z: infonce(*z)),
    "matryoshka_infonce": (False, 0, lambda z: matryoshka(infonce, DIMS)(*z)),
    # 2D losses over per-layer stacks (L, B, D); the sampled layer/dim key comes in loss_args.
    "2dmse": (True, 1, lambda z, key: matryoshka_2d(infonce)(*z, key=key)),
    # sentence-transformers' Matryoshka2dLoss, which it cannot combine with its cached losses.
    "2d_matryoshka": (True, 1, lambda z, key: adaptive_layer(matryoshka(infonce, DIMS), embedding_layer=True)(*z, key=key)),
}


def _args(name):
    return (DROPOUT, jax.random.key(3)) if name.startswith("2d") else (DROPOUT,)


SHARDED = {"infonce": (8, 1), "2d_matryoshka": (2, 4)}  # loss: (data, fsdp) of its 8-device test


# The sharded test runs the same comparison for its losses (one device adds nothing to it).
@pytest.mark.parametrize("name", sorted(set(LOSSES) - set(SHARDED)))
def test_gradcache_equals_uncached_with_dropout(name):
    per_layer, axis, loss_fn = LOSSES[name]
    embed_fn = make_embed_fn(per_layer)
    got = jax.jit(gradcache_value_and_grad(embed_fn, loss_fn, 4, batch_axis=axis))(PARAMS, BATCH, *_args(name))
    want = jax.jit(uncached(embed_fn, loss_fn, 4, axis))(PARAMS, BATCH, *_args(name))
    assert_same(got, want)


def test_gradcache_without_dropout_equals_plain_full_batch_loss():
    """No key: no chunk dependence at all, so the reference is one forward over all 16 rows."""
    embed_fn, loss_fn = make_embed_fn(), lambda z: infonce(*z, symmetric=True)
    got = jax.jit(gradcache_value_and_grad(embed_fn, loss_fn, 4))(PARAMS, BATCH)
    want = jax.jit(jax.value_and_grad(lambda p: loss_fn(embed_fn(p, BATCH, None))))(PARAMS)
    assert_same(got, want)


def test_chunked_embed_restores_batch_order_and_dropout_is_per_chunk():
    embed_fn = make_embed_fn(per_layer=True)
    z = jax.jit(chunked_embed(embed_fn, 4, batch_axis=1))(PARAMS, BATCH)
    full = embed_fn(PARAMS, BATCH, None)
    for a, b in zip(z, full):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # With dropout, rows 1::4 (chunk 1) are embedded with fold_in(key, 1).
    za = jax.jit(chunked_embed(make_embed_fn(), 4))(PARAMS, BATCH, DROPOUT)[0]
    chunk1 = make_embed_fn()(PARAMS, {k: v[1::4] for k, v in BATCH.items()}, jax.random.fold_in(DROPOUT, 1))[0]
    np.testing.assert_allclose(np.asarray(za[1::4]), np.asarray(chunk1), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(za), np.asarray(full[0][-1]), atol=1e-3)  # dropout did act


def test_chunk_size_must_divide_batch():
    with pytest.raises(ValueError, match="divide"):
        gradcache_value_and_grad(make_embed_fn(), lambda z: infonce(*z), 5)(PARAMS, BATCH)


@pytest.mark.parametrize("name,data,fsdp", [(name, *mesh) for name, mesh in SHARDED.items()])
def test_gradcache_sharded_on_8_devices(name, data, fsdp):
    """GradCache equals the uncached loss and gradients with dropout, batch 32 over every device,
    chunk 8 (one row per device per chunk), FSDP params on (2, 4)."""
    per_layer, axis, loss_fn = LOSSES[name]
    embed_fn = make_embed_fn(per_layer)
    batch = make_batch(32, seed=1)
    want = jax.jit(uncached(embed_fn, loss_fn, 8, axis))(PARAMS, batch, *_args(name))

    mesh = sharding.make_mesh(data=data, fsdp=fsdp)
    p_shard = sharding.param_shardings(PARAMS, mesh, bert.SHARDING_RULES)
    step = jax.jit(gradcache_value_and_grad(embed_fn, loss_fn, 8, batch_axis=axis), out_shardings=(NamedSharding(mesh, P()), p_shard))
    got = step(jax.device_put(PARAMS, p_shard), sharding.to_global(batch, mesh), *_args(name))
    assert_same(got, want)
    up = got[1]["layers"]["mlp"]["up"]["kernel"]
    assert up.sharding.spec == (P(None, "fsdp") if fsdp > 1 else P())  # grads come out FSDP-sharded like the params


def _temp_bytes(f, b):
    params = jax.eval_shape(functools.partial(bert.init, CFG), jax.random.key(0))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(b))
    return jax.jit(f).lower(params, batch, jax.random.key(0)).compile().memory_analysis().temp_size_in_bytes


def test_gradcache_memory_grows_with_chunk_not_batch():
    """Compiled temp memory from batch 64 to 512 (chunk 16): the plain loss stores every
    example's activations, GradCache only one chunk's (plus the B x B logits of the loss)."""
    embed_fn, loss_fn = make_embed_fn(), lambda z: infonce(*z)
    plain = jax.value_and_grad(lambda p, x, k: loss_fn(embed_fn(p, x, k)))
    cached = gradcache_value_and_grad(embed_fn, loss_fn, 16)
    plain_growth = _temp_bytes(plain, 512) - _temp_bytes(plain, 64)
    cached_growth = _temp_bytes(cached, 512) - _temp_bytes(cached, 64)
    assert plain_growth > 10 * 2**20
    assert cached_growth < 0.2 * plain_growth, (cached_growth, plain_growth)
