"""Defaults shared by every config; each experiment file overrides what it changes."""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from embedjax import hf

# ../shared/data beside the repository by default; EMBEDJAX_DATA points elsewhere.
DATA = Path(os.environ.get("EMBEDJAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def parse_arg(arg: str | None) -> dict[str, str]:
    """``"smoke"`` / ``"smoke,lr=1e-5"`` -> ``{"smoke": "", "lr": "1e-5"}`` (variants after the colon)."""
    out = {}
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip()
    return out


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = hf.minilm_l6()      # a checkpoint directory or hub id
    c.pooling = ""                # '' = the checkpoint's pooling
    c.max_length = 0              # 0 = the checkpoint's max_seq_length
    c.dtype = "float32"           # compute dtype ("bfloat16" on TPU/GPU); params stay float32
    c.seed = 0
    c.batch_size = 32             # global, over all devices and hosts
    c.num_epochs = 1.0
    c.num_steps = 0               # > 0 overrides num_epochs
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.sharding_rules = "replicated"  # or "fsdp" (shard big matrices over the fsdp axis)

    c.optim = ml_collections.ConfigDict({
        "learning_rate": 2e-5, "warmup": 0.1, "decay": "linear", "weight_decay": 0.01,
        "clip_norm": 1.0, "accumulate": 1, "b1": 0.9, "b2": 0.999, "eps": 1e-6,
    })
    c.objective = ml_collections.ConfigDict({
        "loss": "angle",
        "loss_kwargs": {},
        "pooling": "",
        "matryoshka_dims": [],
        "matryoshka_weights": [],
        "matryoshka_n_per_step": 0,
        "layers": "",
        "layer_kwargs": {},
        "remat": False,
        "dropout": True,
        "gradcache_chunk": 0,  # > 0: GradCache (exact large-batch contrastive loss, bounded memory)
    })
    c.data = ml_collections.ConfigDict({
        "kind": "stsb",
        "train": str(DATA / "stsb" / "sts-train.csv"),
        "dev": str(DATA / "stsb" / "sts-dev.csv"),
        "dev_format": "stsb",
        "buckets": [16, 32, 64, 128, 256],  # padded layout, or a packed row's length past pack_length
        # Sequence packing: all texts of a batch share rows of pack_length tokens (0 = pad each
        # side instead). ~2.5x fewer token slots than padding on STS-B; the same embeddings.
        "pack_length": 64,
        "pack_rows_multiple": 2,  # rows round up to a multiple of this (and of the local device count)
        "skip_bad": False,
    })
    c.log_every = 10
    c.eval_every = 50
    c.eval_batch_size = 128
    c.eval_layers = []            # also evaluate these depths (2D Matryoshka grids) ...
    c.eval_dims = []              # ... and these widths; the full model is always evaluated
    c.select_metric = "dev/cosine_spearman"  # best checkpoint by this; "dev/cosine_spearman_mean" = grid mean
    c.checkpoint = ml_collections.ConfigDict({"every": 50, "keep": 2, "keep_best": 1})
    c.testing = ml_collections.ConfigDict({"kill_at_step": 0})  # fault injection (tests only)
    return c


def smoke(c: ml_collections.ConfigDict, steps: int = 8) -> ml_collections.ConfigDict:
    """A seconds-long CPU run of the same code path: few steps, small dev set."""
    c.num_steps = steps
    c.batch_size = 16
    c.log_every = 2
    c.eval_every = steps // 2
    c.checkpoint.every = steps // 2
    return c
