"""A cross-encoder on STS-B side by side: embedjax's configs/stsb_cross_encoder.py vs sentence-transformers'
CrossEncoder, the same model, data, batches, steps and schedule.

Both start from all-MiniLM-L6-v2's backbone with a fresh one-logit head and train with binary
cross-entropy on the gold score / 5 over STS-B train: batches of 16 pairs in embedjax's own order
(``pipeline.training_order`` with the seed, replayed to sentence-transformers' trainer through its
batch sampler), 4 epochs, AdamW at lr 2e-5 with 10% linear warmup and linear decay, weight decay
0.01, gradient clipping at 1.0, dropout 0.1, 128 tokens. Each model's last step is scored by the
same embedjax evaluator (``CrossEncoderSTSEvaluator``: Spearman / Pearson x100 of the sigmoid
scores): STS-B dev and SICK trial. Nothing is selected on dev.

Each (method, seed) runs in its own subprocess; its row is appended to ``ROOT/results.jsonl`` and
a rerun skips what is there.

    python benchmarks/cross_encoder_stsb.py                       # both methods, seeds 0 1 2
    python benchmarks/cross_encoder_stsb.py --methods embedjax --seeds 0
    CROSS_STSB_SMOKE=4 python benchmarks/cross_encoder_stsb.py --root /tmp/ce --seeds 0   # a check
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
sys.path.insert(0, str(ROOT / "benchmarks"))
DATA = Path(os.environ.get("EMBEDJAX_DATA", ROOT.parent / "shared" / "data"))
SMOKE_STEPS = int(os.environ.get("CROSS_STSB_SMOKE", "0"))  # > 0: that many steps (a check of the script)
METHODS = {"embedjax": "configs/stsb_cross_encoder.py (BCE on score / 5)",
           "st": "sentence-transformers CrossEncoder + BinaryCrossEntropyLoss"}


def recipe(seed: int):
    from configs import stsb_cross_encoder

    c = stsb_cross_encoder.get_config(f"seed={seed}")
    c.num_steps = SMOKE_STEPS or None
    return c


def score(path: str) -> dict[str, float]:
    """STS-B dev and SICK trial Spearman / Pearson of the cross-encoder at ``path``."""
    from embedjax import load_cross_encoder
    from embedjax.eval.suite import from_config

    c = recipe(0)
    model = load_cross_encoder(path)
    out = {}
    for evaluator in from_config(c.evals.to_dict()):
        out.update(evaluator.run(model))
    return {"stsb": out["dev/spearman"], "stsb_pearson": out["dev/pearson"], "sick": out["sick_trial/spearman"]}


def batches(seed: int) -> list[list[dict]]:
    """The batches configs/stsb_cross_encoder.py trains on with ``seed``: records, step by step."""
    from embedjax.data import pipeline
    from embedjax.train import sources
    from embedjax.train.config import TrainConfig

    run = TrainConfig.from_config(recipe(seed))
    records = sources.train_source(run.sources["train"].data)
    steps = SMOKE_STEPS or int(round(run.num_epochs * pipeline.steps_per_epoch(len(records), run.batch_size)))
    order = pipeline.training_order(records, global_batch_size=run.batch_size, seed=run.seed)
    return [[pipeline.as_record(r) for _, r in order[step]] for step in range(steps)]


def run_st(seed: int, workdir: Path) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import TrainerCallback

    from embedjax import hf

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    c = recipe(seed)
    planned = batches(seed)
    rows = [r for batch in planned for r in batch]
    dataset = Dataset.from_dict({"sentence1": [r["text_a"] for r in rows], "sentence2": [r["text_b"] for r in rows],
                                 "label": [r["score"] / 5.0 for r in rows]})
    size = c.batch_size
    replay = [list(range(i * size, (i + 1) * size)) for i in range(len(planned))]

    class Trainer(CrossEncoderTrainer):
        def get_batch_sampler(self, *args, **kwargs):
            return replay

    model = CrossEncoder(hf.minilm_l6(), num_labels=1, max_length=c.max_length, device="cpu")
    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    steps = len(planned)
    args = CrossEncoderTrainingArguments(
        output_dir=str(workdir / "trainer"), max_steps=steps, per_device_train_batch_size=size,
        learning_rate=c.optim.learning_rate, warmup_steps=int(round(c.optim.warmup * steps)),
        lr_scheduler_type="linear", weight_decay=c.optim.weight_decay, max_grad_norm=c.optim.clip_norm,
        adam_epsilon=c.optim.eps, seed=seed, dataloader_drop_last=True, eval_strategy="no", save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True)
    t0 = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=dataset, loss=BinaryCrossEntropyLoss(model),
            callbacks=[Timer()]).train()
    train_s = time.perf_counter() - t0
    if len(stamps) != steps:
        raise RuntimeError(f"the trainer ran {len(stamps)} steps, not {steps}")
    model.save_pretrained(str(workdir / "export"))
    times = list(np.diff(stamps))[min(5, steps // 2):]
    return {"steps": steps, "train_s": round(train_s, 1), "step_s": round(statistics.median(times), 3),
            **score(str(workdir / "export"))}


def run_embedjax(seed: int, workdir: Path) -> dict:
    from embedjax.train.loop import train_and_evaluate

    c = recipe(seed)
    c.log_every = 1
    c.eval_start, c.eval_export = False, False
    c.eval_every = 10**9  # only after the last step: the export is the last step, as sentence-transformers'
    c.checkpoint.every = 10**9
    t0 = time.perf_counter()
    summary = train_and_evaluate(c, workdir / "export")
    train_s = time.perf_counter() - t0
    logged = [json.loads(line) for line in (workdir / "export" / "metrics.jsonl").read_text().splitlines()]
    times = [c.batch_size / r["examples_per_s"] for r in logged if "examples_per_s" in r]
    return {"steps": summary["steps"], "train_s": round(train_s, 1), "step_s": round(statistics.median(times), 3),
            **score(str(workdir / "export"))}


def main() -> None:
    import retrieval_finetune as rf  # its table helpers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--root", default="workdirs/cross_encoder_stsb")
    ap.add_argument("--_run", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = root / "results.jsonl"
    if args._run:
        method, seed = args._run[0], int(args._run[1])
        workdir = root / method / f"seed{seed}"
        if workdir.exists():
            import shutil

            shutil.rmtree(workdir)  # an unfinished run starts over
        workdir.mkdir(parents=True)
        row = {"method": method, "seed": seed, **(run_st if method == "st" else run_embedjax)(seed, workdir)}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return
    done = {(r["method"], r["seed"]) for r in rf.load_rows(results)}
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) not in done:
                cmd = [sys.executable, __file__, "--_run", method, str(seed), "--root", str(root)]
                print("$", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"machine: {rf.machine()}")
    rows = [r for r in rf.load_rows(results) if r["method"] in args.methods]
    print("| method | seeds | STS-B dev Spearman | STS-B dev Pearson | SICK trial Spearman | step s | train s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method in args.methods:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if not mine:
            continue
        cell = lambda k: (f"{statistics.fmean(r[k] for r in mine):.2f} +- "  # noqa: E731
                          f"{max(r[k] for r in mine) - min(r[k] for r in mine):.2f}")
        print(f"| {method} | {','.join(str(r['seed']) for r in mine)} | {cell('stsb')} | {cell('stsb_pearson')} | "
              f"{cell('sick')} | {statistics.median(r['step_s'] for r in mine):.3f} | "
              f"{statistics.fmean(r['train_s'] for r in mine):.0f} |")
    for method in args.methods:
        print(f"  {method}: {METHODS[method]}")


if __name__ == "__main__":
    main()
