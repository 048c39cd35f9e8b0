"""The training loop: ``train_and_evaluate(config, workdir)``.

rerun check -> mesh -> encoder + data -> optimizer -> shardings (eval_shape) -> state
created sharded or resumed -> jit(train_step, donate) -> loop: host batch -> global batch
(shapes agreed across hosts) -> step, NaN guard, metrics, evaluation + best-k, checkpoint
(state + every host's data position), callbacks -> export the best params once (process 0),
barrier -> final evaluation on every host.

The same code runs on one CPU and on a multi-host pod: ``jax.distributed`` is initialised
by the caller (``scripts/train.py``, ``embedjax.distributed.initialize``) before this runs.
Side effects (files, logging, progress bar) live here and in ``embedjax.checkpoint``;
everything it calls is pure. Tests and benchmarks hook in through ``Callback``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax import distributed, lora, sharding
from embedjax import export as export_lib
from embedjax.checkpoint import Checkpointer, abstract_like
from embedjax.data import pipeline
from embedjax.encoders import registry
from embedjax.eval import suite
from embedjax.model import load_pretrained
from embedjax.train import memory, optim, run_config, sources
from embedjax.train.objective import Objective, check_objective_data
from embedjax.train.state import TrainState
from embedjax.train.step import train_step

log = logging.getLogger(__name__)
MODEL_FIELDS = ("a_", "b_", "n_", "p_", "labels")  # batch keys the step reads (not 'valid', 'index')


@dataclasses.dataclass(frozen=True)
class Callback:
    """``fn(step, state, metrics)`` after every ``every``-th step (after its evaluation and
    checkpoint, if due). ``metrics`` are the step's device scalars (``float()`` syncs);
    ``state`` is donated to the next step, so read what you need before returning.
    Tests inject faults through it, benchmarks time steps with it."""

    every: int
    fn: Callable[[int, Any, dict], None]


def opt_state_shardings(opt_state_shapes, param_shards, mesh):
    """Optimizer leaves named like a param (Adam's mu/nu) share its sharding; others replicate."""
    by_path = {sharding.param_path(path): s for path, s in jax.tree_util.tree_leaves_with_path(param_shards)}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        name = sharding.param_path(path)
        for param_name, s in by_path.items():
            if name.endswith(param_name) and len(s.spec) <= leaf.ndim:
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)


def state_shardings(abstract_state: TrainState, frozen, mesh, rules) -> tuple[TrainState, Any]:
    """``(state shardings, frozen-param shardings)`` by ``rules``: params (trained and frozen) by
    their rules, Adam's moments like their param, step and key replicated."""
    param_shards = sharding.param_shardings(abstract_state.params, mesh, rules)
    replicated = NamedSharding(mesh, P())
    state = TrainState(step=replicated, params=param_shards, rng=replicated,
                       opt_state=opt_state_shardings(abstract_state.opt_state, param_shards, mesh))
    return state, sharding.param_shardings(frozen, mesh, rules)


def jit_train_step(enc_cfg, objective: Objective, tx, state_shards, frozen_shards, mesh):
    """``train_step`` jitted with the run's shardings, the state donated: ``step(state, batch, frozen)``.
    Lower it with abstract arguments (``jax.ShapeDtypeStruct``) to learn a configuration's
    per-device memory without allocating it (``embedjax.train.memory``)."""
    return jax.jit(
        functools.partial(train_step, enc_cfg=enc_cfg, objective=objective, tx=tx),
        in_shardings=(state_shards, sharding.batch_sharding(mesh), frozen_shards),
        out_shardings=(state_shards, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


class MetricsWriter:
    """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard (process 0)."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                log.warning("tensorboardX not installed: metrics go to metrics.jsonl only")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def evaluators_from_config(config, enc_cfg) -> list:
    """``config.evals`` -> evaluators (``embedjax.eval.suite``); an entry without its own
    ``batch_size`` takes ``eval_batch_size``. Grid depths and widths are checked against the
    model now, not after the first evaluation."""
    evals = {}
    for name, spec in config.evals.items():
        spec = dict(spec)
        layers = [int(k) for k in suite.as_tuple(spec.get("layers", ()))]
        dims = [int(d) for d in suite.as_tuple(spec.get("dims", ()))]
        for k in layers:
            if not 1 <= k <= enc_cfg.num_layers:
                raise ValueError(f"evals.{name}.layers: {k} is not in 1..{enc_cfg.num_layers}")
        for d in dims:
            if not 1 <= d <= enc_cfg.hidden_size:
                raise ValueError(f"evals.{name}.dims: {d} is not in 1..{enc_cfg.hidden_size}")
        # The full depth and width are the full model's cell, always evaluated: not twice.
        spec["layers"] = tuple(k for k in layers if k != enc_cfg.num_layers)
        spec["dims"] = tuple(d for d in dims if d != enc_cfg.hidden_size)
        spec.setdefault("batch_size", config.eval_batch_size)
        evals[name] = spec
    if not evals:
        raise ValueError("config.evals is empty: at least one evaluator selects the exported checkpoint")
    return suite.from_config(evals)


def check_select_metric(select: str, metrics: dict) -> None:
    """The selection key must be one the evaluators report (checked on the first evaluation,
    before any training step of a fresh run)."""
    if select not in metrics:
        import difflib

        close = difflib.get_close_matches(select, list(metrics), n=3)
        raise ValueError(f"select_metric {select!r} is not among the evaluators' metrics"
                         + (f"; did you mean {close}?" if close else "") + f" (they report {sorted(metrics)})")


def packing_from_config(config, objective: Objective) -> pipeline.Packing | None:
    """``data.pack_length`` > 0: pack the texts of each batch (``pipeline.Packing``); rows
    are a multiple of ``data.pack_rows_multiple`` and of the local device count. GradCache
    needs the padded layout, so it turns packing off."""
    length = int(config.data.pack_length)
    if not length:
        return None
    if objective.gradcache_chunk:
        log.info("objective.gradcache_chunk is set: padded batches (GradCache chunks by example, not by packed row)")
        return None
    multiple = math.lcm(int(config.data.pack_rows_multiple), jax.local_device_count())
    return pipeline.Packing(length=length, rows_multiple=multiple, views=2 if objective.loss == "simcse_unsup" else 1)


def _model_batch(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k.startswith(MODEL_FIELDS)}


def train_and_evaluate(config, workdir: str | os.PathLike, *, callbacks: Sequence[Callback] = (),
                       allow_config_change: bool = False) -> dict[str, Any]:
    """Fine-tunes ``config.model`` as configured; resumes from ``workdir`` when it has a checkpoint.

    Returns ``{"before": dev metrics of the start, "after": dev metrics of the exported
    (best) model, "best_step": ..., "steps": ...}``. The exported model is in ``workdir``.
    A workdir whose run finished returns its summary (``"finished_before": True``) without
    training again. A workdir whose ``train_config.json`` differs from ``config`` in something that
    changes the run (loss, optimizer, batch size, model, data, ...) is refused unless
    ``allow_config_change``. Every process of a multi-host run calls this with the same
    arguments.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    changes = run_config.check_rerun(workdir, config, allow_config_change)
    summary_path = workdir / "summary.json"
    if summary_path.is_file() and not changes:
        log.info("%s: this run already finished; nothing to do (a new workdir trains again)", workdir)
        return {**json.loads(summary_path.read_text()), "finished_before": True}
    distributed.barrier("config checked")  # no process writes before every process has read the saved config
    if jax.process_index() == 0:
        (workdir / run_config.CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")

    # ------------------------------------------------------------------ mesh, model, data
    mesh = sharding.mesh_from_config(config.mesh)
    encoder = load_pretrained(config.model, pooling=config.pooling or None, max_length=config.max_length or None,
                              attention=config.attention or None, pooler_init=dict(config.pooler_init) or None,
                              seed=config.seed)
    if config.prompts.query or config.prompts.document:  # the run's instructions: trained, evaluated, exported
        encoder = dataclasses.replace(encoder, prompts={k: v for k, v in config.prompts.items() if v},
                                      include_prompt=bool(config.include_prompt))
    params, frozen, encoder = trainable_params(config, encoder)
    enc_cfg = dataclasses.replace(encoder.cfg, dtype=config.dtype,
                                  hidden_dropout=_or_default(config.hidden_dropout, encoder.cfg.hidden_dropout),
                                  attention_dropout=_or_default(config.attention_dropout,
                                                                encoder.cfg.attention_dropout))
    objective = Objective.from_config(config.objective, encoder.pooling)  # the run's one pooling
    st_problem = export_lib.sentence_transformers_problem(encoder.pooling, encoder.include_prompt,
                                                          encoder.tokenizer.appends_eos)
    if st_problem:  # said now, not after hours of training
        log.warning("the export will be for embedjax only (SentenceTransformer cannot load it as trained): %s",
                    st_problem)
    train_source = sources.train_source(config.data)
    check_objective_data(objective, pipeline.fields_of(train_source), sources.scores_of(train_source))
    train_tokenizer = encoder.tokenizer.replace(buckets=tuple(config.data.buckets))  # keeps an appended EOS
    preprocess = str.lower if encoder.lowercase else None
    packing = packing_from_config(config, objective)
    data_iter = pipeline.train_pipeline(train_source, train_tokenizer, global_batch_size=config.batch_size,
                                        seed=config.seed, preprocess=preprocess, common_length=True,
                                        packing=packing, prompts=side_prompts(config.prompts),
                                        include_prompt=encoder.include_prompt)
    steps_per_epoch = pipeline.steps_per_epoch(len(train_source), config.batch_size, jax.process_count())
    total_steps = int(config.num_steps or round(config.num_epochs * steps_per_epoch))
    if not config.num_steps:  # epochs: whole accumulation groups only (an explicit num_steps must divide)
        total_steps -= total_steps % int(config.optim.accumulate)
    evaluators = evaluators_from_config(config, encoder.cfg)

    def evaluate(trained) -> dict[str, float]:
        # normalize=True: scored as the export (save_pretrained(normalize=True)) will embed
        full = lora.combine(_local(trained), frozen_local)
        metrics = suite.run_all(evaluators, dataclasses.replace(encoder, params=full, normalize=True))
        check_select_metric(config.select_metric, metrics)
        return metrics

    # ------------------------------------------------------------------ optimizer, shardings
    tx, lr_at = optim.make_optimizer(config.optim, total_steps, no_decay=registry.of(enc_cfg).no_decay)
    rules = sharding.rules_for(enc_cfg, config.sharding_rules)
    create = functools.partial(TrainState.create, tx=tx, seed=config.seed)
    abstract = jax.eval_shape(create, params)
    state_shards, frozen_shards = state_shardings(abstract, frozen, mesh, rules)
    param_shards = state_shards.params
    # Placed like the state is created: one jit, whose outputs span every host's devices.
    frozen = jax.jit(lambda tree: tree, out_shardings=frozen_shards)(frozen)
    frozen_local = _local(frozen)  # what the evaluators combine the trained params with

    # ------------------------------------------------------------------ state: resume or create
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
                        best_metric=config.select_metric)
    writer = MetricsWriter(workdir)
    if ckpt.latest_step() is not None:
        state, data_state, start = ckpt.restore(abstract_like(abstract, state_shards))
        data_iter.set_state(data_state)
        log.info("resumed from %s step %d", workdir / "checkpoints", start)
        before = None
    else:
        state = jax.jit(create, out_shardings=state_shards)(params)
        start = 0
        before = evaluate(state.params)
        writer.write(0, before)
        ckpt.save_best(0, state.params, before)  # the start competes for "best" too

    del params  # the state holds them now (donated to every step)
    knobs = dict(batch_size=config.batch_size, gradcache_chunk=objective.gradcache_chunk,
                 mesh_shape=dict(mesh.shape), remat=objective.remat)  # what a refusal names
    step_fn = CompiledSteps(jit_train_step(enc_cfg, objective, tx, state_shards, frozen_shards, mesh),
                            limit=_memory_limit(config), knobs=knobs)

    # ------------------------------------------------------------------ loop
    log_every, eval_every, save_every = config.log_every, config.eval_every, config.checkpoint.every
    pending: list[tuple[int, dict]] = []
    progress = _progress(total_steps, start)
    t_last, examples = time.perf_counter(), 0
    for step in range(start + 1, total_steps + 1):
        host_batch = distributed.global_batch(_model_batch(next(data_iter)), pad_token_id=enc_cfg.pad_token_id)
        batch = sharding.to_global(host_batch, mesh)
        state, metrics = step_fn(state, batch, frozen)
        pending.append((step, metrics))
        examples += config.batch_size
        is_last = step == total_steps
        due = {name: is_last or step % every == 0
               for name, every in (("log", log_every), ("eval", eval_every), ("save", save_every))}
        if any(due.values()):
            # Fetching metrics syncs with the device: done only here, and always before a save,
            # so no checkpoint ever holds a state that produced a non-finite loss.
            fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
            pending.clear()
            for s, m in fetched:
                if not all(math.isfinite(v) for v in m.values()):
                    ckpt.wait()
                    writer.close()
                    raise FloatingPointError(
                        f"non-finite training metrics at step {s}: {m}. Stopped; the last good checkpoint "
                        f"(step {ckpt.latest_step()}) in {workdir / 'checkpoints'} is untouched and a rerun "
                        "resumes from it (lower the learning rate or check the data first).")
            now = time.perf_counter()
            last = fetched[-1][1] | {"lr": float(lr_at(step - 1)), "examples_per_s": examples / (now - t_last)}
            t_last, examples = now, 0
            writer.write(step, last)
            progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                 ex_s=f"{last['examples_per_s']:.0f}", refresh=False)
        busy_since = time.perf_counter()
        if due["eval"]:
            dev = evaluate(state.params)
            writer.write(step, dev)
            ckpt.save_best(step, state.params, dev)
            shown = dict.fromkeys([config.select_metric, *map(suite.headline, evaluators)])  # not every key of every evaluator
            progress.write(f"step {step}: " + ", ".join(f"{k} {dev[k]:.4g}" for k in shown if k in dev))
        if due["save"]:
            ckpt.save(step, state, data_iter.get_state())
        for callback in callbacks:
            if step % callback.every == 0:
                callback.fn(step, state, metrics)
        t_last += time.perf_counter() - busy_since  # evaluation, saving and hooks are not training throughput
        progress.update(1)
    progress.close()
    ckpt.wait()

    # ------------------------------------------------------------------ export the best, evaluate it
    best_params, best_metrics, best_step = ckpt.restore_best(abstract_like(abstract.params, param_shards))
    best_params = lora.combine(distributed.to_host(best_params), distributed.to_host(frozen))
    ckpt.close()
    writer.close()
    if jax.process_index() == 0:
        export_model(config, encoder, best_params, workdir, sentence_transformers=not st_problem)
    distributed.barrier("exported")  # every host evaluates the file process 0 wrote
    after = suite.run_all(evaluators, load_pretrained(workdir))
    summary = {"before": before, "after": after, "best_step": best_step, "steps": total_steps,
               "best_at_selection": best_metrics}
    if jax.process_index() == 0:
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def side_prompts(prompts) -> dict[str, str]:
    """``config.prompts`` ({"query", "document"}) as the pipeline's per-side prompts: the first
    text of a record is the query, its positive and hard negatives are documents."""
    return {"a": prompts.query, "b": prompts.document, "n": prompts.document}


def lora_spec(config) -> lora.LoraSpec | None:
    """``config.lora`` as a ``LoraSpec``; None when ``lora.rank`` is 0 (full fine-tuning)."""
    c = config.lora
    if not c.rank:
        return None
    return lora.LoraSpec(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout), targets=c.targets or "^layers/",
                         rslora=bool(c.rslora))


def split_trainable(params, adapters_only: bool):
    """``(trainable, frozen)`` (``lora.partition``): with LoRA, the adapters and the pooler's own
    params (latent attention) train and the base is frozen; without, everything trains."""
    if not adapters_only:
        return lora.partition(params, jax.tree.map(lambda _: True, params))
    trains = lambda path, _: lora.is_adapter(path) or sharding.param_path(path).startswith("pooler/")  # noqa: E731
    return lora.partition(params, jax.tree_util.tree_map_with_path(trains, params))


def trainable_params(config, encoder):
    """``(trainable, frozen, encoder)``: with LoRA (``lora.rank`` > 0, or ``lora.init_from`` a PEFT
    adapter directory to start from) adapters are attached and the encoder's cfg gets their
    spec; see ``split_trainable`` for what trains."""
    params, cfg = encoder.params, encoder.cfg
    if config.lora.init_from:
        params, cfg = lora.load_peft(config.lora.init_from, params, cfg)
    elif lora_spec(config) is not None:
        params, cfg = lora.attach(params, cfg, lora_spec(config), jax.random.key(config.seed + 1))
    trainable, frozen = split_trainable(params, cfg.lora is not None)
    return trainable, frozen, dataclasses.replace(encoder, params=params, cfg=cfg)


def export_model(config, encoder, params, workdir: Path, *, sentence_transformers: bool) -> None:
    """The best params as a model directory: LoRA adapters merged into the weights (a plain
    Hugging Face / sentence-transformers model), and with ``lora.save_peft`` also a PEFT adapter
    directory ``workdir/adapter`` that ``peft.PeftModel.from_pretrained`` loads over the base model."""
    if encoder.cfg.lora is not None and config.lora.save_peft:
        lora.save_peft(workdir / "adapter", params, encoder.cfg, base_model_name_or_path=str(config.model))
    merged, cfg = lora.merge(params, encoder.cfg) if encoder.cfg.lora is not None else (params, encoder.cfg)
    export_lib.save_pretrained(dataclasses.replace(encoder, cfg=cfg), workdir, params=merged, normalize=True,
                               sentence_transformers=sentence_transformers)


class CompiledSteps:
    """The jitted step compiled ahead of time once per batch shape, its per-device memory logged
    and checked against the device (``embedjax.train.memory``) BEFORE the shape first runs; a
    config that will not fit is refused with what to change."""

    def __init__(self, jitted, *, limit: int | None, knobs: dict):
        self.jitted, self.limit, self.knobs = jitted, limit, knobs
        self.compiled: dict = {}

    def __call__(self, state, batch, frozen):
        shapes = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
        if shapes not in self.compiled:
            compiled = self.jitted.lower(state, batch, frozen).compile()
            try:
                mem = memory.step_memory(compiled)
            except RuntimeError as err:
                log.info("train step for batch %s: %s", dict((k, s) for k, s, _ in shapes), err)
            else:
                log.info("train step for batch %s: %s", dict((k, s) for k, s, _ in shapes), mem.describe())
                memory.check_fits(mem, self.limit, **self.knobs)
            self.compiled[shapes] = compiled
        return self.compiled[shapes](state, batch, frozen)


def _memory_limit(config) -> int | None:
    """Bytes per device the step may use: ``memory_limit_gib`` when set, else the device's own limit."""
    if config.memory_limit_gib:
        return int(config.memory_limit_gib * memory.GiB)
    return memory.device_memory_limit()


def _or_default(value: float, default: float) -> float:
    """Config dropout: a negative value means the checkpoint's own rate."""
    return default if value < 0 else value


def _local(params):
    """Params an evaluator on this host can use: as they are on one process; on several,
    a full host copy (the train state spans every host's devices, evaluation runs locally)."""
    return distributed.to_host(params) if distributed.is_multiprocess() else params


def _progress(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0)
