"""Recipe search: every recipe x 3 seeds, scored on STS-B dev and SICK trial (the exported model).

Each (recipe, seed) trains in its own subprocess (``scripts/train.py --config ... --config.seed=S``)
into ``ROOT/<recipe>/seed<S>``; a finished workdir is not trained again (rerunning the script
only fills in what is missing). The exported model of every run is then scored on both dev
sets with the same evaluator (cosine Spearman x100), and the table gives, per recipe, the mean,
the spread (max - min over the seeds) and each seed's value.

sentence-transformers rows (``st:<loss>:<data>``) fine-tune the same all-MiniLM-L6-v2 with
``SentenceTransformerTrainer`` for the same number of steps, batch size, peak learning rate and
warmup (data ``stsb``: STS-B train; ``stsb+sick``: STS-B and SICK train as two datasets, every
batch from one of them, sampled in proportion to their sizes: the trainer's
``PROPORTIONAL`` multi-dataset sampler), and report their final weights (no selection).

    python benchmarks/recipes.py                                  # every recipe, seeds 0 1 2
    python benchmarks/recipes.py --recipes default mix_pearson --seeds 0
    python benchmarks/recipes.py --recipes st:cosent:stsb+sick --root /tmp/recipes
    python benchmarks/recipes.py --table-only                     # the table from what has run

A recipe is a config file plus ``--config.KEY=VALUE`` overrides (``RECIPES`` below).
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
DATA = Path(os.environ.get("EMBEDJAX_DATA", ROOT.parent / "shared" / "data"))
STSB_DEV = DATA / "stsb" / "sts-dev.csv"
SICK_TRIAL = DATA / "sick" / "SICK_trial.txt"
METRICS = ("stsb_dev", "sick_trial")

# name -> (config, overrides, what it is). "default" is the default before issue 11.
RECIPES: dict[str, tuple[str, list[str], str]] = {
    "default": ("configs/stsb_angle.py", [], "AnglE on STS-B, lr 1e-5, 1 epoch, best by STS-B dev (the old default)"),
    "anchored": ("configs/stsb_anchored.py", [],
                 "AnglE on STS-B, lr 2e-5, anchored to the frozen starting model (cosine distillation, weight 10), "
                 "best by STS-B dev (the new default)"),
    "augsbert": ("configs/stsb_augsbert.py", [],
                 "Augmented SBERT: anchored, on STS-B gold + silver pairs labelled by configs/stsb_cross_encoder.py "
                 "(scripts/augment.py --top_k 1 --random_pairs 0 --include_gold), best by STS-B dev"),
    "stsb_pearson": ("configs/stsb_sick.py:sick_weight=0,pearson=1.0", ["eval_every=20"],
                     "STS-B alone, AnglE + Pearson loss (weight 1), best by the mean of STS-B dev and SICK trial"),
    "stsb_lr2e-5_ema": ("configs/stsb_sick.py:sick_weight=0,lr=2e-5,ema=0.99", ["eval_every=20"],
                        "STS-B alone, AnglE at lr 2e-5 with an EMA (0.99) of the params, raw or EMA selected "
                        "by the mean of both dev sets"),
    "stsb_sick": ("configs/stsb_sick.py", [], "multi-task STS-B + SICK (AnglE each), sampled by size, 1 epoch of "
                  "both (319 steps), best by the mean of STS-B dev and SICK trial"),
    "stsb_sick_pearson_ema": ("configs/stsb_sick.py:pearson=1.0,ema=0.99", [],
                              "as stsb_sick + Pearson loss (weight 1) + EMA 0.99 (raw or EMA, whichever scores higher)"),
}


def st_recipes() -> dict[str, tuple[str, str]]:
    """sentence-transformers rows: name -> (loss, data)."""
    return {f"st:{loss}:{data}": (loss, data) for loss in ("cosent", "angle") for data in ("stsb", "stsb+sick")}


# --------------------------------------------------------------------------- scoring
def score_model(path: str) -> dict[str, float]:
    """STS-B dev and SICK trial cosine Spearman x100 of an exported model."""
    from embedjax import load_pretrained
    from embedjax.eval import suite

    evaluators = suite.from_config({
        "stsb_dev": {"type": "sts", "path": str(STSB_DEV), "format": "stsb"},
        "sick_trial": {"type": "sts", "path": str(SICK_TRIAL), "format": "sick"},
    })
    metrics = suite.run_all(evaluators, load_pretrained(path))
    return {name: metrics[f"{name}/cosine_spearman"] for name in METRICS}  # already x100


def score_st(model) -> dict[str, float]:
    """The same two scores for a SentenceTransformer (NumPy Spearman of cosines: the same formula)."""
    import numpy as np
    from scipy import stats

    from embedjax.data import read_sick, read_stsb

    out = {}
    for name, rows in (("stsb_dev", read_stsb(STSB_DEV)), ("sick_trial", read_sick(SICK_TRIAL))):
        kw = dict(batch_size=128, convert_to_numpy=True, show_progress_bar=False, normalize_embeddings=True)
        za, zb = model.encode([r.text_a for r in rows], **kw), model.encode([r.text_b for r in rows], **kw)
        out[name] = float(100 * stats.spearmanr(np.sum(za * zb, axis=1), [r.score for r in rows]).statistic)
    return out


# --------------------------------------------------------------------------- runs
def run_embedjax(recipe: str, seed: int, root: Path) -> dict:
    config, overrides, _ = RECIPES[recipe]
    workdir = root / recipe / f"seed{seed}"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"--config={ROOT / config}", f"--workdir={workdir}",
           f"--config.seed={seed}", *(f"--config.{o}" for o in overrides)]
    t0 = time.perf_counter()
    if not (workdir / "summary.json").is_file():
        print("$", " ".join(cmd), flush=True)
        log = workdir.parent / f"seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{recipe} seed {seed} failed (exit {proc.returncode}); see {log}")
    wall = time.perf_counter() - t0
    summary = json.loads((workdir / "summary.json").read_text())
    return {"recipe": recipe, "seed": seed, **score_model(str(workdir)), "best_step": summary.get("best_step"),
            "wall_s": round(wall, 1)}


def run_st(recipe: str, seed: int, root: Path, lr: float, epochs: float, batch_size: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import MultiDatasetBatchSamplers, SentenceTransformerTrainingArguments

    from embedjax import hf
    from embedjax.data import read_sick, read_stsb
    from embedjax.data.pipeline import steps_per_epoch

    loss_name, data = st_recipes()[recipe]
    sets = {"stsb": [(p.text_a, p.text_b, p.score / 5.0) for p in read_stsb(DATA / "stsb" / "sts-train.csv")]}
    if data == "stsb+sick":
        sets["sick"] = [(p.text_a, p.text_b, (p.score - 1.0) / 4.0) for p in read_sick(DATA / "sick" / "SICK_train.txt")]
    model = SentenceTransformer(hf.minilm_l6(), device="cpu")
    as_ds = lambda rows: Dataset.from_dict({"sentence1": [r[0] for r in rows], "sentence2": [r[1] for r in rows],
                                            "score": [r[2] for r in rows]})
    train = {k: as_ds(v) for k, v in sets.items()} if len(sets) > 1 else as_ds(sets["stsb"])
    loss = {"cosent": losses.CoSENTLoss, "angle": losses.AnglELoss}[loss_name](model)
    steps = int(round(epochs * sum(steps_per_epoch(len(v), batch_size) for v in sets.values())))
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(root / recipe / f"seed{seed}"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr, warmup_steps=int(round(0.1 * steps)), lr_scheduler_type="linear", seed=seed,
        data_seed=seed, dataloader_drop_last=True, eval_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL)
    t0 = time.perf_counter()
    SentenceTransformerTrainer(model=model, args=targs, train_dataset=train, loss=loss).train()
    model.eval()
    return {"recipe": recipe, "seed": seed, **score_st(model), "best_step": steps,
            "wall_s": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- table
def aggregate(rows: list[dict]) -> dict[str, dict]:
    """recipe -> {metric: (mean, spread, values by seed)}, seeds sorted."""
    out: dict[str, dict] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r["seed"])
        out[recipe] = {"seeds": [r["seed"] for r in mine]}
        for m in METRICS:
            values = [r[m] for r in mine]
            out[recipe][m] = (statistics.fmean(values), max(values) - min(values), values)
    return out


def table(rows: list[dict], baseline: str = "default") -> str:
    agg = aggregate(rows)
    lines = ["| recipe | seeds | STS-B dev mean +- spread | SICK trial mean +- spread | STS-B dev by seed | "
             "SICK trial by seed | vs default (STS-B, SICK) |", "|---|---|---:|---:|---|---|---|"]
    for recipe, a in agg.items():
        cells = []
        for m in METRICS:
            mean, spread, _ = a[m]
            cells.append(f"{mean:.2f} +- {spread:.2f}")
        by_seed = [", ".join(f"{v:.2f}" for v in a[m][2]) for m in METRICS]
        if baseline in agg and recipe != baseline:
            deltas = []
            for m in METRICS:
                d = a[m][0] - agg[baseline][m][0]
                margin = max(a[m][1], agg[baseline][m][1])
                deltas.append(f"{d:+.2f}" + (" (> spread)" if d > margin else ""))
            vs = ", ".join(deltas)
        else:
            vs = "-"
        lines.append(f"| {recipe} | {len(a['seeds'])} | {cells[0]} | {cells[1]} | {by_seed[0]} | {by_seed[1]} | {vs} |")
    return "\n".join(lines)


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    latest = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        latest[(row["recipe"], row["seed"])] = row  # a rerun replaces the older row
    return list(latest.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=None, help="default: every embedjax recipe and ST row")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--root", default="/tmp/recipes", help="workdirs and results.jsonl go here")
    ap.add_argument("--st-lr", type=float, default=1e-5)
    ap.add_argument("--st-epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = root / "results.jsonl"
    names = args.recipes or [*RECIPES, *st_recipes()]
    unknown = [n for n in names if n not in RECIPES and n not in st_recipes()]
    if unknown:
        ap.error(f"unknown recipes {unknown}; known: {[*RECIPES, *st_recipes()]}")
    done = {(r["recipe"], r["seed"]) for r in load_rows(results)}
    if not args.table_only:
        for name in names:
            for seed in args.seeds:
                if (name, seed) in done:
                    continue
                if name in RECIPES:
                    row = run_embedjax(name, seed, root)
                else:
                    row = run_st(name, seed, root, args.st_lr, args.st_epochs, args.batch_size)
                print(json.dumps(row), flush=True)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    rows = [r for r in load_rows(results) if r["recipe"] in names or args.recipes is None]
    print(table(rows))


if __name__ == "__main__":
    main()
