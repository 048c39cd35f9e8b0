"""Compiled memory of one InfoNCE value-and-grad: GradCache vs the plain (uncached) loss.

    python benchmarks/gradcache_memory.py                      # batch 256/1024/4096, chunk 32
    python benchmarks/gradcache_memory.py --batches 64 256 --chunk 16 --chunk-sweep

all-MiniLM-L6-v2's architecture (384 hidden, 6 layers, 12 heads, 1536 intermediate, vocab
30522) with abstract params (``jax.eval_shape``: nothing is allocated or run, only lowered and
compiled), sequence length 32, (anchor, positive) pairs, dropout on. Reports XLA's
``memory_analysis()`` of the compiled step: temp = peak scratch (activations, gradients in
flight), the number that decides whether a batch fits.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from embedjax.embed import embed
from embedjax.encoders.bert import BertConfig, init
from embedjax.gradcache import gradcache_value_and_grad
from embedjax.losses import infonce

MINILM_L6 = BertConfig(
    vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536, max_position_embeddings=512
)


def embed_fn(params, x, key):
    ka, kb = jax.random.split(key)
    za = embed(params, MINILM_L6, x["a_ids"], x["a_mask"], dropout_key=ka)
    zb = embed(params, MINILM_L6, x["b_ids"], x["b_mask"], dropout_key=kb)
    return za, zb


def loss_fn(z):
    return infonce(*z)


def plain(params, x, key):
    return jax.value_and_grad(lambda p: loss_fn(embed_fn(p, x, key)))(params)


def memory(f, batch, seq):
    params = jax.eval_shape(functools.partial(init, MINILM_L6), jax.random.key(0))
    x = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ("a_ids", "a_mask", "b_ids", "b_mask")}
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.jit(f).lower(params, x, key).compile().memory_analysis()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--chunk-sweep", type=int, nargs="*", default=[8, 32, 128], help="chunks tried at --sweep-batch")
    parser.add_argument("--sweep-batch", type=int, default=1024)
    args = parser.parse_args()
    mib = 2**20
    cached = gradcache_value_and_grad(embed_fn, loss_fn, args.chunk)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"all-MiniLM-L6-v2 config, seq {args.seq}, InfoNCE pairs, dropout on, GradCache chunk {args.chunk}")
    print("| batch | plain temp MiB | GradCache temp MiB | plain / GradCache | B x B logits, 1 copy, MiB | args MiB | output MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batches:
        p, g = memory(plain, b, args.seq), memory(cached, b, args.seq)
        logits = b * b * 4 / mib  # anchors x positives, float32 (the loss's B x B similarity matrix)
        print(f"| {b} | {p.temp_size_in_bytes / mib:,.1f} | {g.temp_size_in_bytes / mib:,.1f} | "
              f"{p.temp_size_in_bytes / g.temp_size_in_bytes:.1f}x | {logits:,.1f} | "
              f"{g.argument_size_in_bytes / mib:,.1f} | {g.output_size_in_bytes / mib:,.1f} |", flush=True)
    if args.chunk_sweep:
        print(f"\nGradCache at batch {args.sweep_batch}, varying the chunk:\n")
        print("| chunk | GradCache temp MiB |")
        print("|---:|---:|")
        for c in args.chunk_sweep:
            g = memory(gradcache_value_and_grad(embed_fn, loss_fn, c), args.sweep_batch, args.seq)
            print(f"| {c} | {g.temp_size_in_bytes / mib:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
