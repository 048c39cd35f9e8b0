"""Which checkpoint a run exports: the selection metric (one key the evaluators report, or the
mean of several, ``"a+b"``), and which params compete for it at each evaluation (the raw
params, or with an EMA the average or whichever of the two scores higher)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from embedjax.train.config import EMA_SELECT


def add_select_metric(select: str, metrics: dict) -> dict:
    """``metrics`` plus the selection key when it is a mean: ``"a+b"`` (e.g.
    ``"dev/cosine_spearman+sick/cosine_spearman"``) selects on the mean of the evaluators' keys
    ``a`` and ``b``, so one checkpoint can be chosen for several dev sets at once."""
    parts = select.split("+")
    if len(parts) == 1:
        return metrics
    for part in parts:
        check_select_metric(part, metrics)
    return {**metrics, select: sum(metrics[p] for p in parts) / len(parts)}


def check_select_metric(select: str, metrics: dict) -> None:
    """The selection key must be one the evaluators report (checked on the first evaluation,
    before any training step of a fresh run)."""
    if select not in metrics:
        close = difflib.get_close_matches(select, list(metrics), n=3)
        raise ValueError(f"select_metric {select!r} is not among the evaluators' metrics"
                         + (f"; did you mean {close}?" if close else "") + f" (they report {sorted(metrics)})")


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which params compete for export at an evaluation: the raw params, or with an EMA
    (``optim.ema``) the EMA or whichever of the two scores higher (``optim.ema_select``).
    The EMA's metrics are logged as ``ema/<key>``; ``selected_ema`` says which one competed."""

    metric: str
    mode: str = "best"
    ema: bool = False

    def __post_init__(self):
        if self.mode not in EMA_SELECT:
            raise ValueError(f"optim.ema_select must be 'best', 'ema' or 'raw', got {self.mode!r}")

    def at_start(self, metrics: dict) -> dict:
        return {**metrics, "selected_ema": 0.0} if self.ema else metrics

    def choose(self, raw: dict, ema: dict | None, params, ema_params) -> tuple[dict, Any, dict]:
        """``(metrics to log, candidate params, the candidate's metrics)``."""
        if ema is None:
            return raw, params, raw
        logged = {**raw, **{f"ema/{k}": v for k, v in ema.items()}}
        use_ema = self.mode == "ema" or (self.mode == "best" and ema[self.metric] > raw[self.metric])
        ranked = {**(ema if use_ema else raw), "selected_ema": float(use_ema)}
        return {**logged, "selected_ema": float(use_ema)}, (ema_params if use_ema else params), ranked
