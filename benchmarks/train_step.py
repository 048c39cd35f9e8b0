"""One training step of configs/stsb_angle.py in isolation: padded vs packed batches, float32 vs bfloat16.

The jitted ``train_step`` (forward, backward, AdamW) of all-MiniLM-L6-v2 on real STS-B train
batches of 32 pairs (seeded shuffle), compiled for every batch shape first, then timed batch
by batch (median). Reports token slots per step (what the encoder computes on) next to the
real tokens, so the effect of the layout is visible apart from the kernels.

bfloat16 rows: params, optimizer state, layer norm and softmax stay float32; every matmul
takes bf16 operands and accumulates in float32, the backward pass's included
(``embedjax.encoders.layers.mixed_einsum``). The ``bf16 dots`` column counts the matrix
products of the compiled step (XLA:CPU ``dot``, GPU gemm custom calls) whose operands are
both bf16, out of all: it shows whether the backward really runs bf16 after XLA's passes
(the loss / pooling products stay float32 on purpose). Each layout ends with the bf16 /
float32 step-time ratio. ``TFLOP/s`` and ``MFU`` (median over the batches): each batch shape's
model FLOPs (``embedjax.train.flops``: XLA's cost analysis of that compiled step, the
``CompiledSteps`` the training loop runs) over its step time, against the device's peak for the
dtype (the chip's table figure; on CPU a measured matmul peak, printed first). Runs on any
backend (CPU, GPU); ``--data`` or ``EMBEDJAX_DATA`` points at the data directory holding
``stsb/sts-train.csv``.

    python benchmarks/train_step.py                    # padded + packed, float32 + bfloat16
    python benchmarks/train_step.py --batches 60 --layouts packed --dtypes float32
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs.base import DATA  # noqa: E402  ($EMBEDJAX_DATA, else ../shared/data)

DEFAULT_TRAIN = DATA / "stsb" / "sts-train.csv"


def matmul_dtypes(hlo_text: str) -> tuple[int, int]:
    """(products with two bf16 operands, all products) in compiled HLO text: ``dot`` ops
    (XLA:CPU) and gemm custom calls (XLA:GPU's cuBLAS / cuBLASLt), operand types looked up
    from their definitions in the same computation."""
    types, both, total = {}, 0, 0
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \(?(\w+)\[", line)
        if m:
            types[m.group(1)] = m.group(2)
        call = re.search(r" dot\(%([^,)]+), %([^,)]+)\)", line)
        if call is None and "custom-call(" in line and any(k in line.lower() for k in ("gemm", "cublas", "matmul")):
            call = re.search(r"custom-call\(%([^,)]+), %([^,)]+)", line)
        if call:
            total += 1
            both += all(types.get(name) == "bf16" for name in call.groups())
    return both, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=40, help="distinct batches timed (each once, after compiling)")
    ap.add_argument("--layouts", nargs="+", default=["padded", "packed"], choices=("padded", "packed"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--train", default=str(DEFAULT_TRAIN))
    args = ap.parse_args()

    import jax
    import numpy as np

    from configs import stsb_angle
    from embedjax import load_pretrained, tokenize
    from embedjax.data import pipeline, read_stsb
    from embedjax.train import flops, optim
    from embedjax.train.objective import Objective
    from embedjax.train.state import TrainState
    from embedjax.train.step import CompiledSteps, train_step

    c = stsb_angle.get_config()
    enc = load_pretrained(c.model)
    objective = Objective.from_config(c.objective, enc.pooling)
    tx, _ = optim.make_optimizer(c.optim, 179)
    tok = tokenize.Tokenizer(enc.tokenizer.backend, enc.max_length, enc.cfg.pad_token_id, buckets=tuple(c.data.buckets))
    rows = read_stsb(args.train)
    order = np.random.default_rng(c.seed).permutation(len(rows))
    groups = [[(int(i), rows[i]) for i in order[s:s + c.batch_size]]
              for s in range(0, c.batch_size * args.batches, c.batch_size)]
    real = statistics.mean(sum(len(e.ids) for e in tok.encode([t for _, r in g for t in (r.text_a, r.text_b)]))
                           for g in groups)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {args.batches} batches of {c.batch_size} pairs, "
          f"{real:.0f} real tokens per step")
    peaks = {dtype: flops.run_peak(dtype, 1) for dtype in args.dtypes}
    print("peak for MFU: " + "; ".join(f"{d} {p / 1e12:.3f} TFLOP/s ({where})" if p else f"{d} unknown ({where})"
                                       for d, (p, where) in peaks.items()))
    print(f"{'layout':8s} {'dtype':9s} {'token slots':>11s} {'shapes':>6s} {'step ms (median)':>17s} {'p25-p75':>11s} "
          f"{'bf16 dots':>10s} {'TFLOP/s':>8s} {'MFU':>6s}")
    for layout in args.layouts:
        packing = pipeline.Packing(c.data.pack_length, c.data.pack_rows_multiple) if layout == "packed" else None
        batches = [pipeline.collate(g, tok, c.batch_size, ("text_a", "text_b", "score"), None, True, packing)
                   for g in groups]
        batches = [b.model_inputs() for b in batches]
        token_ids = lambda b: [s.ids for s in b.sides.values() if s.ids is not None] + (  # noqa: E731
            [b.packed.ids] if b.packed is not None else [])
        slots = statistics.mean(sum(ids.size for ids in token_ids(b)) for b in batches)
        shapes = {tuple(ids.shape for ids in token_ids(b)) for b in batches}
        medians = {}
        for dtype in args.dtypes:
            cfg = dataclasses.replace(enc.cfg, dtype=dtype)
            jitted = jax.jit(functools.partial(train_step, enc_cfg=cfg, objective=objective, tx=tx), donate_argnums=0)
            step = CompiledSteps(jitted, limit=None, model_cfg=cfg,  # per shape: compiled, its FLOPs
                                 knobs=dict(batch_size=c.batch_size, gradcache_chunk=0, mesh_shape={}, remat=False))
            fresh = jax.tree.map(lambda x: x.copy(), enc.params)  # the step donates (deletes) its input state
            state = TrainState.create(fresh, tx, c.seed)
            both, total = matmul_dtypes(jitted.lower(state, batches[0]).compile().as_text())
            for b in batches:  # compile every shape
                state, m = step(state, b, None)
            jax.block_until_ready(state)
            times, achieved = [], []
            for b in batches:
                t = time.perf_counter()
                state, m = step(state, b, None)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t)
                achieved.append(step.work(b).flops / times[-1])
            q = statistics.quantiles(times, n=4)
            medians[dtype] = statistics.median(times)
            rate = statistics.median(achieved)
            mfu = flops.mfu(rate, peaks[dtype][0])
            print(f"{layout:8s} {dtype:9s} {slots:11.0f} {len(shapes):6d} {1000 * medians[dtype]:17.0f} "
                  f"{1000 * q[0]:5.0f}-{1000 * q[2]:.0f} {f'{both}/{total}':>10s} {rate / 1e12:8.3f} "
                  f"{'-' if mfu is None else f'{mfu:.1%}':>6s}", flush=True)
        if "float32" in medians and "bfloat16" in medians:
            print(f"{layout:8s} bfloat16 / float32 step time: {medians['bfloat16'] / medians['float32']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
