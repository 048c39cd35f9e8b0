"""Fine-tuning side by side: sentence-transformers (CoSENTLoss, AnglELoss) vs embedjax (configs/stsb_angle.py).

Same model (all-MiniLM-L6-v2), same data (STS-B train, scores / 5), same epochs, batch size,
peak learning rate and warmup fraction (10%, linear decay). Each trainer runs in its own
subprocess, one after the other (never in parallel), and reports:

* dev Spearman (cosine, x100) before and after training. sentence-transformers: the final
  weights (no evaluation during training). embedjax: ``train_and_evaluate``'s exported model,
  i.e. the best by dev Spearman among the evaluations of its config (step 0 competes);
  the end-of-training value of the last step is reported as well.
* the per-step training time: the median over steady-state steps. sentence-transformers: the
  time between consecutive ``on_step_end`` callbacks (data collation + forward + backward +
  optimizer), skipping the first ``--skip-st`` steps. embedjax: ``log_every=1`` so the loop syncs
  and logs every step (``examples_per_s`` of each row), skipping the steps that compiled a new
  batch shape (the first step of each distinct (side A, side B) shape) and the steps right
  after an evaluation or checkpoint save (their interval includes that work); the median MFU of
  those steps (``mfu`` of each row, ``embedjax.train.flops``) is printed beside it.

    python benchmarks/finetune_vs_st.py                       # ST CoSENT + ST AnglE + embedjax stsb_angle
    python benchmarks/finetune_vs_st.py --lr 2e-5 --epochs 1 --embedjax-configs configs/stsb_angle.py configs/stsb_cosent.py
    python benchmarks/finetune_vs_st.py --only st --st-losses cosent angle matryoshka
    python benchmarks/finetune_vs_st.py --only embedjax --workdir /tmp/ft

``--lr`` (default: the embedjax config's own learning rate, so both sides share it) and
``--epochs`` apply to both trainers; ``--embedjax-override key=value`` passes extra config
overrides to embedjax only (e.g. ``eval_every=20``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "stsb"
KEY = "dev/cosine_spearman"


# --------------------------------------------------------------------------- helpers
def dev_spearman_numpy(za, zb, gold) -> float:
    """Spearman x100 of cosine(za_i, zb_i) vs gold: the formula both sides are scored with."""
    import numpy as np
    from scipy import stats

    za = za / np.linalg.norm(za, axis=1, keepdims=True)
    zb = zb / np.linalg.norm(zb, axis=1, keepdims=True)
    return float(100 * stats.spearmanr(np.sum(za * zb, axis=1), np.asarray(gold, np.float64)).statistic)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def summarize_times(times: list[float]) -> dict:
    if not times:
        return {"median_s": float("nan"), "n": 0}
    qs = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "p25_s": qs[0], "p75_s": qs[2], "n": len(times)}


# --------------------------------------------------------------------------- sentence-transformers
def run_st(loss_name: str, args) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    from embedjax import hf
    from embedjax.data import read_stsb

    train = read_stsb(Path(args.data) / "sts-train.csv")
    dev = read_stsb(Path(args.data) / "sts-dev.csv")
    model = SentenceTransformer(hf.minilm_l6(), device="cpu")

    def evaluate() -> float:
        kw = dict(batch_size=128, convert_to_numpy=True, show_progress_bar=False)
        za = model.encode([p.text_a for p in dev], **kw)
        zb = model.encode([p.text_b for p in dev], **kw)
        return dev_spearman_numpy(za, zb, [p.score for p in dev])

    before = evaluate()
    ds = Dataset.from_dict({"sentence1": [p.text_a for p in train], "sentence2": [p.text_b for p in train],
                            "score": [p.score / 5.0 for p in train]})
    if loss_name == "cosent":
        loss = losses.CoSENTLoss(model)
    elif loss_name == "angle":
        loss = losses.AnglELoss(model)
    elif loss_name == "matryoshka":
        loss = losses.MatryoshkaLoss(model, losses.CoSENTLoss(model), [384, 256, 128, 64, 32])
    else:
        raise ValueError(loss_name)
    # Same step count as embedjax (its pipeline drops the last partial batch).
    steps = args.steps or int(round(args.epochs * (len(train) // args.batch_size)))
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    targs = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.workdir) / f"st_{loss_name}"), max_steps=steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=int(round(0.1 * steps)), lr_scheduler_type="linear", seed=args.seed,
        dataloader_drop_last=True, eval_strategy="no", save_strategy="no", report_to="none",
        logging_steps=max(steps // 10, 1), disable_tqdm=True, use_cpu=True)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=ds, loss=loss, callbacks=[Timer()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    model.eval()
    after = evaluate()
    times = list(np.diff(stamps))[args.skip_st:]
    return {"trainer": f"st:{loss_name}", "before": before, "end": after, "after": after, "steps": steps,
            "best_step": steps, "train_wall_s": wall, "step_time": summarize_times(times)}


# --------------------------------------------------------------------------- embedjax
def run_embedjax(config_path: str, args) -> dict:
    import importlib.util

    import jax

    from embedjax.train.callbacks import Callback
    from embedjax.train.loop import train_and_evaluate


    path, _, variant = config_path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_cfg", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(variant or None)
    c.num_epochs = args.epochs
    c.num_steps = args.steps  # 0 = epochs
    c.batch_size = args.batch_size
    c.seed = args.seed
    if args.lr is not None:
        c.optim.learning_rate = args.lr
    c.optim.warmup = 0.1
    c.data.train = str(Path(args.data) / "sts-train.csv")
    c.evals.dev.path = str(Path(args.data) / "sts-dev.csv")
    for kv in args.embedjax_override:
        key, _, value = kv.partition("=")
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        old = node[leaf]
        node[leaf] = type(old)(json.loads(value)) if not isinstance(old, str) else value
    c.log_every = 1  # sync + log every step: the per-step time of each row

    # Which steps compiled: a jax.monitoring listener counts XLA compilations and a loop
    # Callback notes the count after every step (the loop's seam; no internals patched).
    compiles = [0]

    def on_event(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    compiled_at: dict[int, int] = {}
    note = Callback(every=1, fn=lambda step, state, metrics: compiled_at.__setitem__(step, compiles[0]))
    name = Path(path).stem + (f":{variant}" if variant else "")
    workdir = Path(args.workdir) / f"embedjax_{name.replace(':', '_')}"
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)
    t0 = time.perf_counter()
    summary = train_and_evaluate(c, workdir, callbacks=[note])
    wall = time.perf_counter() - t0

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r[KEY] for r in rows if KEY in r}
    per_step = {r["step"]: c.batch_size / r["examples_per_s"] for r in rows if "examples_per_s" in r}
    compiled = {s for s, n in compiled_at.items() if n > compiled_at.get(s - 1, 0)}
    busy = {s + 1 for s in evals} | {s + 1 for s in per_step if s % c.checkpoint.every == 0}
    steady = [t for s, t in per_step.items() if s not in compiled and s not in busy]
    steady_mfu = [r["mfu"] for r in rows if "mfu" in r and r["step"] not in compiled and r["step"] not in busy]
    total = summary["steps"]
    return {
        "trainer": f"embedjax:{name}", "before": summary["before"][KEY] if summary["before"] else None,
        "after": summary["after"][KEY], "best_step": summary["best_step"], "steps": total,
        "end": evals.get(total), "evals": evals, "train_wall_s": wall,
        "compiles": len(compiled), "compile_steps": sorted(compiled),
        "compile_step_time_s": [round(per_step[s], 2) for s in sorted(compiled) if s in per_step],
        "step_time": summarize_times(steady),
        "mfu_median": statistics.median(steady_mfu) if steady_mfu else None,  # metrics.jsonl's, steady steps
        "config": {"lr": c.optim.learning_rate, "overrides": args.embedjax_override},
    }


# --------------------------------------------------------------------------- driver
def child(args) -> None:
    if args.only == "st":
        results = [run_st(name, args) for name in args.st_losses]
    else:
        results = [run_embedjax(cfg, args) for cfg in args.embedjax_configs]
    Path(args.json_out).write_text(json.dumps(results, indent=2))


def default_lr(config_path: str) -> float:
    import importlib.util

    path, _, variant = config_path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_cfg", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return float(mod.get_config(variant or None).optim.learning_rate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=0, help="> 0: this many steps instead of --epochs (timing runs)")
    ap.add_argument("--lr", type=float, default=None, help="peak LR for both (default: the embedjax config's)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for sentence-transformers")
    ap.add_argument("--only", choices=("st", "embedjax"), default=None)
    ap.add_argument("--st-losses", nargs="+", default=["cosent", "angle"], choices=("cosent", "angle", "matryoshka"))
    ap.add_argument("--embedjax-configs", nargs="+", default=["configs/stsb_angle.py"])
    ap.add_argument("--embedjax-override", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra embedjax config overrides, e.g. eval_every=20 objective.dropout=false")
    ap.add_argument("--skip-st", type=int, default=5, help="first sentence-transformers steps left out of the median")
    ap.add_argument("--workdir", default="/tmp/finetune_vs_st")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--json-out", default=None, help="write the results as JSON here as well")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lr is None:
        args.lr = default_lr(args.embedjax_configs[0])
    if args._child:
        child(args)
        return

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    sides = [args.only] if args.only else ["st", "embedjax"]
    results = []
    for side in sides:  # one after the other: never two trainings at once
        out = Path(args.workdir) / f"results_{side}.json"
        cmd = [sys.executable, __file__, "--_child", "--only", side, "--json-out", str(out),
               "--epochs", str(args.epochs), "--steps", str(args.steps), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
               "--seed", str(args.seed), "--threads", str(args.threads), "--skip-st", str(args.skip_st),
               "--workdir", args.workdir, "--data", args.data,
               "--st-losses", *args.st_losses, "--embedjax-configs", *args.embedjax_configs]
        if args.embedjax_override:
            cmd += ["--embedjax-override", *args.embedjax_override]
        print(f"[{side}] {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
        results += json.loads(out.read_text())

    print()
    print(f"machine: {machine()}; {f'{args.steps} steps' if args.steps else f'epochs {args.epochs}'}, batch {args.batch_size}, lr {args.lr:g}, warmup 10%, "
          f"linear decay, seed {args.seed}")
    print(f"{'trainer':34s} {'start':>6s} {'end':>6s} {'exported':>9s} {'best step':>10s} "
          f"{'step s (median)':>16s} {'n':>4s} {'wall s':>7s}")
    for r in results:
        st = r["step_time"]
        end = f"{r['end']:.2f}" if r.get("end") is not None else "-"
        print(f"{r['trainer']:34s} {r['before']:6.2f} {end:>6s} {r['after']:9.2f} "
              f"{str(r['best_step']) + '/' + str(r['steps']):>10s} {st['median_s']:16.3f} {st['n']:4d} "
              f"{r['train_wall_s']:7.0f}")
    for r in results:
        if "compiles" in r:
            mfu = "-" if r.get("mfu_median") is None else f"{r['mfu_median']:.1%}"
            print(f"{r['trainer']}: {r['compiles']} steps compiled (steps {r['compile_steps']}, "
                  f"{r['compile_step_time_s']} s); MFU (median of steady steps) {mfu}; dev by step {r['evals']}")
    st_times = [r["step_time"]["median_s"] for r in results if r["trainer"].startswith("st:")]
    ej_times = [r["step_time"]["median_s"] for r in results if r["trainer"].startswith("embedjax:")]
    if st_times and ej_times:
        for r in results:
            if r["trainer"].startswith("embedjax:"):
                for s in results:
                    if s["trainer"].startswith("st:"):
                        print(f"step-time ratio {r['trainer']} / {s['trainer']}: "
                              f"{r['step_time']['median_s'] / s['step_time']['median_s']:.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
