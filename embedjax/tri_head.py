"""The C-STS tri-encoder's head (arXiv:2305.15093, section 4): the two sentences and the condition
are embedded separately by one encoder, and a small head conditions each sentence's embedding on
the condition's before the cosine scores the pair.

    c' = W_c c + b_c                                   (the condition's own projection)
    hadamard:  f(s, c) = s * c'
    concat:    f(s, c) = gelu(W_f [s; c'] + b_f)       (exact GELU, BERT's hidden activation)
    score(s1, s2 | c) = cos(f(s1, c), f(s2, c))

The head is ``params["tri_head"]`` of the encoder's params (``{"condition": {kernel, bias}}``, plus
``"combine"`` for concat: the kind is read from the tree), so it trains, shards, checkpoints and
exports with the encoder (``tri_head.safetensors`` beside the model; ``embedjax.model.load_pretrained``
reads it back). Pure functions of arrays: jit, vmap and grad apply.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from embedjax import similarity as sim

KINDS = ("hadamard", "concat")
KEY = "tri_head"


def init(key, hidden: int, kind: str = "hadamard") -> dict:
    """A fresh head for embeddings of width ``hidden``: the condition projection starts at the
    identity (so a fresh hadamard head is the plain product of the two embeddings), the concat
    layer at a small random matrix (N(0, 0.02), as BERT initialises its layers)."""
    if kind not in KINDS:
        raise ValueError(f"tri_head must be one of {KINDS}, got {kind!r}")
    head = {"condition": {"kernel": jnp.eye(hidden, dtype=jnp.float32), "bias": jnp.zeros((hidden,), jnp.float32)}}
    if kind == "concat":
        head["combine"] = {"kernel": 0.02 * jax.random.normal(key, (2 * hidden, hidden), jnp.float32),
                           "bias": jnp.zeros((hidden,), jnp.float32)}
    return head


def kind_of(head) -> str:
    """``"concat"`` or ``"hadamard"``, read from the head's params."""
    return "concat" if "combine" in head else "hadamard"


def _dense(p, x):
    return x @ p["kernel"].astype(x.dtype) + p["bias"].astype(x.dtype)


def condition(head, s, c):
    """``f(s, c)``: sentence embeddings ``s`` conditioned on condition embeddings ``c`` (both
    ``(..., D)``, raw or normalised as the caller chose)."""
    s, c = sim.as_float32(s), sim.as_float32(c)
    c = _dense(head["condition"], c)
    if kind_of(head) == "hadamard":
        return s * c
    return jax.nn.gelu(_dense(head["combine"], jnp.concatenate([s, c], axis=-1)), approximate=False)


def score(head, s1, s2, c):
    """``cos(f(s1, c), f(s2, c))`` per example: ``(..., D) x 3 -> (...)``."""
    return sim.cosine_pairwise(condition(head, s1, c), condition(head, s2, c))
