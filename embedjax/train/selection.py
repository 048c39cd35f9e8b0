"""Which checkpoint a run exports: the selection metric (one key the evaluators report, the
mean of several, ``"a+b"``, or a weighted sum, ``"0.5*a + 0.5*b"``), and which params compete for
it at each evaluation (the raw params, or with an EMA the average or whichever of the two scores
higher)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from embedjax.train.config import EMA_SELECT


def parse_select_metric(select: str) -> list[tuple[float, str]]:
    """``[(weight, key), ...]`` of a selection metric: ``"a"`` -> [(1, a)]; ``"a+b"`` -> the mean,
    [(1/2, a), (1/2, b)]; ``"0.7*a + 0.3*b"`` -> those weights (every term weighted, then). Keys
    are evaluator keys such as ``scifact_dev/ndcg@10`` (no ``+`` or ``*`` in them)."""
    terms = [t.strip() for t in select.split("+")]
    if not select.strip() or not all(terms):
        raise ValueError(f"select_metric {select!r}: expected a key, 'a+b' (their mean) or '0.5*a + 0.5*b'")
    weighted = ["*" in t for t in terms]
    if any(weighted) and not all(weighted):
        raise ValueError(f"select_metric {select!r}: weight every term ('0.5*a + 0.5*b') or none ('a+b': the mean)")
    if not any(weighted):
        return [(1.0 / len(terms), t) for t in terms]
    out = []
    for term in terms:
        weight, _, key = (x.strip() for x in term.partition("*"))
        try:
            w = float(weight)
        except ValueError:
            w = math.nan
        if not math.isfinite(w) or not key or "*" in key:
            raise ValueError(f"select_metric {select!r}: term {term!r} is not 'weight*key' with a finite weight")
        out.append((w, key))
    return out


def add_select_metric(select: str, metrics: dict) -> dict:
    """``metrics`` plus the selection key when it combines several: ``"a+b"`` (e.g.
    ``"dev/cosine_spearman+sick/cosine_spearman"``) selects on the mean of the evaluators' keys
    ``a`` and ``b``, ``"0.5*a + 0.5*b"`` on that weighted sum, so one checkpoint can be chosen for
    several dev sets (or tasks) at once; every evaluation logs it under ``select`` itself."""
    terms = parse_select_metric(select)
    if len(terms) == 1 and terms[0][1] == select:
        return metrics
    for _, key in terms:
        check_select_metric(key, metrics)
    return {**metrics, select: math.fsum(w * metrics[key] for w, key in terms)}


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
