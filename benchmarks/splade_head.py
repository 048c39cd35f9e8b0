"""A SPLADE head's forward and backward (the MLM head tied to the word embeddings, max pooling of
log(1 + ReLU)) under XLA with the plain matmul and with ``layers.tied_logits`` (its custom backward
writes the word matrix's gradient as one ordinary GEMM): seconds per call, best of 3.

    python benchmarks/splade_head.py            # 32 texts x 128 tokens, MiniLM's 384 x 30,522
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embedjax import sparse  # noqa: E402
from embedjax.encoders import layers as L  # noqa: E402

B, T, H, V = 32, 128, 384, 30522


def head_weights(logits_fn, head, words, hidden, mask):
    x = hidden @ head["transform"]["kernel"] + head["transform"]["bias"]
    x = L.layer_norm(head["norm"], L.activation("gelu")(x), 1e-12)
    return sparse.splade_pool(logits_fn(x, words) + head["bias"], mask)


def best_of(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    words = jnp.asarray(0.05 * rng.normal(size=(V, H)), jnp.float32)
    mask = jnp.asarray((np.arange(T)[None] < rng.integers(20, T, B)[:, None]).astype(np.int32))
    head = sparse.init_mlm_head(H, V, None)
    variants = {"plain matmul": lambda x, w: x @ w.T, "layers.tied_logits": L.tied_logits}
    print(f"SPLADE head, {B} x {T} tokens, {H} x {V}: forward + backward (words and states), best of 3")
    for name, fn in variants.items():
        step = jax.jit(jax.grad(lambda w, h, fn=fn: jnp.sum(head_weights(fn, head, w, h, mask) ** 2),
                                argnums=(0, 1)))
        print(f"  {name:20s} {best_of(step, words, hidden):.2f} s", flush=True)


if __name__ == "__main__":
    main()
