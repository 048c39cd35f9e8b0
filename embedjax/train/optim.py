"""The optimizer: AdamW with warmup and decay, clipping, weight-decay mask, gradient accumulation
(the schedule counts optimizer updates; see ``make_optimizer``)."""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

from embedjax.train.config import OptimConfig

# Biases and norms get no weight decay; each backbone adds its own (Backbone.no_decay, e.g. BERT's
# embedding tables), which the loop passes to make_optimizer.
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


def make_optimizer(cfg: OptimConfig | Mapping[str, Any], total_steps: int, no_decay: str = NO_DECAY):
    """``(tx, lr_at_step)`` from the ``optim`` section of a config (``OptimConfig``; a mapping
    with its keys is parsed into one, every key required).

    The section: learning_rate, warmup (a fraction of the updates when < 1, else a number of
    updates), decay ("linear", "cosine", "constant"), weight_decay, b1, b2, eps, clip_norm
    (0 = off), accumulate (micro-batches per update, 1 = off). ``no_decay``: a regex over param
    paths that get no weight decay (the backbone's ``Backbone.no_decay``).

    ``total_steps`` counts train steps (micro-batches: one ``train_step`` call each). With
    ``accumulate = k > 1`` the transformation is ``optax.MultiSteps``: it averages the
    gradients of k consecutive micro-batches and applies ONE AdamW update (clipping the
    averaged gradient) on every k-th step, leaving the parameters unchanged on the others.
    The learning-rate schedule counts those updates: ``total_steps // k`` of them, warmup and
    decay computed over the updates. ``total_steps`` must be a multiple of k (else the last
    ``total_steps % k`` micro-batches would be averaged into an update that never happens):
    a ValueError says so.

    ``lr_at_step(step)`` is the learning rate of the update that the 0-based train step
    ``step`` contributes to, i.e. ``schedule(step // k)``: the rate actually applied (on the
    k-th micro-step of the group). Log it for the step just run, ``lr_at_step(state.step - 1)``.
    The first update runs at ``schedule(0)``, which is 0 with warmup.

    Accumulation is NOT a large batch for contrastive losses: each micro-batch is embedded
    and scored on its own, so InfoNCE / SimCSE / CoSENT / AnglE see only the micro-batch's
    in-batch negatives (B/k candidates, not B). Only losses without in-batch interaction
    (``cosine_mse``) give the large-batch gradient exactly. GradCache
    (``objective.gradcache_chunk``) is the exact large-batch path for contrastive losses:
    the whole batch's embeddings are scored together while the encoder runs chunk by chunk.
    """
    if not isinstance(cfg, OptimConfig):
        cfg = OptimConfig.from_config(cfg)
    accumulate = cfg.accumulate
    if total_steps % accumulate:
        raise ValueError(
            f"optim.accumulate={accumulate} does not divide the {total_steps} train steps: the last "
            f"{total_steps % accumulate} micro-batches would never be applied. Set num_steps to a multiple "
            f"of {accumulate} (e.g. {total_steps - total_steps % accumulate or accumulate})")
    updates = total_steps // accumulate
    schedule = learning_rate_schedule(cfg.learning_rate, updates, cfg.warmup, cfg.decay)
    chain = []
    if cfg.clip_norm:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=lambda params: decay_mask(params, no_decay))
    )
    tx = optax.chain(*chain)
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)

    def lr_at_step(step):
        """Learning rate applied by the update that (0-based) train step ``step`` contributes to."""
        return schedule(step // accumulate)

    return tx, lr_at_step


def ema_update(ema, params, decay: float):
    """One step of the exponential moving average of params (Polyak averaging):
    ``ema <- decay * ema + (1 - decay) * params``, leaf by leaf, in the params' dtype.

    The loop keeps the average in ``TrainState.ema`` (config ``optim.ema`` = the decay; it starts
    at the initial params, e.g. the pretrained model, so no bias correction is needed), evaluates
    it next to the raw params and may select it for export (``optim.ema_select``). A decay of
    0.99 averages roughly the last 100 steps.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)
