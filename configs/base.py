"""Defaults shared by every config; each experiment file overrides what it changes."""

from __future__ import annotations

import ast
import difflib
import os
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from embedjax import hf

# ../shared/data beside the repository by default; EMBEDJAX_DATA points elsewhere.
DATA = Path(os.environ.get("EMBEDJAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def typed_value(value: str):
    """``"1e-5"`` -> 1e-05, ``"8"`` -> 8, ``"true"`` -> True, ``"(0, 5)"`` -> (0, 5); anything else stays a str."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def parse_arg(arg: str | None, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Variants after the colon: ``"smoke,lr=1e-5,steps=8"`` -> ``{"smoke": True, "lr": 1e-05, "steps": 8}``.

    Values are typed (``ast.literal_eval``; ``true``/``false`` -> bool; a str when that fails);
    a bare name is True. With ``allowed``, an unknown variant name raises (a typo must not
    silently run the full config).
    """
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, eq, value = part.partition("=")
        out[key.strip()] = typed_value(value.strip()) if eq else True
    if allowed is not None:
        for key in out:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"unknown config variant {key!r}; {hint}this config takes {sorted(allowed)}")
    return out


def base_config() -> ml_collections.ConfigDict:
    """Every key the code reads, with its default (tests/test_configs.py checks both ways).

    Lists are tuples so ``--config.key="(a, b)"`` can override them.
    """
    c = ml_collections.ConfigDict()
    c.model = hf.minilm_l6()      # a checkpoint directory or hub id
    # "bi_encoder" embeds each text alone; "cross_encoder" reads (text_a, text_b) together and a head
    # scores the pair (a reranker; embedjax/train/cross_objective.py for its losses and batches);
    # "splade" embeds each text as vocabulary term weights (the splade section below); "colbert" keeps a
    # vector per token (the colbert section below)
    c.model_kind = "bi_encoder"
    c.num_labels = 1              # cross_encoder: logits per pair (> 1: classes, objective.loss="cross_entropy")
    c.pair_template = placeholder(str)  # cross_encoder on decoders: "Query: {first}\nDocument: {second}"; None = tokenizer pairs
    c.tri_head = "hadamard"       # tri_encoder (C-STS): how the condition conditions each sentence: hadamard | concat
    # model_kind="splade": a learned sparse model (the checkpoint's MLM head; embedjax/train/sparse_objective.py)
    c.splade = ml_collections.ConfigDict({
        "pooling": "max",         # over tokens of log(1 + ReLU(logits)): max (SPLADE v2) | sum
        "activation": "relu",     # relu | log1p_relu (a second log1p)
        "query_weight": 5e-5,     # FLOPS regulariser weight on the queries; 0 = off (inference-free query side)
        "document_weight": 3e-5,  # ... on the documents (positives and hard negatives)
        "warmup": 1 / 3,          # the weights grow from 0 over this fraction of the run's steps
        "schedule": "quadratic",  # quadratic (SPLADE) | linear
        "query_threshold": placeholder(int),  # FLOPS counts only rows with more active terms; None = every row
        "document_threshold": placeholder(int),
        "inference_free": False,  # True: queries are a learned weight per vocabulary id, no transformer (SPLADE-doc)
        "head_init": "identity",  # a checkpoint without an MLM head: identity | random (embedjax.sparse.init_mlm_head)
    })
    # model_kind="colbert": token vectors scored by MaxSim (embedjax/colbert_model.py, train/colbert_objective.py)
    c.colbert = ml_collections.ConfigDict({
        "dim": placeholder(int),              # projection width; None = the checkpoint's (128 on a plain backbone)
        "query_length": placeholder(int),     # tokens per query, [MASK]-expanded; None = the checkpoint's (32)
        "document_length": placeholder(int),  # tokens per document at most; None = the checkpoint's (180)
    })
    c.pooling = placeholder(str)  # the run's one pooling mode (train, eval, export); None = the checkpoint's
    c.max_length = placeholder(int)  # tokens per text; None = the checkpoint's max_seq_length
    c.dtype = "float32"           # compute dtype ("bfloat16" on TPU/GPU); params stay float32
    c.hidden_dropout = placeholder(float)  # encoder hidden dropout rate; None = the checkpoint's (config.json)
    c.attention_dropout = placeholder(float)  # encoder attention dropout rate; None = the checkpoint's
    c.pooler_init = {}            # latent_attention pooling: init_latent_attention kwargs (num_latents, num_heads, ...)
    c.attention = placeholder(str)  # decoder LLMs: "causal" (as pretrained) | "bidirectional" (LLM2Vec, NV-Embed); None = checkpoint's
    # Instructions (e.g. "Instruct: {task}\nQuery: "): prefixed to the first text of each training record
    # (query) and to its positive / hard negatives (document); saved with the model as its prompts.
    c.prompts = ml_collections.ConfigDict({"query": "", "document": ""})
    c.include_prompt = True       # False: instruction tokens are attended to but not pooled (only when prompts are set)
    c.lora = ml_collections.ConfigDict({  # LoRA adapters (embedjax/lora.py); rank 0 = full fine-tuning
        "rank": 0,                # adapter rank r; > 0 trains only the adapters (and a pooler's own params)
        "alpha": 32.0,            # scale = alpha / r (alpha / sqrt(r) with rslora)
        "dropout": 0.0,           # dropout on the adapters' input
        "targets": placeholder(str),  # regex over dense param paths; None = every attention and MLP projection
        "rslora": False,          # rank-stabilised scaling (arXiv:2312.03732)
        "save_peft": True,        # also write workdir/adapter, a PEFT adapter directory (the export merges them)
        "init_from": placeholder(str),  # a PEFT adapter directory to start from (its rank/alpha/targets; rank is then unused)
    })
    c.seed = 0                    # params' dropout keys and the data order
    c.batch_size = 32             # global, over all devices and hosts (per micro-batch with optim.accumulate)
    c.num_epochs = 1.0            # passes over the training data (ignored when num_steps is set)
    c.num_steps = placeholder(int)  # train steps (micro-batches), overrides num_epochs; None = num_epochs epochs
    c.mesh = ml_collections.ConfigDict({  # the device mesh (embedjax/sharding.py)
        "data": -1,               # data-parallel axis size; -1 = all devices not used by fsdp
        "fsdp": 1,                # parameter-sharding axis size (data parallel too)
        "model": 1,               # tensor-parallel axis size (splits each big matrix; same examples)
    })
    c.sharding_rules = "replicated"  # or "fsdp" (the backbone's rules: big matrices over fsdp and model)
    c.memory_limit_gib = placeholder(float)  # refuse a step needing more per device; None = the device's limit (unknown on CPU)

    c.optim = ml_collections.ConfigDict({  # AdamW + schedule (embedjax/train/optim.py)
        "learning_rate": 2e-5,    # peak learning rate (AdamW)
        "warmup": 0.1,            # linear warmup: a fraction of the updates if < 1, else a number of updates
        "decay": "linear",        # after warmup, to 0: "linear", "cosine", or "constant"
        "weight_decay": 0.01,     # AdamW decoupled weight decay (not on biases, norms, embeddings)
        "clip_norm": 1.0,         # global gradient-norm clipping; 0 = off
        # Micro-batches per optimizer update (optax.MultiSteps; 1 = off). The schedule counts updates;
        # contrastive losses still see only a micro-batch's in-batch negatives (GradCache is exact).
        "accumulate": 1,
        "b1": 0.9,                # Adam beta1
        "b2": 0.999,              # Adam beta2
        "eps": 1e-6,              # Adam epsilon
        # Exponential moving average of the params (0 = off; e.g. 0.99 ~ the last 100 steps), kept in
        # the train state, evaluated beside the raw params at every evaluation (metrics "ema/...").
        "ema": 0.0,
        "ema_select": "best",     # what competes for export: "best" (raw or EMA, whichever scores higher) | "ema" | "raw"
    })
    c.objective = ml_collections.ConfigDict({  # the loss and its wrappers (embedjax/train/objective.py)
        "loss": "angle",          # a name in embedjax/train/loss_specs.py: LOSSES (angle, cosent, infonce, ...; docs/losses.md)
        "loss_kwargs": {},        # keyword arguments of the loss (free-form: set the whole dict on the CLI)
        "matryoshka_dims": (),    # Matryoshka: also train these leading widths; () = off
        "matryoshka_weights": (),  # one weight per dim; () = all 1
        "matryoshka_n_per_step": 0,  # sample this many dims each step; 0 = all
        "layers": placeholder(str),  # 2D Matryoshka / ESE over layers: adaptive | 2dmse | espresso; None = last layer only
        "layer_kwargs": {},       # keyword arguments of the layer wrapper (free-form)
        "remat": False,           # rematerialise each layer in the backward pass (memory for compute); or a
                                  # jax.checkpoint_policies name, e.g. "dots_with_no_batch_dims_saveable"
        "unroll": True,           # unroll the layer scan (fast steps); False = one compiled layer (deep LLMs)
        "dropout": True,          # the encoder's dropout during training (SimCSE needs it)
        "gradcache_chunk": 0,     # > 0: GradCache (exact large-batch contrastive loss, bounded memory)
        # Scored-pair losses added to the main one on the same embeddings (inside Matryoshka / 2D):
        # {name: weight} or {name: {"weight": w, **kwargs}}, e.g. {"pearson": 1.0}; names in loss_specs.AUX_LOSSES.
        "aux_losses": {},
        "distill": ml_collections.ConfigDict({  # embedding distillation from a teacher encoder
            "teacher": placeholder(str),  # a checkpoint dir / hub id (None = off); it must share the student's tokenizer;
                                  # "initial": the run's own starting model, frozen (an anchor against forgetting)
            "loss": "cosine",     # mse (of unit vectors) | cosine | similarity_mse (in-batch cosine matrices: any width)
            "weight": 1.0,        # added as weight * mean over both sides (and over layers with objective.layers)
        }),
        # infonce: a frozen model whose similarities decide the in-batch false negatives (GISTEmbed,
        # arXiv:2402.16829; loss_kwargs fn_margin / fn_relative set the rule, default s > s_pos):
        # a checkpoint dir / hub id, "initial" (the run's starting model), or None = off. One frozen
        # model per run: with a distillation teacher it must name the same model.
        "guide": placeholder(str),
        # infonce / simcse_unsup across devices: "gathered" (every device all-gathers the candidates: a
        # local x global logit block) | "ring" (candidates passed around the devices, flash-style: local x
        # local blocks, the same loss; embedjax/losses/ring.py) for global batches that would not fit.
        "negatives_exchange": "gathered",
    })
    c.data = ml_collections.ConfigDict({  # training and dev data (embedjax/train/sources.py)
        "kind": "stsb",           # what the train file holds (embedjax/train/sources.py: DATA_KINDS)
        "train": str(DATA / "stsb" / "sts-train.csv"),  # training file
        "format": placeholder(str),  # tsv | csv | jsonl | txt | parquet | arrow (a save_to_disk folder); None = from the suffix
        # Training files of any size (embedjax/data/streaming.py): records read one at a time through an
        # index, never all held in memory; parquet and arrow always are, tsv/csv/jsonl/txt when streaming=True.
        "streaming": False,       # True: tsv/csv/jsonl/txt through a byte-offset index
        "index_dir": placeholder(str),  # streaming: where indexes go; None = beside the file, else $EMBEDJAX_CACHE/index
        "columns": {},            # {field: column name / JSON key / 0-based index} (files), or TFDS features; {} = defaults
        "score_range": placeholder(tuple),  # scored files: (lo, hi) every score must lie in; None = any finite score
        "tfds_name": placeholder(str),  # kind=tfds: the dataset, e.g. "glue/stsb"
        "tfds_split": "train",    # kind=tfds: the split to train on
        "tfds_data_dir": placeholder(str),  # kind=tfds: where TFDS keeps datasets; None = TFDS's default
        "skip_bad": False,        # skip (and count) malformed rows instead of stopping at the first (streamed: checked once first)
        # kind=beir: train is a BEIR directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv);
        # one record per query with all its relevant documents (embedjax/data/retrieval_training.py)
        "split": "train",         # kind=beir: the qrels split to train on; kind=csts: train | dev | all (carved by pair)
        "min_grade": 1,           # kind=beir: relevance >= min_grade is a positive (every grade > 0 is never a negative)
        "positives": 1,           # kind=beir: positives per query and step: 1 or m (drawn each epoch)
        "every_positive": False,  # kind=beir: True: every positive of the query each step (m = the largest count)
        "hard_negatives": placeholder(str),  # kind=beir: mined negatives (scripts/mine.py --beir); None = in-batch only
        "num_negatives": 0,       # kind=beir: mined negatives per query and step (drawn from its list each epoch)
        "in_batch_negatives": 0,  # cross_encoder: each group also pairs its query with this many other rows' positives
        # kind=csts: conditioned (scored pairs, each sentence with its condition) | tri (sentences and condition
        # apart: model_kind=tri_encoder) | conditioned_quadruplets | tri_quadruplets (objective.loss=quadruplet)
        "csts_records": "conditioned",
        # kind=beir_corpus: train is a BEIR directory, its corpus.jsonl's documents as single texts.
        # Single texts (sentences, stsb_sentences, beir_corpus) may be cut into sentences, and damaged:
        "split_sentences": False,  # True: each text becomes its sentences
        "noise": placeholder(str),  # "delete": each text -> (damaged copy, text) pairs (TSDAE; objective.loss=tsdae)
        "noise_ratio": 0.6,        # noise="delete": each word's deletion probability (TSDAE's 0.6)
        # This source's instructions, {"query": ..., "document": ...} ({} or a missing key: the run's
        # prompts); "{task}" in either (or in the run's) is replaced by data.task. In a mixture each
        # source has its own; they are exported as prompts "<source>-query" / "<source>-document".
        "prompts": {},
        "task": placeholder(str),  # fills "{task}" in this source's prompts, e.g. "Given a claim, retrieve abstracts"
        "buckets": (16, 32, 64, 128, 256),  # padded lengths, or a packed row's length past pack_length
        # Sequence packing: all texts of a batch share rows of pack_length tokens (0 = pad each
        # side instead). ~2.5x fewer token slots than padding on STS-B; the same embeddings.
        "pack_length": 64,
        "pack_rows_multiple": 2,  # rows round up to a multiple of this (and of the local device count)
        # Multi-task training: {name: {"weight": w, "objective": {objective keys it overrides}, any data
        # key it overrides (kind, train, format, columns, ...)}}; every batch comes from ONE source,
        # trained with that source's loss. {} = one source (the keys above).
        "mixture": {},
        "mixture_mode": "sampled",  # "sampled" (by weight, seeded per step) | "round_robin" (weighted, in turn)
    })
    c.log_every = 10              # train metrics (loss, lr, norms, examples/s) every this many steps
    c.eval_every = 50             # dev evaluation + best-checkpoint candidate every this many steps
    c.eval_batch_size = 128       # texts per evaluation batch (an entry's own batch_size wins)
    # Where a dev evaluation is expensive (a retrieval corpus on a CPU), these two skip evaluations:
    c.eval_start = True           # False: the start is not evaluated (summary "before" is None) nor a candidate
    c.eval_export = True          # False: the exported files are not evaluated again; "after" is the best
    #                               step's figures from training (the same params, in memory)
    # Evaluators run every eval_every steps, at the start and on the exported model
    # (embedjax/eval/suite.py): {name: {"type": sts | retrieval | reranking | pair_classification,
    # "path": ..., the type's own keys, "layers": (), "dims": (), "quantize": ()}}. Every key
    # they report is "{name}/{metric}", e.g. "dev/cosine_spearman", "nq_dev/ndcg@10".
    c.evals = ml_collections.ConfigDict({
        "dev": {"type": "sts", "path": str(DATA / "stsb" / "sts-dev.csv"), "format": "stsb",
                "metrics": ("cosine",), "layers": (), "dims": ()},
    })
    # The best checkpoint (the one exported) by this key of the evaluators' metrics; with
    # "layers"/"dims" in an entry, "{name}/{main_metric}_mean" is the mean over the grid's cells;
    # "key1+key2" selects on the mean of several keys (e.g. two dev sets), "0.7*key1 + 0.3*key2" on
    # a weighted sum (e.g. retrieval and STS dev metrics); every evaluation logs it.
    c.select_metric = "dev/cosine_spearman"
    c.checkpoint = ml_collections.ConfigDict({  # Orbax checkpoints in the workdir
        "every": 50,              # save the train state + data position every this many steps
        "keep": 2,                # latest checkpoints kept (for resuming)
        "keep_best": 1,           # best checkpoints kept by select_metric (the best one is exported)
        "asynchronous": True,     # write in the background; False: the step waits until its save is on disk
    })
    return c


def smoke(c: ml_collections.ConfigDict, steps: int = 8) -> ml_collections.ConfigDict:
    """A seconds-long CPU run of the same code path: few steps, frequent logs/evals/saves."""
    c.num_steps = steps
    c.batch_size = 16
    c.log_every = 2
    c.eval_every = steps // 2
    c.checkpoint.every = steps // 2
    return c


def maybe_smoke(c: ml_collections.ConfigDict, args: dict[str, Any]) -> ml_collections.ConfigDict:
    """The ``smoke`` variant: ``:smoke`` = 8 steps, ``:smoke=4`` = 4 steps (even, >= 2)."""
    value = args.get("smoke", False)
    if value is False:
        return c
    steps = 8 if value is True else value
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2 or steps % 2:
        raise ValueError(f"smoke takes an even number of steps >= 2 (smoke=8), got {value!r}")
    return smoke(c, steps)
