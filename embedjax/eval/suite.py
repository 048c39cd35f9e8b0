"""Evaluators from config: ``{name: {"type": ..., "path": ..., ...}}`` -> evaluators -> one metrics dict.

The training loop (``config.evals``) and ``scripts/eval.py`` (``--task``) both build their
evaluators here, so a config entry and a CLI task mean the same thing::

    evals = {
        "stsb_dev": {"type": "sts", "path": "data/stsb/sts-dev.csv", "format": "stsb"},
        "nq_dev": {"type": "retrieval", "path": "data/nq", "split": "dev"},
        "sick_pc": {"type": "pair_classification", "path": "data/sick_pairs.tsv"},
    }
    evaluators = from_config(evals)
    metrics = run_all(evaluators, encoder)          # {"stsb_dev/cosine_spearman": ..., "nq_dev/ndcg@10": ...}

Every entry takes, besides its type's own keys (see each module's ``from_spec``):

* ``layers`` / ``dims``: also evaluate these depths / Matryoshka widths (``GridEvaluator``);
  the full model is always a cell, and ``{name}/{main_metric}_mean`` is the mean over cells;
* ``quantize``: also score these precisions (``"int8"``, ``"binary"``; ``QuantizedEvaluator``).
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Sequence

from embedjax.eval.base import Evaluator

TYPES = {
    "sts": "embedjax.eval.sts",
    "retrieval": "embedjax.eval.retrieval",
    "reranking": "embedjax.eval.reranking",
    "pair_classification": "embedjax.eval.pair_classification",
    "csts": "embedjax.eval.csts",
    "diagnostics": "embedjax.eval.diagnostics",  # alignment, uniformity, anisotropy, hubness, ID, effective rank
    # a SPLADE model's (it scores a SparseEncoder) and a ColBERT model's (a ColbertEncoder)
    "sparse_retrieval": "embedjax.eval.sparse_retrieval",
    "colbert_retrieval": "embedjax.eval.late_retrieval",
    # a three-head (BGE-M3) model's: each head alone and fused (it scores an M3Encoder)
    "m3_retrieval": "embedjax.eval.fusion:m3_from_spec",
    # a cross-encoder run's evaluators (they score a CrossEncoder, not an Encoder)
    "cross_sts": "embedjax.eval.cross:sts_from_spec",
    "cross_csts": "embedjax.eval.cross:csts_from_spec",
    "rerank": "embedjax.eval.cross:rerank_from_spec",
}
CROSS_TYPES = ("cross_sts", "cross_csts", "rerank")
SPARSE_TYPES = ("sparse_retrieval",)
LATE_TYPES = ("colbert_retrieval",)  # a ColBERT model's (it scores a ColbertEncoder)
M3_TYPES = ("m3_retrieval",)  # a three-head model's (it scores an M3Encoder's heads, alone and fused)
WRAPPER_KEYS = ("type", "layers", "dims", "quantize")


def as_tuple(value) -> tuple:
    """A config list (tuple, list, one int, or "a,b" string) as a tuple; empty for None/""."""
    if value in (None, "", ()):
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, int):
        return (value,)
    return tuple(value)


def build(name: str, spec: Mapping[str, Any]) -> Evaluator:
    """One evaluator from its config entry (``spec["type"]`` in ``TYPES``), wrapped as asked."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in TYPES:
        raise ValueError(f"evaluator {name!r}: type {kind!r} is not one of {sorted(TYPES)}")
    layers = tuple(int(k) for k in as_tuple(spec.pop("layers", ())))
    dims = tuple(int(d) for d in as_tuple(spec.pop("dims", ())))
    quantize = as_tuple(spec.pop("quantize", ()))
    try:
        module, _, function = TYPES[kind].partition(":")
        evaluator = getattr(importlib.import_module(module), function or "from_spec")(name, spec)
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"evaluator {name!r} ({kind}): {err}") from None
    if quantize:
        from embedjax.eval.quantize import PRECISIONS
        from embedjax.eval.quantized import QuantizedEvaluator

        unknown = [q for q in quantize if q not in PRECISIONS]
        if unknown:
            raise ValueError(f"evaluator {name!r}: quantize {unknown} not among {PRECISIONS}")
        evaluator = QuantizedEvaluator(evaluator, precisions=("float32", *[q for q in quantize if q != "float32"]))
    if layers or dims:  # outside the quantiser: each (depth, width) slice is quantised on its own
        from embedjax.eval.grid import GridEvaluator

        evaluator = GridEvaluator(evaluator, layers=(None, *layers), dims=(None, *dims))
    return evaluator


def from_config(evals: Mapping[str, Mapping[str, Any]]) -> list[Evaluator]:
    """Every evaluator of ``config.evals`` (names must be unique, non-empty, without '/')."""
    out = []
    for name, spec in evals.items():
        if not name or "/" in name:
            raise ValueError(f"evaluator name {name!r}: expected a non-empty name without '/'")
        out.append(build(name, spec))
    return out


def for_training(evals: Mapping[str, Mapping[str, Any]], *, batch_size: int, enc_cfg,
                 cross_encoder: bool = False, sparse: bool = False, late: bool = False,
                 multi_head: bool = False) -> list[Evaluator]:
    """A training run's evaluators (``config.evals``): an entry without its own ``batch_size`` takes
    ``batch_size`` (``eval_batch_size``); grid depths and widths are checked against the model
    now, not after the first evaluation, and the full depth / width (always a cell) is not
    listed twice. A ``cross_encoder`` run takes only the ``CROSS_TYPES``, a ``sparse`` (SPLADE) run
    only the ``SPARSE_TYPES``, a ``late`` (ColBERT) run only the ``LATE_TYPES``, a ``multi_head`` (m3) run
    only the ``M3_TYPES``, a bi-encoder run none of them."""
    entries = {}
    for name, spec in evals.items():
        spec = dict(spec)
        # the run kinds whose models only their own evaluator types score, as is (a batch size added)
        own = [(multi_head, M3_TYPES, "a three-head (m3) run", "a three-head model (M3Encoder)"),
               (late, LATE_TYPES, "a ColBERT run", "a ColBERT model (ColbertEncoder)"),
               (sparse, SPARSE_TYPES, "a SPLADE run", "a SPLADE model (SparseEncoder)")]
        for is_run, types, run, model in own:
            if (spec.get("type") in types) != is_run:
                if is_run:
                    raise ValueError(f"evals.{name}: {run} is evaluated by {types}, not {spec.get('type')!r}")
                raise ValueError(f"evals.{name}: type {spec['type']!r} scores {model}, not this run's encoder")
        if multi_head or late or sparse:
            spec.setdefault("batch_size", batch_size)
            entries[name] = spec
            continue
        if (spec.get("type") in CROSS_TYPES) != cross_encoder:
            allowed = CROSS_TYPES if cross_encoder else sorted(set(TYPES) - set(CROSS_TYPES))
            raise ValueError(f"evals.{name}: type {spec.get('type')!r} cannot evaluate a "
                             f"{'cross' if cross_encoder else 'bi'}-encoder run; use one of {tuple(allowed)}")
        if cross_encoder:
            if any(spec.get(k) for k in WRAPPER_KEYS[1:]):
                raise ValueError(f"evals.{name}: layers / dims / quantize grids are for bi-encoders")
            spec.setdefault("batch_size", batch_size)
            entries[name] = spec
            continue
        layers = [int(k) for k in as_tuple(spec.get("layers", ()))]
        dims = [int(d) for d in as_tuple(spec.get("dims", ()))]
        for k in layers:
            if not 1 <= k <= enc_cfg.num_layers:
                raise ValueError(f"evals.{name}.layers: {k} is not in 1..{enc_cfg.num_layers}")
        for d in dims:
            if not 1 <= d <= enc_cfg.hidden_size:
                raise ValueError(f"evals.{name}.dims: {d} is not in 1..{enc_cfg.hidden_size}")
        spec["layers"] = tuple(k for k in layers if k != enc_cfg.num_layers)
        spec["dims"] = tuple(d for d in dims if d != enc_cfg.hidden_size)
        spec.setdefault("batch_size", batch_size)
        entries[name] = spec
    if not entries:
        raise ValueError("config.evals is empty: at least one evaluator selects the exported checkpoint")
    return from_config(entries)


def run_all(evaluators: Sequence[Evaluator], encoder) -> dict[str, float]:
    """Every evaluator's ``(name, value)`` pairs in one dict, in order."""
    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        metrics.update(evaluator.run(encoder))
    return metrics


def headline(evaluator: Evaluator) -> str:
    """The evaluator's main key with its prefix, e.g. ``"stsb_dev/cosine_spearman"``."""
    return f"{evaluator.name}/{evaluator.main_metric}"
