"""bfloat16 products and training steps: the mixed-precision dense / attention products
(gradients against float64, the dtypes of the backward matmuls) and bf16 training steps (padded,
packed, GradCache) against the float32 step, on tiny models. bf16 encoding of the real
checkpoint against sentence-transformers: tests/test_bf16.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from embedjax import tokenize
from embedjax.data import pipeline
from embedjax.encoders import bert
from embedjax.encoders import layers as L
from embedjax.train.objective import Objective
from embedjax.train.state import TrainState
from embedjax.train.step import train_step

pytestmark = pytest.mark.fast_compile  # tiny models against float32 / float64 references: compile-bound (conftest.py)

BF16, F32 = jnp.bfloat16, jnp.float32


# --- the mixed-precision products ---------------------------------------------------------------


def dot_operand_dtypes(fn, *args):
    """(lhs dtype, rhs dtype) of every dot_general in ``fn``'s jaxpr, sub-jaxprs included."""
    from jax.extend.core import jaxprs_in_params

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield tuple(jnp.dtype(v.aval.dtype).name for v in eqn.invars)
            for sub in jaxprs_in_params(eqn.params):
                yield from walk(sub)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def naive_dense(p, x):
    """The formulation before the custom VJP: JAX transposes it with float32 cotangents."""
    y = jnp.dot(x, p["kernel"].astype(x.dtype), preferred_element_type=F32)
    return (y + p["bias"]).astype(x.dtype)


def dense_problem(seed=0, m=48, d_in=96, d_out=80):
    rng = np.random.default_rng(seed)
    p = {"kernel": jnp.asarray(rng.normal(0, 0.5, (d_in, d_out)), F32),
         "bias": jnp.asarray(rng.normal(0, 0.5, d_out), F32)}
    x = jnp.asarray(rng.normal(0, 1, (2, m // 2, d_in)), BF16)
    w = jnp.asarray(rng.normal(0, 1, (2, m // 2, d_out)), F32)
    return p, x, w


def test_bf16_dense_gradients_match_float64_reference():
    p, x, w = dense_problem()
    loss = lambda p, x: jnp.sum(L.dense(p, x).astype(F32) * w)
    grads = jax.grad(loss, argnums=(0, 1))(p, x)
    (gp, gx) = grads
    assert gp["kernel"].dtype == F32 and gp["bias"].dtype == F32 and gx.dtype == BF16  # primal dtypes
    # NumPy float64: y = x @ k + b, L = sum(y * w) -> dk = x^T w, db = sum w, dx = w k^T.
    x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    k64 = np.asarray(p["kernel"], np.float64)
    w64 = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
    ref = {"kernel": x64.T @ w64, "bias": w64.sum(0), "x": (w64 @ k64.T).reshape(x.shape)}
    got = {"kernel": gp["kernel"], "bias": gp["bias"], "x": gx}
    for name in ref:
        err = np.abs(np.asarray(got[name], np.float64) - ref[name]).max() / np.abs(ref[name]).max()
        assert err < 2e-2, (name, err)  # bf16 cotangent / kernel rounding: ~2^-8 relative
    # And against float32 autodiff of the same product (inputs the same bf16 values).
    g32 = jax.grad(lambda p, x: jnp.sum(L.dense(p, x) * w), argnums=(0, 1))(p, x.astype(F32))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g32)):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-2 * np.abs(b).max())


def test_float32_dense_is_unchanged():
    p, x, w = dense_problem(1)
    x = x.astype(F32)
    got = jax.grad(lambda p, x: jnp.sum(L.dense(p, x) * w), argnums=(0, 1))(p, x)
    want = jax.grad(lambda p, x: jnp.sum(naive_dense(p, x) * w), argnums=(0, 1))(p, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise: the same program
    np.testing.assert_array_equal(np.asarray(L.dense(p, x)), np.asarray(naive_dense(p, x)))


def test_bf16_dense_backward_matmuls_take_bf16_operands():
    p, x, w = dense_problem()
    grad = lambda dense: jax.grad(lambda p, x: jnp.sum(dense(p, x).astype(F32) * w), argnums=(0, 1))
    dots = dot_operand_dtypes(grad(L.dense), p, x)
    assert len(dots) == 3  # forward, d/dx, d/dkernel
    assert dots == [("bfloat16", "bfloat16")] * 3, dots
    # The check can fail: JAX's own transpose of the naive product mixes float32 cotangents in.
    naive = dot_operand_dtypes(grad(naive_dense), p, x)
    assert len(naive) == 3 and sum("float32" in d for d in naive) == 2, naive


def attention_problem(seed=0, b=2, t=12, h=32, heads=4):
    rng = np.random.default_rng(seed)
    p = {n: {"kernel": jnp.asarray(rng.normal(0, 0.3, (h, h)), F32), "bias": jnp.asarray(rng.normal(0, 0.1, h), F32)}
         for n in ("query", "key", "value")}
    x = jnp.asarray(rng.normal(0, 1, (b, t, h)), BF16)
    mask = np.ones((b, t), np.int32)
    mask[1, 7:] = 0
    w = jnp.asarray(rng.normal(0, 1, (b, t, h)), F32)
    return p, x, L.attention_bias(jnp.asarray(mask)), w, heads


def test_bf16_attention_gradients_and_backward_matmuls():
    p, x, bias, w, heads = attention_problem()
    attn = lambda p, x: jnp.sum(L.self_attention(p, x, bias, num_heads=heads).astype(F32) * w)
    grad = jax.grad(attn, argnums=(0, 1))
    got = grad(p, x)
    want = grad(p, x.astype(F32))  # float32 autodiff, the same input values
    assert all(g.dtype == F32 for g in jax.tree.leaves(got[0])) and got[1].dtype == BF16
    scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(want))
    # The key bias's true gradient is 0 (softmax is shift-invariant): only bf16 noise, small on
    # the scale of the other gradients; every other leaf agrees to ~1% of its own scale.
    np.testing.assert_allclose(np.asarray(got[0]["key"]["bias"]), 0, atol=5e-3 * scale)
    got[0]["key"].pop("bias"), want[0]["key"].pop("bias")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-2 * np.abs(b).max())
    dots = dot_operand_dtypes(grad, p, x)
    assert len(dots) == 3 * 5  # q/k/v projections and the two attention products, each x3
    assert set(dots) == {("bfloat16", "bfloat16")}, dots


# --- training steps in bf16 ---------------------------------------------------------------------


TINY = bert.BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0)
ANGLE = Objective(loss="angle", loss_kwargs=(("label_range", (0.0, 5.0)),), dropout=False)


@pytest.fixture(scope="module")
def tiny_tokenizer(minilm_path):
    return tokenize.Tokenizer.from_directory(minilm_path, 64, 0)


def make_batch(tokenizer, sentences, layout):
    records = [{"text_a": sentences[i], "text_b": sentences[i + 1500], "score": float(i % 6)} for i in range(8)]
    packing = pipeline.Packing(length=64, rows_multiple=2) if layout == "packed" else None
    batch = pipeline.collate(list(enumerate(records)), tokenizer, len(records), ("text_a", "text_b", "score"),
                             packing=packing)
    return batch.model_inputs()


LAYOUTS = {
    "padded": ("padded", ANGLE),
    "packed": ("packed", ANGLE),
    "gradcache": ("padded", dataclasses.replace(ANGLE, gradcache_chunk=4)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_train_step_close_to_float32_with_float32_state(name, tiny_tokenizer, stsb_dev_sentences):
    layout, objective = LAYOUTS[name]
    batch = make_batch(tiny_tokenizer, stsb_dev_sentences, layout)
    assert (batch.packed is not None) == (layout == "packed")
    params = bert.init(TINY, jax.random.key(0))
    tx = optax.adamw(1e-3, weight_decay=0.01)
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = dataclasses.replace(TINY, dtype=dtype)
        step = jax.jit(functools.partial(train_step, enc_cfg=cfg, objective=objective, tx=tx))
        state, metrics = step(TrainState.create(params, tx, 0), batch)
        out[dtype] = (state, {k: float(v) for k, v in metrics.items()})
        if dtype == "bfloat16":  # every product of the step is bf16 x bf16 or float32 x float32, none mixed
            dots = dot_operand_dtypes(functools.partial(train_step, enc_cfg=cfg, objective=objective, tx=tx),
                                      TrainState.create(params, tx, 0), batch)
            assert ("bfloat16", "bfloat16") in dots
            assert all(a == b for a, b in dots), sorted(set(dots))
    (state16, m16), (state32, m32) = out["bfloat16"], out["float32"]
    assert np.isfinite(m16["loss"]) and np.isfinite(m16["grad_norm"])
    assert abs(m16["loss"] - m32["loss"]) <= 1e-2 * abs(m32["loss"]), (m16["loss"], m32["loss"])
    assert abs(m16["grad_norm"] - m32["grad_norm"]) <= 5e-2 * m32["grad_norm"], (m16, m32)
    # Parameters and every optimizer-state leaf stay float32 (AdamW's count stays an integer).
    for tree in (state16.params, state16.opt_state):
        for leaf in jax.tree.leaves(tree):
            assert leaf.dtype == F32 or jnp.issubdtype(leaf.dtype, jnp.integer), leaf.dtype
    assert jax.tree.map(lambda a: (a.shape, a.dtype), state16) == jax.tree.map(lambda a: (a.shape, a.dtype), state32)
    assert all(np.isfinite(np.asarray(w)).all() for w in jax.tree.leaves(state16.params))
