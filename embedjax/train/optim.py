"""The optimizer: AdamW with warmup and decay, clipping, weight-decay mask, accumulation."""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

# Biases, layer norms and embedding tables get no weight decay (BERT's convention).
NO_DECAY = r"(bias|scale)$|^embeddings/"


def learning_rate_schedule(peak: float, total_steps: int, warmup: float | int = 0.1, decay: str = "linear"):
    """Linear warmup to ``peak`` then ``linear`` / ``cosine`` decay to 0, or ``constant``.

    ``warmup`` is a fraction of ``total_steps`` when < 1, else a step count.
    """
    warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warmup_steps, 1)
    decays = {
        "linear": optax.linear_schedule(peak, 0.0, rest),
        "cosine": optax.cosine_decay_schedule(peak, rest),
        "constant": optax.constant_schedule(peak),
    }
    if decay not in decays:
        raise ValueError(f"unknown decay {decay!r}; choose one of {sorted(decays)}")
    warm = optax.linear_schedule(0.0, peak, warmup_steps) if warmup_steps else optax.constant_schedule(peak)
    return optax.join_schedules([warm, decays[decay]], [warmup_steps])


def decay_mask(params, pattern: str = NO_DECAY):
    """True for the params weight decay applies to: every one whose path does not match ``pattern``."""
    regex = re.compile(pattern)

    def keep(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not regex.search(name)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: Mapping[str, Any], total_steps: int):
    """``(optax transformation, schedule)`` from the ``optim`` section of a config.

    Keys: learning_rate, warmup (fraction or steps), decay, weight_decay, b1, b2, eps,
    clip_norm (0 = off), accumulate (micro-batches per update, 1 = off).
    """
    schedule = learning_rate_schedule(cfg["learning_rate"], total_steps, cfg.get("warmup", 0.1), cfg.get("decay", "linear"))
    chain = []
    if cfg.get("clip_norm", 1.0):
        chain.append(optax.clip_by_global_norm(cfg.get("clip_norm", 1.0)))
    chain.append(
        optax.adamw(
            schedule,
            b1=cfg.get("b1", 0.9),
            b2=cfg.get("b2", 0.999),
            eps=cfg.get("eps", 1e-6),
            weight_decay=cfg.get("weight_decay", 0.01),
            mask=decay_mask,
        )
    )
    tx = optax.chain(*chain)
    accumulate = int(cfg.get("accumulate", 1))
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx, schedule
