"""Retrieval fine-tuning side by side: sentence-transformers' MNRL, CachedMNRL, GISTEmbed and SPLADE
(SparseEncoder), and PyLate's ColBERT, vs embedjax's recipes.

The same model (all-MiniLM-L6-v2, 128 tokens), the same records in the same order, batch, steps
and learning-rate schedule: every trainer gets the batches ``configs/beir_ir.py`` trains on with
that seed, SciFact and NFCorpus train (BEIR) with SciFact's mined hard negatives, one source per
batch. The order is embedjax's own (``pipeline.training_order`` per source and
``mixture.schedule`` per step); sentence-transformers is fed it through a batch sampler that
replays it. Schedule: peak lr 2e-5 (the config's), 10% linear warmup, linear decay to 0, AdamW
weight decay 0.01, gradient clipping at 1.0 (both sides). sentence-transformers losses: scale 20
(GISTEmbed: temperature 0.05, the initial model as guide); CachedMNRL: mini-batches of 8.
embedjax rows run the recipe's config (its loss options) with evaluation only at the end (the
exported model is the last step's, like sentence-transformers' final weights).

Every exported model, and the start, is scored with the same embedjax evaluators, 128 tokens:
SciFact dev and NFCorpus dev nDCG@10 (full corpora), STS-B dev and SICK trial cosine Spearman.
SPLADE rows (``beir_splade``, ``st:splade``: the same batches, InfoNCE at scale 1 on sparse dot
products, the recipe's FLOPS weights warmed up quadratically over a third of the steps, and one
starting model: MiniLM with the recipe's fresh MLM head, ``splade.head_init``, saved by embedjax in
SparseEncoder's layout) are scored by ``embedjax.eval.sparse_retrieval`` (exact inverted-index
search) on the same two corpora, with SciFact's mean active terms per query and document; no STS
columns. embedjax's SPLADE row is its run's own end-of-run evaluation (the same evaluator on the
last step's params, which are the export's).
ColBERT rows (``beir_colbert``, ``pylate:contrastive``: the same batches, PyLate's markers and a fresh
128-wide projection on MiniLM, queries of 32 tokens and documents of 128, Contrastive at temperature 1,
lr 3e-5) are scored by ``embedjax.eval.late_retrieval`` (exact MaxSim search) for both, with SciFact's
mean token vectors per document in the document_terms column. PyLate runs in its own virtualenv
(``make oracles``: it pins older sentence-transformers and transformers).
Each (method, seed) runs in its own subprocess, one after the other; its row is appended to
``ROOT/results.jsonl`` and a rerun skips what is there (so a long benchmark can be resumed).

    python benchmarks/retrieval_finetune.py                       # every method, seeds 0 1 2
    python benchmarks/retrieval_finetune.py --methods st:mnrl beir_ir --seeds 0
    python benchmarks/retrieval_finetune.py --table-only          # the table from what has run
    python benchmarks/retrieval_finetune.py --rescore --methods beir_m3 --seeds 0   # score a finished run again
    RETRIEVAL_FINETUNE_SMOKE=4 python benchmarks/retrieval_finetune.py --root /tmp/rf --seeds 0   # a check

Needs the mined negatives configs/beir_ir.py names (its docstring has the command).
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
MAX_LENGTH = 128
SMOKE_STEPS = int(os.environ.get("RETRIEVAL_FINETUNE_SMOKE", "0"))  # > 0: that many steps, STS scores only (a check of the script)
SCORES = {  # column -> evaluator key
    "scifact": "scifact_dev/ndcg@10", "nfcorpus": "nfcorpus_dev/ndcg@10",
    "stsb": "stsb_dev/cosine_spearman", "sick": "sick_trial/cosine_spearman",
}
# name -> (config with variant, what it is)
EMBEDJAX = {
    "beir_ir": ("configs/beir_ir.py", "InfoNCE, scale 20, mined negatives, judged-relevant documents masked (qrels)"),
    "beir_ir:fn=0.1": ("configs/beir_ir.py:fn=0.1", "+ in-batch candidates above s_pos + 0.1 masked (Qwen3-Embedding)"),
    "beir_ir:guide=1": ("configs/beir_ir.py:guide=1", "+ false negatives decided by the initial model (GISTEmbed)"),
    "beir_ir:anchor=10": ("configs/beir_ir.py:anchor=10", "beir_ir + every text anchored to the initial model (cosine, weight 10)"),
    "beir_splade": ("configs/beir_splade.py", "SPLADE: InfoNCE on sparse dots + FLOPS 5e-5 / 3e-5, quadratic warm-up"),
    "beir_colbert": ("configs/beir_colbert.py", "ColBERT: InfoNCE on MaxSim (temperature 1), fresh 128-wide projection"),
    "beir_m3": ("configs/beir_m3.py", "three heads (BGE-M3): m3_loss with self-distillation; columns: the weighted-sum fusion"),
    # not the same batches: the retrieval batches of beir_ir and STS-B train's between them
    "ir_sts": ("configs/ir_sts.py", "retrieval + anchored STS-B AnglE (CoDiEmb); 280 steps, more data"),
    # the STS-only recipe, for what ir_sts must match on STS: STS-B train only, 180 steps, its last step
    "stsb_anchored": ("configs/stsb_anchored.py", "STS-B train only: AnglE + anchor to the initial model (make main)"),
}
ST = {
    "st:mnrl": "MultipleNegativesRankingLoss (scale 20)",
    "st:cmnrl": "CachedMultipleNegativesRankingLoss (scale 20, mini-batch 8)",
    "st:gist": "GISTEmbedLoss (initial model as guide, temperature 0.05)",
    "st:splade": "SparseEncoder: SpladeLoss(SparseMultipleNegativesRankingLoss), FLOPS 5e-5 / 3e-5, quadratic warm-up",
    "pylate:contrastive": "PyLate ColBERT: Contrastive (temperature 1), fresh 128-wide projection",
}
SPARSE = ("beir_splade", "st:splade")  # scored as SPLADE models
LATE = ("beir_colbert", "pylate:contrastive")  # scored as ColBERT models
MULTI_HEAD = ("beir_m3",)  # scored head by head and fused
# PyLate pins older sentence-transformers / transformers: its runs use its own virtualenv (make oracles)
PYLATE_PYTHON = Path(os.environ.get("EMBEDJAX_PYLATE_PYTHON", ROOT / ".venv-pylate" / "bin" / "python"))


# --------------------------------------------------------------------------- shared
def parse_method(method: str) -> tuple[str, str, dict]:
    """``method`` -> (family "start" / "st" / "embedjax", base name, options).

    Besides the named methods, ``st:<loss>,lr=X`` trains a sentence-transformers loss at another
    peak learning rate, ``st:<loss>,mode=round_robin`` on the batches of
    ``configs/beir_ir.py:mode=round_robin`` (its sources in a fixed turn, not sampled per step), and
    ``<recipe>:<variant>`` runs any variant of ``configs/<recipe>.py`` (the config's own
    ``:name=value,...`` syntax), so a recipe search needs no edit here.
    """
    if method == "start":
        return "start", method, {}
    name, _, options = method.partition(",")
    if name in ST:
        opts = dict(o.split("=", 1) for o in options.split(",") if o)
        if set(opts) - {"lr", "mode"}:
            raise ValueError(f"{method}: sentence-transformers methods take only lr=X and mode=M, "
                             f"not {sorted(set(opts) - {'lr', 'mode'})}")
        return "st", name, {k: float(v) if k == "lr" else v for k, v in opts.items()}
    recipe, _, variant = method.partition(":")
    if method in EMBEDJAX or recipe in EMBEDJAX:
        config = EMBEDJAX[method][0] if method in EMBEDJAX else f"configs/{recipe}.py:{variant}"
        return "embedjax", recipe, {"config": config}
    raise ValueError(f"unknown method {method!r}; known: start, {[*ST, *EMBEDJAX]}, "
                     "st:<loss>,lr=X and <recipe>:<variant>")


def recipe_config(spec: str, seed: int):
    """The embedjax config of ``configs/<file>.py[:variant]`` with this seed, at 128 tokens."""
    import importlib.util

    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_cfg", ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    c = module.get_config(variant or None)
    c.seed = seed
    if c.model_kind == "colbert":
        c.colbert.document_length = MAX_LENGTH
    else:
        c.max_length = MAX_LENGTH
    return c


def score(path: str) -> dict[str, float]:
    """Every column of the table for an exported model (the same evaluators for every trainer)."""
    from embedjax import load_pretrained
    from embedjax.eval import suite

    evals = {
        "scifact_dev": {"type": "retrieval", "path": str(DATA / "beir" / "scifact"), "split": "dev"},
        "nfcorpus_dev": {"type": "retrieval", "path": str(DATA / "beir" / "nfcorpus"), "split": "dev"},
        "stsb_dev": {"type": "sts", "path": str(DATA / "stsb" / "sts-dev.csv"), "format": "stsb"},
        "sick_trial": {"type": "sts", "path": str(DATA / "sick" / "SICK_trial.txt"), "format": "sick"},
    }
    if SMOKE_STEPS:
        evals = {k: v for k, v in evals.items() if v["type"] == "sts"}
    metrics = suite.run_all(suite.from_config(evals), load_pretrained(path, max_length=MAX_LENGTH))
    metrics = {k: metrics.get(k, float("nan")) for k in SCORES.values()}
    out = {name: float(metrics[key]) for name, key in SCORES.items()}
    for name in ("scifact", "nfcorpus"):
        out[name] *= 100  # nDCG in points, like Spearman x100
    out["ir_mean"] = (out["scifact"] + out["nfcorpus"]) / 2
    return out


def sparse_columns(metrics: dict[str, float]) -> dict[str, float]:
    """A SPLADE model's columns from its ``SparseRetrievalEvaluator`` metrics (named as
    configs/beir_splade.py's evaluators): nDCG@10 on both corpora, SciFact's mean active terms per
    query and document; no STS (a sparse model is not scored by cosine here)."""
    nan = float("nan")
    out = {"stsb": nan, "sick": nan, "scifact": 100 * metrics.get("scifact_dev/ndcg@10", nan),
           "nfcorpus": 100 * metrics.get("nfcorpus_dev/ndcg@10", nan),
           "query_terms": metrics.get("scifact_dev/query_active_terms", nan),
           "document_terms": metrics.get("scifact_dev/document_active_terms", nan)}
    out["ir_mean"] = (out["scifact"] + out["nfcorpus"]) / 2
    return out


def score_sparse(path: str) -> dict[str, float]:
    """A SPLADE export's columns (``sparse_columns``), by exact inverted-index search."""
    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval.sparse_retrieval import SparseRetrievalEvaluator
    from embedjax.sparse_model import load_sparse_encoder

    model = load_sparse_encoder(path, max_length=MAX_LENGTH)
    top_k = 64 if SMOKE_STEPS else None  # a check of the script: a barely trained head's vectors are less sparse
    metrics = {}
    for name in ("scifact", "nfcorpus"):
        metrics.update(SparseRetrievalEvaluator(read_beir(DATA / "beir" / name, "dev"), name=f"{name}_dev",
                                                top_k=top_k)(model))
    return sparse_columns(metrics)


def score_late(path: str) -> dict[str, float]:
    """A ColBERT export's columns: nDCG@10 on both corpora by exact MaxSim search (embedjax's
    ``LateRetrievalEvaluator`` for both trainers), SciFact's mean token vectors per document."""
    from embedjax.colbert_model import load_colbert
    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval.late_retrieval import LateRetrievalEvaluator

    model = load_colbert(path)
    out = {"stsb": float("nan"), "sick": float("nan")}
    for name in ("scifact", "nfcorpus"):
        metrics = LateRetrievalEvaluator(read_beir(DATA / "beir" / name, "dev"), name=name)(model)
        out[name] = 100 * metrics[f"{name}/ndcg@10"]
        if name == "scifact":
            out["document_terms"] = metrics[f"{name}/document_tokens"]
    out["ir_mean"] = (out["scifact"] + out["nfcorpus"]) / 2
    return out


def score_m3(path: str) -> dict[str, float]:
    """A three-head export's columns: the weighted-sum fusion's nDCG@10 on both corpora (BGE-M3's
    weights 1, 0.3, 1), and each head's and the RRF fusion's mean over the corpora beside."""
    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval.fusion import M3RetrievalEvaluator
    from embedjax.m3_model import load_m3

    model = load_m3(path, max_length=MAX_LENGTH)
    out = {"stsb": float("nan"), "sick": float("nan")}
    heads = ("dense", "lexical", "multi_vector", "sum", "rrf")
    for name in ("scifact", "nfcorpus"):
        metrics = M3RetrievalEvaluator(read_beir(DATA / "beir" / name, "dev"), name=name)(model)
        out[name] = 100 * metrics[f"{name}/sum/ndcg@10"]
        for head in heads:
            out[f"{head}_mean"] = out.get(f"{head}_mean", 0.0) + 50 * metrics[f"{name}/{head}/ndcg@10"]
    out["ir_mean"] = (out["scifact"] + out["nfcorpus"]) / 2
    return out


def scorer(method: str):
    return (score_sparse if method in SPARSE else score_late if method in LATE else score_m3 if method in MULTI_HEAD
            else score)


def same_batches(seed: int, batch_size: int, mode: str = "sampled") -> tuple[list[str], dict[str, list[dict]]]:
    """What configs/beir_ir.py trains on with ``seed``, ``batch_size`` and mixture ``mode``: the source
    of every step and each source's records in the order it is read (embedjax's own pipeline order)."""
    from embedjax.data import pipeline
    from embedjax.data.mixture import schedule
    from embedjax.train import sources
    from embedjax.train.config import TrainConfig

    c = recipe_config(f"{EMBEDJAX['beir_ir'][0]}:mode={mode}", seed)
    c.batch_size = batch_size
    run = TrainConfig.from_config(c)
    names = sorted(run.sources)
    weights = [run.sources[n].weight for n in names]
    orders, sizes = {}, {}
    for i, (name, spec) in enumerate(run.sources.items()):  # the i-th source shuffles with seed + i
        records = sources.train_source(spec.data)
        sizes[name] = len(records)
        orders[name] = pipeline.training_order(records, global_batch_size=run.batch_size, seed=run.seed + i)
    steps = SMOKE_STEPS or int(round(run.num_epochs * sum(pipeline.steps_per_epoch(n, run.batch_size)
                                                           for n in sizes.values())))
    taken = {n: 0 for n in names}
    plan, rows = [], {n: [] for n in names}
    for step in range(steps):
        name = schedule(names, weights, run.mixture_mode, run.seed, step)
        rows[name] += [record for _, record in orders[name][taken[name]]]
        taken[name] += 1
        plan.append(name)
    return plan, rows


# --------------------------------------------------------------------------- one run (in a subprocess)
def replayed_datasets(seed: int, batch_size: int, mode: str = "sampled"):
    """``(datasets, replay)``: each source's records as a ``datasets.Dataset`` (anchor, positive,
    negative_j) and a batch sampler that replays configs/beir_ir.py's batches in order (indices into
    the trainer's concatenation of the sources)."""
    import numpy as np
    from datasets import Dataset

    plan, rows = same_batches(seed, batch_size, mode)
    names = list(rows)
    datasets = {}
    for name in names:
        columns = {"anchor": [r["text_a"] for r in rows[name]], "positive": [r["text_b"] for r in rows[name]]}
        if rows[name] and "text_n" in rows[name][0]:
            k = len(rows[name][0]["text_n"])
            for j in range(k):
                columns[f"negative_{j}"] = [r["text_n"][j] for r in rows[name]]
        datasets[name] = Dataset.from_dict(columns)
    offsets = dict(zip(names, np.cumsum([0] + [len(datasets[n]) for n in names])[:-1].tolist()))

    class Replay:
        """The planned batches, in order: indices into the trainer's ConcatDataset of the sources."""

        def __init__(self):
            used = {n: 0 for n in names}
            self.batches, self.served = [], 0
            for name in plan:
                start = offsets[name] + used[name]
                self.batches.append(list(range(start, start + batch_size)))
                used[name] += batch_size

        def __iter__(self):
            for batch in self.batches:
                self.served += 1
                yield batch

        def __len__(self):
            return len(self.batches)

    return datasets, Replay()


def train_replayed(trainer_class, model, loss, seed: int, workdir: Path, batch_size: int, lr: float | None,
                   args_class=None, mode: str = "sampled", **trainer_kwargs) -> dict:
    """Trains ``model`` with a sentence-transformers-style trainer on the replayed batches (the
    schedule of the module docstring), saves it to ``workdir/export`` and returns its timings.
    ``args_class``: the trainer's own arguments class (default SentenceTransformerTrainingArguments)."""
    import numpy as np
    from datasets import DatasetDict
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    datasets, replay = replayed_datasets(seed, batch_size, mode)
    stamps: list[float] = []

    class Trainer(trainer_class):
        def get_multi_dataset_batch_sampler(self, *args, **kwargs):
            return replay

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    steps = len(replay)
    targs = (args_class or SentenceTransformerTrainingArguments)(
        output_dir=str(workdir / "trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=lr or recipe_config(EMBEDJAX["beir_ir"][0], seed).optim.learning_rate,
        warmup_steps=int(round(0.1 * steps)), lr_scheduler_type="linear", weight_decay=0.01, max_grad_norm=1.0,
        seed=seed, dataloader_drop_last=True, eval_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True)
    t0 = time.perf_counter()
    Trainer(model=model, args=targs, train_dataset=DatasetDict(datasets), loss=loss, callbacks=[Timer()],
            **trainer_kwargs).train()
    train_s = time.perf_counter() - t0
    if replay.served != steps or len(stamps) != steps:
        raise RuntimeError(f"the trainer took {replay.served} planned batches and ran {len(stamps)} steps, not {steps}")
    model.save(str(workdir / "export"))
    times = list(np.diff(stamps))[min(5, steps // 2):] or list(np.diff(stamps)) or [train_s]  # the first steps warm up
    return {"steps": steps, "train_s": round(train_s, 1), "step_s": round(statistics.median(times), 3)}


def run_st(method: str, seed: int, workdir: Path, batch_size: int, lr: float | None = None,
           mode: str = "sampled") -> dict:
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer import losses

    from embedjax import hf

    if method == "st:splade":
        from sentence_transformers import SparseEncoder, SparseEncoderTrainer, SparseEncoderTrainingArguments
        from sentence_transformers.sparse_encoder import losses as sparse_losses

        from embedjax.sparse_model import load_sparse_encoder, save_sparse_encoder

        trainer_class, args_class = SparseEncoderTrainer, SparseEncoderTrainingArguments
        # MiniLM is a BertModel: both trainers start from the same MLM head, embedjax's (the recipe's
        # splade.head_init), written in SparseEncoder's layout
        splade = recipe_config(EMBEDJAX["beir_splade"][0], seed).splade  # the same head and FLOPS weights
        initial = save_sparse_encoder(load_sparse_encoder(hf.minilm_l6(), max_length=MAX_LENGTH, seed=seed,
                                                          head_init=splade.head_init), workdir / "initial")
        model = SparseEncoder(str(initial), device="cpu")
        loss = sparse_losses.SpladeLoss(model, sparse_losses.SparseMultipleNegativesRankingLoss(model),
                                        query_regularizer_weight=splade.query_weight,
                                        document_regularizer_weight=splade.document_weight)
    else:
        trainer_class, args_class = SentenceTransformerTrainer, None
        model = SentenceTransformer(hf.minilm_l6(), device="cpu")
        model.max_seq_length = MAX_LENGTH
        loss = {"st:mnrl": lambda: losses.MultipleNegativesRankingLoss(model, scale=20.0),
                "st:cmnrl": lambda: losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=8),
                "st:gist": lambda: losses.GISTEmbedLoss(model, SentenceTransformer(hf.minilm_l6(), device="cpu"),
                                                        temperature=0.05)}[method]()
    row = train_replayed(trainer_class, model, loss, seed, workdir, batch_size, lr, args_class=args_class, mode=mode)
    return {**row, **scorer(method)(str(workdir / "export"))}


def run_pylate(seed: int, workdir: Path, batch_size: int, lr: float | None = None) -> dict:
    """PyLate's ColBERT on MiniLM (its [Q] / [D] markers, a fresh 128-wide projection, queries of 32
    tokens, documents of 128: configs/beir_colbert.py's), Contrastive at temperature 1."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    from pylate import losses, models, utils
    from sentence_transformers import SentenceTransformerTrainer

    from embedjax import hf

    model = models.ColBERT(str(hf.minilm_l6()), device="cpu", embedding_size=128, query_length=32,
                           document_length=MAX_LENGTH)
    lr = lr or recipe_config(EMBEDJAX["beir_colbert"][0], seed).optim.learning_rate
    row = train_replayed(SentenceTransformerTrainer, model, losses.Contrastive(model), seed, workdir, batch_size, lr,
                         data_collator=utils.ColBERTCollator(model.tokenize))
    return {**row, **score_late(str(workdir / "export"))}


def run_embedjax(config: str, seed: int, workdir: Path, batch_size: int) -> dict:
    from embedjax.train.loop import train_and_evaluate

    c = recipe_config(config, seed)
    c.batch_size = batch_size
    c.log_every = 1  # every step's time in metrics.jsonl
    c.eval_start, c.eval_export = False, False
    c.eval_every = 10**9  # only after the last step: the export is the last step, as sentence-transformers'
    c.num_steps = SMOKE_STEPS or None
    c.checkpoint.every = 10**9
    sparse = c.model_kind == "splade"
    if c.model_kind not in ("splade", "colbert", "m3"):  # those keep their own evaluators; scorer() scores the export
        c.evals = {"stsb_dev": {"type": "sts", "path": str(DATA / "stsb" / "sts-dev.csv"), "format": "stsb"}}
        c.select_metric = "stsb_dev/cosine_spearman"
    if sparse and SMOKE_STEPS:
        c.evals = {name: {**spec, "top_k": 64} for name, spec in c.evals.items()}
    if c.model_kind in ("colbert", "m3"):  # one evaluation at the end picks the last step; scorer() scores the export
        c.evals = {"scifact_dev": c.evals["scifact_dev"]}
        c.select_metric = "scifact_dev/" + ("sum/ndcg@10" if c.model_kind == "m3" else "ndcg@10")
    t0 = time.perf_counter()
    summary = train_and_evaluate(c, workdir / "export")
    train_s = time.perf_counter() - t0
    logged = [json.loads(line) for line in (workdir / "export" / "metrics.jsonl").read_text().splitlines()]
    times = [c.batch_size / r["examples_per_s"] for r in logged if "examples_per_s" in r]
    if sparse:  # the run's own end-of-run evaluation is score_sparse's, on the same (last-step) params
        scores = sparse_columns(summary["after"])
    else:
        scores = scorer({"colbert": "beir_colbert", "m3": "beir_m3"}.get(c.model_kind, ""))(str(workdir / "export"))
    return {"steps": summary["steps"], "train_s": round(train_s, 1), "step_s": round(statistics.median(times), 3),
            **scores}


def workdir_of(root: Path, method: str, seed: int) -> Path:
    return root / method.replace(":", "_").replace(",", "_").replace("=", "") / f"seed{seed}"


def rescore_one(method: str, seed: int, root: Path, batch_size: int) -> dict:
    """The row of an embedjax run whose training finished but whose scoring did not: its export
    scored again, its steps and times read from its metrics.jsonl (``--rescore``)."""
    export = workdir_of(root, method, seed) / "export"
    if not (export / "summary.json").is_file():
        raise SystemExit(f"{export}: no finished run to score (no summary.json)")
    summary = json.loads((export / "summary.json").read_text())
    logged = [json.loads(line) for line in (export / "metrics.jsonl").read_text().splitlines()]
    times = [batch_size / r["examples_per_s"] for r in logged if "examples_per_s" in r]
    return {"method": method, "seed": seed, "steps": summary["steps"], "train_s": None,
            "step_s": round(statistics.median(times), 3), **scorer(method)(str(export))}


def run_one(method: str, seed: int, root: Path, batch_size: int) -> dict:
    workdir = workdir_of(root, method, seed)
    if workdir.exists():
        import shutil

        shutil.rmtree(workdir)  # an unfinished run starts over
    workdir.mkdir(parents=True)
    family, name, options = parse_method(method)
    if family == "start":
        from embedjax import hf

        row = {"steps": 0, "train_s": 0.0, "step_s": None, **score(str(hf.minilm_l6()))}
    elif family == "st" and name == "pylate:contrastive":
        row = run_pylate(seed, workdir, batch_size, lr=options.get("lr"))
    elif family == "st":
        row = run_st(name, seed, workdir, batch_size, lr=options.get("lr"), mode=options.get("mode", "sampled"))
    else:
        row = run_embedjax(options["config"], seed, workdir, batch_size)
    return {"method": method, "seed": seed, **row}


# --------------------------------------------------------------------------- table
def load_rows(path: Path) -> list[dict]:
    latest = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            latest[(row["method"], row["seed"])] = row  # a rerun replaces the older row
    return list(latest.values())


def table(rows: list[dict]) -> str:
    columns = ("ir_mean", "scifact", "nfcorpus", "stsb", "sick", "query_terms", "document_terms")
    lines = ["| method | seeds | " + " | ".join(f"{c} mean +- spread" for c in columns) + " | step s | train s |",
             "|---|---|" + "---:|" * (len(columns) + 2)]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        cells = []
        for c in columns:
            values = [r[c] for r in mine if c in r and r[c] == r[c]]  # a dense row has no terms, a sparse one no STS
            cells.append(f"{statistics.fmean(values):.2f} +- {max(values) - min(values):.2f}" if values else "-")
        step = [r["step_s"] for r in mine if r["step_s"] is not None]
        step_cell = f"{statistics.median(step):.2f}" if step else "-"
        train = [r["train_s"] for r in mine if r["train_s"] is not None]  # None: a --rescore row
        train_cell = f"{statistics.fmean(train):.0f}" if train else "-"
        lines.append(f"| {method} | {','.join(str(r['seed']) for r in mine)} | " + " | ".join(cells)
                     + f" | {step_cell} | {train_cell} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=None,
                    help=f"default: start and every method: {[*ST, *EMBEDJAX]}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--root", default="workdirs/retrieval_finetune", help="workdirs and results.jsonl")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--rescore", action="store_true",
                    help="score the finished embedjax runs of --methods / --seeds again (no training), add their rows")
    ap.add_argument("--_run", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = root / "results.jsonl"
    if args._run:
        row = run_one(args._run[0], int(args._run[1]), root, args.batch_size)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return
    # the most telling first: a stopped benchmark still compares the two best-known recipes
    methods = args.methods or ["start", "st:mnrl", "beir_ir", "st:gist", "beir_ir:guide=1", "beir_ir:fn=0.1",
                               "ir_sts", "stsb_anchored", "beir_ir:anchor=10", "st:cmnrl"]
    for m in methods:
        try:
            parse_method(m)
        except ValueError as e:
            ap.error(str(e))
    if args.rescore:
        for method in methods:
            for seed in args.seeds:
                row = rescore_one(method, seed, root, args.batch_size)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    elif not args.table_only:
        done = {(r["method"], r["seed"]) for r in load_rows(results)}
        # seed-major: every method's seed 0 first, so a stopped benchmark has comparable rows
        todo = [(m, s) for s in args.seeds for m in methods if (m, s) not in done and not (m == "start" and s != args.seeds[0])]
        for method, seed in todo:
            python = str(PYLATE_PYTHON) if method.startswith("pylate:") else sys.executable
            cmd = [python, __file__, "--_run", method, str(seed), "--root", str(root), "--batch-size", str(args.batch_size)]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"machine: {machine()}")
    rows = [r for r in load_rows(results) if r["method"] in methods]
    print(table(rows))
    legend = {"start": "all-MiniLM-L6-v2, not trained", **ST, **{m: what for m, (_, what) in EMBEDJAX.items()}}
    for method in dict.fromkeys(r["method"] for r in rows):
        print(f"  {method}: {legend.get(method) or legend[parse_method(method)[1]] + ' (' + method + ')'}")


def machine() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{os.cpu_count()} cores, {line.split(':', 1)[1].strip()}"
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
