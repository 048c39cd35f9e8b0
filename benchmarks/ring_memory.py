"""Per-device memory of the contrastive loss, ring vs gathered (``objective.negatives_exchange``), on 8
simulated devices, for global batches of 4k, 16k and 64k.

Nothing is allocated: every program is compiled ahead of time and XLA's ``memory_analysis`` says
what one device needs. Two programs per setting:

- the loss alone: InfoNCE + its gradient with respect to 384-wide embeddings (a query, its positive
  and one hard negative per example), as ``losses.infonce`` (gathered) or ``losses.ring.ring_infonce``
  (in its default column tiles of 2,048 candidates, and in whole (local x local) blocks);
- the whole train step of all-MiniLM-L6-v2's shape (``plan.step_memory``: params, AdamW state,
  the encoder under GradCache chunks of 256 texts, 32 tokens per text), as the run would compile it.

    python benchmarks/ring_memory.py                     # the table in benchmarks/README.md
    python benchmarks/ring_memory.py --batches 4096 --no-step
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from configs import base  # noqa: E402
from embedjax import losses  # noqa: E402
from embedjax.losses.ring import ring_infonce  # noqa: E402
from embedjax.train import memory, plan  # noqa: E402

MINILM = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
          "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}
LOSSES = {"gathered": losses.infonce, "ring": ring_infonce}
LOSS_ALONE = {**LOSSES, "ring, whole blocks": functools.partial(ring_infonce, tile_columns=None)}


def loss_temporaries(loss_fn, batch: int, width: int, mesh) -> int:
    """Per-device temporary bytes of ``loss_fn``'s value and gradient on abstract embeddings."""
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    q = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=rows)
    n = jax.ShapeDtypeStruct((batch, 1, width), jnp.float32, sharding=rows)
    grad = jax.jit(jax.value_and_grad(lambda a, p, n: loss_fn(a, p, n), argnums=(0, 1, 2)))
    with jax.set_mesh(mesh):
        return grad.lower(q, q, n).compile().memory_analysis().temp_size_in_bytes


def step_temporaries(exchange: str, batch: int, mesh, *, length: int, chunk: int) -> memory.StepMemory:
    config = base.base_config()
    config.data.kind, config.objective.loss = "triplets", "infonce"
    config.batch_size, config.max_length, config.objective.gradcache_chunk = batch, length, chunk
    config.objective.negatives_exchange = exchange
    return plan.step_memory(config, MINILM, mesh=mesh)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4096, 16384, 65536], help="global batch sizes")
    ap.add_argument("--width", type=int, default=384, help="embedding width of the loss-alone rows")
    ap.add_argument("--length", type=int, default=32, help="tokens per text in the train step")
    ap.add_argument("--chunk", type=int, default=256, help="GradCache chunk of the train step")
    ap.add_argument("--no-step", action="store_true", help="the loss alone (skip the MiniLM train steps)")
    args = ap.parse_args()
    mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
    print("per-device temporaries (MiB), 8 devices; one (local x global) float32 logit block is "
          "local * 2 * global * 4 bytes, one (local x local) block an eighth of that")
    print(f"{'global batch':>12} {'program':>24} {'gathered':>10} {'ring':>10} {'ratio':>7} {'ring, whole blocks':>19} "
          f"{'(local x global)':>17} {'(local x local)':>16} {'compile':>8}")
    for batch in args.batches:
        local = batch // 8
        block = local * 2 * batch * 4  # rows x (positives + hard negatives of the global batch), float32
        t = time.perf_counter()
        sizes = {name: loss_temporaries(fn, batch, args.width, mesh) for name, fn in LOSS_ALONE.items()}
        print(f"{batch:>12} {'loss + gradient':>24} {mib(sizes['gathered']):>10} {mib(sizes['ring']):>10} "
              f"{sizes['gathered'] / sizes['ring']:>6.1f}x {mib(sizes['ring, whole blocks']):>19} {mib(block):>17} "
              f"{mib(block / 8):>16} {time.perf_counter() - t:>7.0f}s", flush=True)
        if args.no_step:
            continue
        t = time.perf_counter()
        steps = {name: step_temporaries(name, batch, mesh, length=args.length, chunk=args.chunk) for name in LOSSES}
        g, r = steps["gathered"].temporaries, steps["ring"].temporaries
        print(f"{batch:>12} {'MiniLM step, GradCache':>24} {mib(g):>10} {mib(r):>10} {g / r:>6.1f}x {'':>19} "
              f"{mib(block):>17} {mib(block / 8):>16} {time.perf_counter() - t:>7.0f}s", flush=True)


if __name__ == "__main__":
    main()
