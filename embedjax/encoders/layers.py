"""Transformer building blocks as pure functions over plain dict params.

Conventions: dense kernels are stored (in_features, out_features), i.e. the
transpose of PyTorch's ``nn.Linear.weight``; layer norms are ``{'scale', 'bias'}``.
Layer norm and softmax always run in float32, whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    """Returns the activation function named as in Hugging Face configs."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


def dense(p, x):
    """x @ kernel + bias, in the dtype of x; the product accumulates in float32.

    Asking for a float32 result also selects the fast bf16 kernels on CPUs with AMX
    (a bf16-out matmul takes a ~6x slower path there) and is what TPUs/GPUs do anyway.
    """
    y = jnp.dot(x, p["kernel"].astype(x.dtype), preferred_element_type=jnp.float32)
    return (y + p["bias"]).astype(x.dtype)


def layer_norm(p, x, eps: float):
    """Layer norm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def dropout(x, rate: float, key):
    """Inverted dropout; the identity when ``key`` is None or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention_bias(attention_mask, dtype=jnp.float32):
    """(B, T) 0/1 mask -> (B, 1, 1, T) additive bias: 0 where attended, very negative elsewhere."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


def segment_attention_bias(segment_ids, dtype=jnp.float32):
    """(B, T) segment ids (0 = padding) -> (B, 1, T, T) additive bias for packed sequences:
    a token attends only to the real tokens of its own segment (its own text)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = same & (segment_ids[:, None, :] > 0)
    return jnp.where(allowed[:, None], 0.0, jnp.finfo(dtype).min).astype(dtype)


def self_attention(p, x, bias, *, num_heads: int, dropout_rate: float = 0.0, dropout_key=None):
    """Bidirectional multi-head self-attention (no output projection).

    x: (B, T, H); bias: (B, 1, 1, T) or (B, 1, T, T) additive. Scores and softmax run in float32.
    """
    b, t, h = x.shape
    head_dim = h // num_heads

    def heads(name):
        return dense(p[name], x).reshape(b, t, num_heads, head_dim)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim)) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    probs = dropout(probs, dropout_rate, dropout_key)
    ctx = jnp.einsum("bnqk,bknd->bqnd", probs, v, preferred_element_type=jnp.float32)
    return ctx.astype(x.dtype).reshape(b, t, h)
