"""The run's training sources and the stream of host batches they feed.

A run trains on one source (``config.data``) or, with ``data.mixture``, on several, each with
its own records, objective and batches; every step trains on ONE source's batch
(``embedjax.data.mixture``). ``build_sources`` reads each source's records, checks them
against its objective (``loss_specs.check_objective_data``) and builds its pipeline;
``SourceStream`` yields ``(source name, host batch)`` step after step and checkpoints its
position.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping

import jax

from embedjax import tri_head
from embedjax.data import pipeline
from embedjax.data.batch import Batch
from embedjax.model import Encoder
from embedjax.train import sources
from embedjax.train.config import DataConfig, SourceConfig, by_side
from embedjax.train.loss_specs import check_objective_data
from embedjax.train.objective import Objective

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingSource:
    """One source of training batches: its records, its objective and its batch iterator."""

    name: str
    data: DataConfig
    objective: Objective
    records: Any          # random access
    iterator: Any         # pipeline.DataIterator of host batches (repeats)
    weight: float = 1.0


def packing_for(data: DataConfig, objective: Objective) -> pipeline.Packing | None:
    """``data.pack_length`` > 0: pack the texts of each batch (``pipeline.Packing``); rows are a
    multiple of ``data.pack_rows_multiple`` and of the local device count. GradCache needs the
    padded layout, so it turns packing off."""
    if not data.pack_length:
        return None
    if objective.gradcache_chunk:
        log.info("objective.gradcache_chunk is set: padded batches (GradCache chunks by example, not by packed row)")
        return None
    multiple = math.lcm(data.pack_rows_multiple, jax.local_device_count())
    return pipeline.Packing(length=data.pack_length, rows_multiple=multiple,
                            views=2 if objective.loss == "simcse_unsup" else 1)


def source_prompts(run_prompts: Mapping[str, str], data: DataConfig) -> dict[str, str]:
    """A source's ``{"query", "document"}`` instructions: its own (``data.prompts``), else the run's,
    with ``{task}`` replaced by ``data.task`` (a placeholder without a task raises ValueError)."""
    out = {}
    for kind in ("query", "document"):
        text = data.prompts.get(kind) or run_prompts.get(kind, "")
        if "{task}" in text:
            if data.task is None:
                raise ValueError(f"the {kind} prompt {text!r} has a {{task}} placeholder: set data.task (per "
                                 "source in a mixture)")
            text = text.replace("{task}", data.task)
        if text:
            out[kind] = text
    return out


def exported_prompts(run_prompts: Mapping[str, str], specs: Mapping[str, SourceConfig]) -> dict[str, str]:
    """The prompts a trained model records: the run's (those without a ``{task}`` placeholder) and,
    for every source with its own prompts or task, ``"<source>-query"`` / ``"<source>-document"``
    (``Encoder.encode(prompt_name=...)``; MTEB's ``"<task>-query"`` lookup finds them when a
    source is named after an MTEB task)."""
    out = {k: v for k, v in run_prompts.items() if v and "{task}" not in v}
    for name, spec in specs.items():
        if spec.data.prompts or spec.data.task is not None:
            out.update({f"{name}-{kind}": text for kind, text in source_prompts(run_prompts, spec.data).items()})
    return out


def build_source(spec: SourceConfig, encoder: Encoder, *, teacher: Encoder | None, batch_size: int, seed: int,
                 prompts: Mapping[str, str], mixture: bool = False,
                 splade: Mapping[str, Any] | None = None) -> TrainingSource:
    """One ``TrainingSource``: records read and checked against its objective (errors name the
    mixture entry), and its batch iterator (seeded by ``seed``). ``prompts``: the run's
    ``{"query", "document"}`` instructions (a source's own ``data.prompts`` win). A cross-encoder
    (``embedjax.cross_model.CrossEncoder``) gets batches of candidate groups and a ``CrossObjective``;
    a SPLADE encoder (``embedjax.sparse_model.SparseEncoder``) a ``SparseObjective`` from ``splade``
    (the run's section) and padded batches; a ColBERT encoder (``embedjax.colbert_model.ColbertEncoder``)
    a ``ColbertObjective`` and padded batches in its layout (``ColbertEncoder.batch_format``); a
    three-head encoder (``embedjax.m3_model.M3Encoder``) an ``M3Objective`` and padded batches."""
    from embedjax.colbert_model import ColbertEncoder
    from embedjax.cross_model import CrossEncoder
    from embedjax.m3_model import M3Encoder
    from embedjax.sparse_model import SparseEncoder

    if isinstance(encoder, CrossEncoder):
        return _cross_source(spec, encoder, batch_size=batch_size, seed=seed, mixture=mixture)
    transform = None
    if isinstance(encoder, M3Encoder):
        from embedjax.train.m3_objective import M3Objective

        objective = M3Objective.from_config(spec.objective, encoder)
        _padded_without_prompts(spec.data, "a three-head (m3) run")
    elif isinstance(encoder, ColbertEncoder):
        from embedjax.train.colbert_objective import ColbertObjective

        objective = ColbertObjective.from_config(spec.objective, dim=encoder.dim)
        _padded_without_prompts(spec.data, "a ColBERT run")
        transform = encoder.batch_format()
    elif isinstance(encoder, SparseEncoder):
        from embedjax.train.sparse_objective import SparseObjective

        objective = SparseObjective.from_config(spec.objective, splade)
        if objective.inference_free:  # the special tokens a static query side never reads
            backend = encoder.tokenizer.backend
            special = set(backend.encode("a").ids) - set(backend.encode("a", add_special_tokens=False).ids)
            objective = dataclasses.replace(objective, special_ids=tuple(sorted(special)))
        if spec.data.pack_length:
            raise ValueError("a SPLADE run reads padded batches: set data.pack_length=0")
    else:
        objective = Objective.from_config(spec.objective, encoder.pooling, teacher=teacher,  # the run's one pooling
                                          tri_head=tri_head.KEY in encoder.params, dense=encoder.dense)
        if objective.loss == "tsdae" and spec.data.pack_length:  # its decoder reads the originals' padded ids
            raise ValueError("objective.loss='tsdae' reads padded batches: set data.pack_length=0")
        if objective.loss == "mntp":  # its mask token, special ids and LM head, from the encoder's checkpoint
            from embedjax.train.mntp_objective import resolve

            objective = resolve(objective, encoder)
    try:
        side_prompts = by_side(source_prompts(prompts, spec.data))
        records = sources.train_source(spec.data, seed=seed)
        check_objective_data(objective, pipeline.fields_of(records), sources.scores_of(records))
    except ValueError as err:
        if not mixture:
            raise
        raise ValueError(f"data.mixture.{spec.name}: {err}") from None
    tokenizer = encoder.tokenizer.replace(buckets=spec.data.buckets)  # keeps an appended EOS
    iterator = pipeline.train_pipeline(records, tokenizer, global_batch_size=batch_size, seed=seed,
                                       preprocess=str.lower if getattr(encoder, "lowercase", False) else None,
                                       common_length=True, packing=packing_for(spec.data, objective),
                                       prompts=side_prompts, include_prompt=getattr(encoder, "include_prompt", True),
                                       transform=transform)
    return TrainingSource(spec.name, spec.data, objective, records, iterator, spec.weight)


def _padded_without_prompts(data: DataConfig, run: str) -> None:
    """ColBERT and three-head runs read padded batches and no instructions (their layouts are their own)."""
    if data.pack_length or data.prompts or data.task is not None:
        raise ValueError(f"{run} reads padded batches without prompts: set data.pack_length=0 and leave "
                         "data.prompts / data.task unset")


def _cross_source(spec: SourceConfig, model, *, batch_size: int, seed: int, mixture: bool) -> TrainingSource:
    from embedjax.data.cross_batches import PairFormat
    from embedjax.train.cross_objective import CrossObjective, check_cross_data

    try:
        if spec.data.prompts or spec.data.task is not None:
            raise ValueError("data.prompts / data.task apply to bi-encoders; a cross-encoder reads the pair whole")
        objective = CrossObjective.from_config(spec.objective, model.head)
        records = sources.train_source(spec.data, seed=seed)
        check_cross_data(objective, pipeline.fields_of(records), sources.scores_of(records),
                         spec.data.in_batch_negatives)
        pairs = PairFormat(template=model.template, in_batch_negatives=spec.data.in_batch_negatives)
    except ValueError as err:
        if not mixture:
            raise
        raise ValueError(f"data.mixture.{spec.name}: {err}") from None
    tokenizer = model.tokenizer.replace(buckets=spec.data.buckets)
    iterator = pipeline.train_pipeline(records, tokenizer, global_batch_size=batch_size, seed=seed,
                                       packing=packing_for(spec.data, objective), pairs=pairs)
    return TrainingSource(spec.name, spec.data, objective, records, iterator, spec.weight)


def build_sources(specs: Mapping[str, SourceConfig], encoder: Encoder, *, teacher: Encoder | None, batch_size: int,
                  seed: int, prompts: Mapping[str, str], mixture: bool,
                  splade: Mapping[str, Any] | None = None) -> dict[str, TrainingSource]:
    """Every source of the run (``mixture``: the entries of ``data.mixture``); the i-th shuffles
    with ``seed + i``."""
    return {name: build_source(spec, encoder, teacher=teacher, batch_size=batch_size, seed=seed + i, prompts=prompts,
                               mixture=mixture, splade=splade)
            for i, (name, spec) in enumerate(specs.items())}


class SourceStream:
    """``next()`` -> ``(source name, host batch)``: the one source's batches, or a mixture's
    (``embedjax.data.mixture.MixtureIterator``, one source per step); ``get_state`` /
    ``set_state`` checkpoint the position."""

    def __init__(self, training_sources: Mapping[str, TrainingSource], *, mixture_mode: str | None, seed: int):
        self.sources = dict(training_sources)
        if mixture_mode is None:
            ((self.only, source),) = self.sources.items()
            self.iterator = source.iterator
        else:
            from embedjax.data.mixture import MixtureIterator

            self.only = None
            self.iterator = MixtureIterator({n: s.iterator for n, s in self.sources.items()},
                                            {n: s.weight for n, s in self.sources.items()}, mode=mixture_mode, seed=seed)

    def __next__(self) -> tuple[str, Batch]:
        if self.only is not None:
            return self.only, next(self.iterator)
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


def total_train_steps(num_steps: int | None, num_epochs: float, training_sources: Mapping[str, TrainingSource], *,
                      batch_size: int, accumulate: int) -> int:
    """``num_steps``, else ``num_epochs`` epochs; a mixture's epoch is as many steps as one pass
    over every source. Whole accumulation groups only with epochs (an explicit num_steps must divide)."""
    if num_steps is not None:
        return num_steps
    per_epoch = sum(pipeline.steps_per_epoch(len(s.records), batch_size, jax.process_count())
                    for s in training_sources.values())
    total = int(round(num_epochs * per_epoch))
    return total - total % accumulate
