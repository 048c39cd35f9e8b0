"""The training loop: ``train_and_evaluate(config, workdir)``, the story of one run.

config parsed (every check before anything loads) -> the workdir's lock and rerun check ->
mesh -> encoder, teacher, trainable / frozen params -> training sources -> evaluators ->
optimizer -> shardings (eval_shape) -> state created sharded, or resumed with the data
position -> one compiled step per source -> loop: host batch -> global batch (shapes agreed
across hosts) -> step -> periodic callbacks (log + NaN guard, evaluation + best-k, checkpoint,
the caller's) -> export the best params once (process 0), barrier -> final evaluation on
every host (of the exported files; with ``eval_export`` off, the best step's figures).

Each builder lives next to what it builds (``embedjax.train``: ``config`` sections,
``encoders``, ``tasks``, ``state``, ``step``, ``selection``, ``metrics``, ``callbacks``,
``workdir``; ``embedjax.checkpoint``, ``embedjax.eval.suite``, ``embedjax.export``); this module
only tells the story. The same code runs on one CPU and on a multi-host pod:
``jax.distributed`` is initialised by the caller (``scripts/train.py``,
``embedjax.distributed.initialize``) before this runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Sequence

import jax
from etils import epath

from embedjax import colbert_model, cross_model, distributed, export, lora, m3_model, paths, sharding, sparse_model
from embedjax.checkpoint import Checkpointer, abstract_like
from embedjax.encoders import registry
from embedjax.eval import suite
from embedjax.model import load_pretrained
from embedjax.train import encoders, flops, memory, optim, tasks, workdir as workdirs
from embedjax.train.callbacks import Callback, due
from embedjax.train.config import TrainConfig
from embedjax.train.metrics import MetricsWriter, TrainLog, progress_bar
from embedjax.train.selection import Selection, add_select_metric, check_select_metric
from embedjax.train.state import TrainState, state_shardings
from embedjax.train.step import CompiledSteps, jit_train_step

log = logging.getLogger(__name__)


def train_and_evaluate(config, workdir: str | os.PathLike, *, callbacks: Sequence[Callback] = (),
                       allow_config_change: bool = False) -> dict[str, Any]:
    """Fine-tunes ``config.model`` as configured; resumes from ``workdir`` when it has a checkpoint.

    Returns ``{"before": dev metrics of the start (None when resumed or ``eval_start`` is off),
    "after": dev metrics of the exported (best) model, "best_step": ..., "steps": ...}``. The
    exported model is in ``workdir``.
    A workdir whose run finished returns its summary (``"finished_before": True``) without
    training again. A workdir whose run's saved config (its newest checkpoint's, else
    ``train_config.json``) differs from ``config`` in something that changes the run (loss,
    optimizer, batch size, model, data, ...) is refused unless ``allow_config_change``, and a
    workdir another trainer holds is refused (``workdir.WorkdirLocked``). Every process of a
    multi-host run calls this with the same arguments. ``workdir`` may be remote
    (``gs://bucket/run``, through ``etils.epath``), as a multi-host run's must be: every host
    reads and writes it.
    """
    run = TrainConfig.from_config(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdirs.one_trainer(workdir):
        changes = workdirs.check_rerun(workdir, run.raw, allow_config_change)
        summary_path = workdir / "summary.json"
        if summary_path.is_file() and not changes:
            log.info("%s: this run already finished; nothing to do (a new workdir trains again)", workdir)
            return {**json.loads(summary_path.read_text()), "finished_before": True}
        distributed.barrier("config checked")  # no process writes before every process has read the saved config
        if jax.process_index() == 0:
            (workdir / workdirs.CONFIG_FILE).write_text(json.dumps(run.raw, indent=2, default=str) + "\n")
        return _train(run, workdir, callbacks)


def _train(run: TrainConfig, workdir: epath.Path, callbacks: Sequence[Callback]) -> dict[str, Any]:
    # ------------------------------------------------------------------ mesh, encoders, data, evaluators
    mesh = sharding.mesh_from_config(run.mesh)
    cross = run.model.cross_encoder  # a cross-encoder (embedjax.cross_model) where the story says encoder
    sparse = run.model.sparse  # a SPLADE encoder (embedjax.sparse_model) where the story says encoder
    late = run.model.late  # a ColBERT encoder (embedjax.colbert_model) where the story says encoder
    multi = run.model.multi_head  # a three-head M3Encoder (embedjax.m3_model) where the story says encoder
    load = (encoders.load_cross_model if cross else encoders.load_sparse_model if sparse
            else encoders.load_colbert_model if late else encoders.load_m3_model if multi else encoders.load_model)
    own_files = cross or sparse or late or multi  # exported in the model kind's own layout
    encoder = load(run.model, seed=run.seed)
    # a TSDAE decoder's own weights, an MNTP run's untied LM head: trained (or frozen) and checkpointed with the rest
    encoder = encoders.add_objective_params(encoder, run.sources, seed=run.seed)
    params, frozen, encoder = encoders.trainable_params(run.lora, encoder, seed=run.seed)
    enc_cfg = encoders.training_cfg(encoder, run.model)
    teacher = encoders.load_teacher(run.teacher, encoder, run.model, seed=run.seed)
    st_problem = None if own_files else export.encoder_problem(encoder)
    if st_problem:  # said now, not after hours of training
        log.warning("the export will be for embedjax only (SentenceTransformer cannot load it as trained): %s",
                    st_problem)
    training_sources = tasks.build_sources(run.sources, encoder, teacher=teacher, batch_size=run.batch_size,
                                           seed=run.seed, prompts=run.model.prompts,
                                           mixture=run.mixture_mode is not None, splade=run.model.splade)
    if not (cross or late or multi) and (encoder.prompts or any(s.data.prompts or s.data.task for s in run.sources.values())):
        # evaluated and exported with what it was trained with, each source's prompts by name
        encoder = dataclasses.replace(encoder, prompts=tasks.exported_prompts(run.model.prompts, run.sources))
    batches = tasks.SourceStream(training_sources, mixture_mode=run.mixture_mode, seed=run.seed)
    total_steps = tasks.total_train_steps(run.num_steps, run.num_epochs, training_sources, batch_size=run.batch_size,
                                          accumulate=run.optim.accumulate)
    if sparse:  # the FLOPS regulariser warms up over a fraction of the run's steps
        for source in training_sources.values():
            source.objective = source.objective.for_run(total_steps)
    evaluators = suite.for_training(run.evals, batch_size=run.eval_batch_size, enc_cfg=encoder.cfg, cross_encoder=cross,
                                    sparse=sparse, late=late, multi_head=multi)
    select = Selection(run.select_metric, run.optim.ema_select, ema=run.optim.ema > 0)

    # ------------------------------------------------------------------ optimizer, shardings, placement
    tx, lr_at = optim.make_optimizer(run.optim, total_steps, no_decay=registry.of(enc_cfg).no_decay)
    rules = sharding.rules_for(enc_cfg, run.sharding_rules)
    create = functools.partial(TrainState.create, tx=tx, seed=run.seed, ema=run.optim.ema > 0)
    abstract = jax.eval_shape(create, params)
    state_shards, frozen_shards = state_shardings(abstract, frozen, mesh, rules)
    # Placed like the state is created: one jit, whose outputs span every host's devices.
    frozen = jax.jit(lambda tree: tree, out_shardings=frozen_shards)(frozen)
    frozen_local = _local(frozen)  # what the evaluators combine the trained params with
    teacher_params, teacher_shards = None, None
    if teacher is not None:
        teacher_shards = sharding.param_shardings(teacher.params, mesh, sharding.rules_for(teacher.cfg,
                                                                                          run.sharding_rules))
        teacher_params = jax.jit(lambda tree: tree, out_shardings=teacher_shards)(teacher.params)

    def evaluate(trained) -> dict[str, float]:
        # normalize=True: scored as the export (save_pretrained(normalize=True)) will embed
        full = encoders.objective_params_dropped(lora.combine(_local(trained), frozen_local))
        scored = (dataclasses.replace(encoder, params=full) if own_files
                  else dataclasses.replace(encoder, params=full, normalize=True))
        metrics = suite.run_all(evaluators, scored)
        metrics = add_select_metric(run.select_metric, metrics)
        check_select_metric(run.select_metric, metrics)
        return metrics

    # ------------------------------------------------------------------ state: resume or create
    ckpt = Checkpointer(workdir, keep=run.checkpoint.keep, keep_best=run.checkpoint.keep_best,
                        best_metric=run.select_metric, async_save=run.checkpoint.asynchronous, config=run.raw)
    writer = MetricsWriter(workdir)
    try:
        if ckpt.latest_step() is not None:
            state, data_state, start = ckpt.restore(abstract_like(abstract, state_shards))
            batches.set_state(data_state)
            log.info("resumed from %s step %d", workdir / "checkpoints", start)
            before = None
        else:
            state = jax.jit(create, out_shardings=state_shards)(params)
            start = 0
            before = None
            if run.eval_start:
                before = evaluate(state.params)  # the EMA starts equal to the params: one evaluation
                writer.write(0, before)
                ckpt.save_best(0, state.params, select.at_start(before))  # the start competes for "best" too
        del params  # the state holds them now (donated to every step)
        steps = {name: CompiledSteps(jit_train_step(enc_cfg, source.objective, tx, state_shards, frozen_shards, mesh,
                                                    teacher_shards=teacher_shards, ema_decay=run.optim.ema),
                                     limit=_memory_limit(run.memory_limit_gib),
                                     knobs=dict(batch_size=run.batch_size, gradcache_chunk=source.objective.gradcache_chunk,
                                                mesh_shape=dict(mesh.shape), remat=source.objective.remat,
                                                negatives_exchange=getattr(source.objective, "exchange_choice", "")),
                                     model_cfg=enc_cfg)  # each batch shape's model FLOPs: tokens/s and MFU
                 for name, source in training_sources.items()}
        peak, peak_source = flops.run_peak(enc_cfg.dtype, mesh.size)  # MFU's denominator; a CPU's is measured once
        log.info("peak for MFU: %s (%s)", "unknown" if peak is None else f"{peak / 1e12:.3g} TFLOP/s", peak_source)

        # ------------------------------------------------------------------ periodic work
        def diverged(step: int, _) -> str:
            ckpt.wait()
            fix = "lower the learning rate or check the data first"
            if ckpt.latest_step() is None:
                return f"Stopped before any checkpoint was saved; a rerun starts afresh ({fix})."
            return (f"Stopped; the last good checkpoint (step {ckpt.latest_step()}) in {workdir / 'checkpoints'} is "
                    f"untouched and a rerun resumes from it ({fix}).")

        with progress_bar(total_steps, start) as bar:  # log records are written above it
            train_log = TrainLog(writer, bar, lr_at=lr_at, batch_size=run.batch_size, on_divergence=diverged,
                                 peak_flops=peak)

            def evaluate_and_offer(step: int, state, _) -> None:
                raw = evaluate(state.params)
                ema = None if state.ema is None else evaluate(state.ema)
                logged, candidate, ranked = select.choose(raw, ema, state.params, state.ema)
                writer.write(step, logged)
                ckpt.save_best(step, candidate, ranked)
                shown = dict.fromkeys([run.select_metric, *map(suite.headline, evaluators)])  # not every key of every evaluator
                bar.write(f"step {step}: " + ", ".join(f"{k} {logged[k]:.4g}" for k in shown if k in logged))

            periodic = [Callback(run.log_every, train_log.flush, at_end=True),
                        Callback(run.eval_every, evaluate_and_offer, at_end=True),
                        Callback(run.checkpoint.every, lambda step, state, _: ckpt.save(step, state, batches.get_state()),
                                 at_end=True)]

            # ------------------------------------------------------------------ loop
            for step in range(start + 1, total_steps + 1):
                source, host_batch = next(batches)
                batch = distributed.global_batch(host_batch.model_inputs(), pad_token_id=enc_cfg.pad_token_id)
                batch = sharding.to_global(batch, mesh)
                state, metrics = steps[source](state, batch, frozen, teacher_params)
                train_log.record(step, metrics, source if len(training_sources) > 1 else None,
                                 work=steps[source].work(batch))  # its FLOPs and tokens: MFU, tokens/s
                work = due(periodic, step, total_steps)
                if work:  # metrics are fetched (a device sync) only here, and always before a save: the NaN guard
                    train_log.flush(step)
                started = time.perf_counter()
                for callback in work + due(callbacks, step, total_steps):
                    callback.fn(step, state, metrics)
                train_log.exclude(time.perf_counter() - started)  # evaluation, saving and hooks are not throughput
                bar.update(1)
        ckpt.wait()

        # ------------------------------------------------------------------ export the best, evaluate it
        best_params, best_metrics, best_step = ckpt.restore_best(abstract_like(abstract.params, state_shards.params))
        best_params = lora.combine(distributed.to_host(best_params), distributed.to_host(frozen))
        best_params = encoders.objective_params_dropped(best_params)  # a TSDAE decoder, an MNTP LM head: training's
    finally:
        ckpt.close()
        writer.close()
    if jax.process_index() == 0 and cross:
        cross_model.save_trained(encoder, best_params, workdir)
    elif jax.process_index() == 0 and sparse:
        sparse_model.save_trained(encoder, best_params, workdir)
    elif jax.process_index() == 0 and late:
        colbert_model.save_trained(encoder, best_params, workdir)
    elif jax.process_index() == 0 and multi:
        m3_model.save_trained(encoder, best_params, workdir)
    elif jax.process_index() == 0:
        export.save_trained(encoder, best_params, workdir, sentence_transformers=not st_problem,
                            peft_adapter=run.lora.save_peft, base_model=run.model.path)
    distributed.barrier("exported")  # every host evaluates the file process 0 wrote
    if run.eval_export:
        with paths.local_copy(workdir) as exported:  # a gs:// workdir's export, downloaded
            reload = (cross_model.load_cross_encoder if cross else sparse_model.load_sparse_encoder if sparse
                      else colbert_model.load_colbert if late else m3_model.load_m3 if multi else load_pretrained)
            reloaded = reload(exported)
            after = add_select_metric(run.select_metric, suite.run_all(evaluators, reloaded))
    else:  # the exported params, evaluated in memory when they were selected
        after = {k: v for k, v in best_metrics.items() if k != "selected_ema"}
    summary = {"before": before, "after": after, "best_step": best_step, "steps": total_steps,
               "best_at_selection": best_metrics}
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _memory_limit(limit_gib: float | None) -> int | None:
    """Bytes per device the step may use: ``memory_limit_gib`` when set, else the device's own limit."""
    return int(limit_gib * memory.GiB) if limit_gib else memory.device_memory_limit()


def _local(params):
    """Params an evaluator on this host can use: as they are on one process; on several,
    a full host copy (the train state spans every host's devices, evaluation runs locally)."""
    return distributed.to_host(params) if distributed.is_multiprocess() else params
