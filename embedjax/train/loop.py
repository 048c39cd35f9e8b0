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
from typing import Any, Callable, Sequence

import jax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax import distributed, lora, paths, sharding
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
MODEL_FIELDS = ("a_", "b_", "n_", "p_", "labels", "teacher")  # batch keys the step reads (not 'valid', 'index')


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
    """``(state shardings, frozen-param shardings)`` by ``rules``: params (trained and frozen) and
    their EMA by their rules, Adam's moments like their param, step and key replicated."""
    param_shards = sharding.param_shardings(abstract_state.params, mesh, rules)
    replicated = NamedSharding(mesh, P())
    state = TrainState(step=replicated, params=param_shards, rng=replicated,
                       opt_state=opt_state_shardings(abstract_state.opt_state, param_shards, mesh),
                       ema=None if abstract_state.ema is None else param_shards)  # the average lives like its params
    return state, sharding.param_shardings(frozen, mesh, rules)


def jit_train_step(enc_cfg, objective: Objective, tx, state_shards, frozen_shards, mesh, *, teacher_shards=None,
                   ema_decay: float = 0.0):
    """``train_step`` jitted with the run's shardings, the state donated:
    ``step(state, batch, frozen, teacher)`` (``teacher``: a distillation teacher's params, or None).
    Lower it with abstract arguments (``jax.ShapeDtypeStruct``) to learn a configuration's
    per-device memory without allocating it (``embedjax.train.memory``)."""
    return jax.jit(
        functools.partial(train_step, enc_cfg=enc_cfg, objective=objective, tx=tx, ema_decay=ema_decay),
        in_shardings=(state_shards, sharding.batch_sharding(mesh), frozen_shards, teacher_shards),
        out_shardings=(state_shards, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


class MetricsWriter:
    """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard (process 0).
    Object stores (a ``gs://`` workdir) have no append: there the file is rewritten whole."""

    def __init__(self, workdir: epath.Path):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.remote = paths.is_remote(workdir)
        self.text: str | None = None  # remote: the file's text (a resumed run's earlier lines first)
        self.tb = None
        if self.enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError as err:  # tensorboardX, or its gs:// writer's google-cloud-storage
                log.warning("no TensorBoard (%s): metrics go to metrics.jsonl only", err)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            if self.text is None:
                self.text = self.path.read_text() if self.path.exists() else ""
            self.text += line
            self.path.write_text(self.text)
        else:
            with self.path.open("a") as f:
                f.write(line)
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
        import difflib

        close = difflib.get_close_matches(select, list(metrics), n=3)
        raise ValueError(f"select_metric {select!r} is not among the evaluators' metrics"
                         + (f"; did you mean {close}?" if close else "") + f" (they report {sorted(metrics)})")


def packing_from_config(config, objective: Objective, data=None) -> pipeline.Packing | None:
    """``data.pack_length`` > 0: pack the texts of each batch (``pipeline.Packing``); rows
    are a multiple of ``data.pack_rows_multiple`` and of the local device count. GradCache
    needs the padded layout, so it turns packing off. ``data``: a source's data section
    (a mixture entry over ``config.data``); default ``config.data``."""
    data = config.data if data is None else data
    length = int(data["pack_length"])
    if not length:
        return None
    if objective.gradcache_chunk:
        log.info("objective.gradcache_chunk is set: padded batches (GradCache chunks by example, not by packed row)")
        return None
    multiple = math.lcm(int(data["pack_rows_multiple"]), jax.local_device_count())
    return pipeline.Packing(length=length, rows_multiple=multiple, views=2 if objective.loss == "simcse_unsup" else 1)


# ---------------------------------------------------------------------------- training sources (tasks)

MIXTURE_KEYS = ("mixture", "mixture_mode")  # config.data keys that describe the mixture itself


@dataclasses.dataclass
class Task:
    """One training source: its records, its loss and its batches. A run has one (``config.data``)
    or, with ``data.mixture``, one per named source; every step trains on one task's batch."""

    name: str
    data: dict           # the source's data section (config.data with the entry's overrides)
    objective: Objective
    source: Any          # the records (random access)
    iterator: Any        # pipeline.DataIterator of host batches (repeats)
    weight: float = 1.0


def task_specs(config) -> dict[str, tuple[dict, dict, float]]:
    """``name -> (data section, objective section, weight)``: ``{"train": config.data}`` alone, or
    each ``data.mixture`` entry over ``config.data`` / ``config.objective`` (an entry overrides data
    keys at its top level and objective keys under ``"objective"``; unknown keys are refused)."""
    base_data = {k: v for k, v in config.data.items() if k not in MIXTURE_KEYS}
    base_objective = config.objective.to_dict()
    mixture = dict(config.data.mixture or {})
    if not mixture:
        return {"train": (base_data, base_objective, 1.0)}
    if config.data.mixture_mode not in ("sampled", "round_robin"):
        raise ValueError(f"data.mixture_mode must be 'sampled' or 'round_robin', got {config.data.mixture_mode!r}")
    specs = {}
    for name, entry in mixture.items():
        entry = dict(entry)
        weight = float(entry.pop("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.mixture.{name}.weight must be > 0, got {weight}")
        objective = dict(entry.pop("objective", {}) or {})
        unknown = sorted(set(entry) - set(base_data))
        if unknown:
            raise ValueError(f"data.mixture.{name}: unknown keys {unknown}; an entry takes 'weight', 'objective' "
                             f"and data keys {sorted(base_data)}")
        bad = sorted(set(objective) - set(base_objective))
        if bad:
            raise ValueError(f"data.mixture.{name}.objective: unknown keys {bad}; objective keys are "
                             f"{sorted(base_objective)}")
        merged_objective = {**base_objective, **objective}
        if "distill" in objective:  # a partial distill section keeps the other defaults
            merged_objective["distill"] = {**base_objective["distill"], **dict(objective["distill"])}
        specs[name] = ({**base_data, **entry}, merged_objective, weight)
    return specs


INITIAL_TEACHER = "initial"  # objective.distill.teacher: the run's own starting model, frozen


def load_model(config):
    """The run's starting encoder: ``config.model`` with the run's pooling, length, attention and
    pooler initialisation (seeded by ``config.seed``)."""
    return load_pretrained(config.model, pooling=config.pooling or None, max_length=config.max_length or None,
                           attention=config.attention or None, pooler_init=dict(config.pooler_init) or None,
                           seed=config.seed)


def load_teacher(config, encoder):
    """The distillation teacher (``objective.distill.teacher``, of any source), or None. It reads
    the student's token ids, so it must tokenize exactly like the student.

    ``"initial"`` is the student's own starting model (``load_model(config)``), frozen: distilling
    towards it anchors the fine-tune to what the pretrained model knew (Learning without
    Forgetting, arXiv:1606.09282), which lets a higher learning rate help instead of overfit.
    """
    names = {spec[1]["distill"]["teacher"] for spec in task_specs(config).values()
             if spec[1]["distill"]["teacher"] and float(spec[1]["distill"]["weight"]) > 0}
    if not names:
        return None
    if len(names) > 1:
        raise ValueError(f"one distillation teacher per run; the sources name {sorted(names)}")
    (name,) = names
    if name == INITIAL_TEACHER:
        return load_model(config)
    teacher = load_pretrained(name, max_length=encoder.max_length)
    probe = ["A man is playing a guitar on stage.", "Zwei Hunde spielen im Schnee; 42 km/h!", "tokenizer check"]
    same = [e.ids for e in teacher.tokenizer.encode(probe)] == [e.ids for e in encoder.tokenizer.encode(probe)]
    if not same or teacher.lowercase != encoder.lowercase:
        raise ValueError(f"objective.distill.teacher={name!r} tokenizes differently from the student "
                         f"{config.model!r}: the teacher reads the student's token ids, so both need one tokenizer")
    return teacher


def build_tasks(config, encoder, teacher=None) -> dict[str, Task]:
    """Every training source as a ``Task``: records read and checked against its objective, and
    its batch iterator (seeded by ``config.seed`` and the source's position)."""
    if not config.data.mixture:
        return {"train": make_task(config, encoder, teacher, "train", config.data, config.objective)}
    return {name: make_task(config, encoder, teacher, name, data, objective, weight=weight, index=i)
            for i, (name, (data, objective, weight)) in enumerate(task_specs(config).items())}


def make_task(config, encoder, teacher, name: str, data, objective_cfg, *, weight: float = 1.0, index: int = 0) -> Task:
    """One ``Task`` from its data and objective sections (a mixture entry's, or the config's own)."""
    objective = Objective.from_config(objective_cfg, encoder.pooling, teacher=teacher)  # the run's one pooling
    try:
        source = sources.train_source(data)
        check_objective_data(objective, pipeline.fields_of(source), sources.scores_of(source))
    except ValueError as err:
        if not config.data.mixture:
            raise
        raise ValueError(f"data.mixture.{name}: {err}") from None
    tokenizer = encoder.tokenizer.replace(buckets=tuple(data["buckets"]))  # keeps an appended EOS
    iterator = pipeline.train_pipeline(source, tokenizer, global_batch_size=config.batch_size, seed=config.seed + index,
                                       preprocess=str.lower if encoder.lowercase else None, common_length=True,
                                       packing=packing_from_config(config, objective, data),
                                       prompts=side_prompts(config.prompts), include_prompt=encoder.include_prompt)
    return Task(name, dict(data), objective, source, iterator, weight)


def tasks_iterator(config, tasks: dict[str, Task]):
    """The run's data iterator: the one task's ``DataIterator``, or a ``MixtureIterator`` choosing
    one source per step (``embedjax.data.mixture``). Both checkpoint their position."""
    if len(tasks) == 1 and not config.data.mixture:
        return next(iter(tasks.values())).iterator
    from embedjax.data.mixture import MixtureIterator

    return MixtureIterator({n: t.iterator for n, t in tasks.items()}, {n: t.weight for n, t in tasks.items()},
                           mode=config.data.mixture_mode, seed=config.seed)


def next_task_batch(data_iter, tasks: dict[str, Task]) -> tuple[str, dict]:
    """``(task name, host batch)`` of the next step."""
    if isinstance(data_iter, pipeline.DataIterator):
        return next(iter(tasks)), next(data_iter)
    return next(data_iter)


def total_train_steps(config, tasks: dict[str, Task]) -> int:
    """``num_steps``, else ``num_epochs`` epochs; a mixture's epoch is as many steps as one pass
    over every source. Whole accumulation groups only with epochs (an explicit num_steps must divide)."""
    if config.num_steps:
        return int(config.num_steps)
    per_epoch = sum(pipeline.steps_per_epoch(len(t.source), config.batch_size, jax.process_count())
                    for t in tasks.values())
    total = int(round(config.num_epochs * per_epoch))
    return total - total % int(config.optim.accumulate)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which params compete for export at an evaluation: the raw params, or with an EMA
    (``optim.ema``) the EMA or whichever of the two scores higher (``optim.ema_select``).
    The EMA's metrics are logged as ``ema/<key>``; ``selected_ema`` says which one competed."""

    metric: str
    mode: str = "best"
    ema: bool = False

    def __post_init__(self):
        if self.mode not in ("best", "ema", "raw"):
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
    arguments. ``workdir`` may be remote (``gs://bucket/run``, through ``etils.epath``), as a
    multi-host run's must be: every host reads and writes it.
    """
    workdir = epath.Path(workdir)
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
    encoder = load_model(config)
    if config.prompts.query or config.prompts.document:  # the run's instructions: trained, evaluated, exported
        encoder = dataclasses.replace(encoder, prompts={k: v for k, v in config.prompts.items() if v},
                                      include_prompt=bool(config.include_prompt))
    params, frozen, encoder = trainable_params(config, encoder)
    enc_cfg = dataclasses.replace(encoder.cfg, dtype=config.dtype,
                                  hidden_dropout=_or_default(config.hidden_dropout, encoder.cfg.hidden_dropout),
                                  attention_dropout=_or_default(config.attention_dropout,
                                                                encoder.cfg.attention_dropout))
    teacher = load_teacher(config, encoder)
    st_problem = export_lib.sentence_transformers_problem(encoder.pooling, encoder.include_prompt,
                                                          encoder.tokenizer.appends_eos)
    if st_problem:  # said now, not after hours of training
        log.warning("the export will be for embedjax only (SentenceTransformer cannot load it as trained): %s",
                    st_problem)
    tasks = build_tasks(config, encoder, teacher)
    data_iter = tasks_iterator(config, tasks)
    total_steps = total_train_steps(config, tasks)
    evaluators = evaluators_from_config(config, encoder.cfg)

    def evaluate(trained) -> dict[str, float]:
        # normalize=True: scored as the export (save_pretrained(normalize=True)) will embed
        full = lora.combine(_local(trained), frozen_local)
        metrics = suite.run_all(evaluators, dataclasses.replace(encoder, params=full, normalize=True))
        metrics = add_select_metric(config.select_metric, metrics)
        check_select_metric(config.select_metric, metrics)
        return metrics

    # ------------------------------------------------------------------ optimizer, shardings
    tx, lr_at = optim.make_optimizer(config.optim, total_steps, no_decay=registry.of(enc_cfg).no_decay)
    ema_decay = float(config.optim.ema)
    rules = sharding.rules_for(enc_cfg, config.sharding_rules)
    create = functools.partial(TrainState.create, tx=tx, seed=config.seed, ema=ema_decay > 0)
    abstract = jax.eval_shape(create, params)
    state_shards, frozen_shards = state_shardings(abstract, frozen, mesh, rules)
    param_shards = state_shards.params
    # Placed like the state is created: one jit, whose outputs span every host's devices.
    frozen = jax.jit(lambda tree: tree, out_shardings=frozen_shards)(frozen)
    frozen_local = _local(frozen)  # what the evaluators combine the trained params with
    teacher_params, teacher_shards = None, None
    if teacher is not None:
        teacher_shards = sharding.param_shardings(teacher.params, mesh, sharding.rules_for(teacher.cfg,
                                                                                          config.sharding_rules))
        teacher_params = jax.jit(lambda tree: tree, out_shardings=teacher_shards)(teacher.params)
    select = Selection(config.select_metric, str(config.optim.ema_select), ema=ema_decay > 0)

    def evaluate_state(state) -> tuple[dict[str, float], Any, dict[str, float]]:
        """(metrics to log, the params that compete for export, their metrics for the ranking)."""
        raw = evaluate(state.params)
        ema = None if state.ema is None else evaluate(state.ema)
        return select.choose(raw, ema, state.params, state.ema)

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
        before = evaluate(state.params)  # the EMA starts equal to the params: one evaluation
        writer.write(0, before)
        ckpt.save_best(0, state.params, select.at_start(before))  # the start competes for "best" too

    del params  # the state holds them now (donated to every step)
    step_fns = {}
    for name, task in tasks.items():
        knobs = dict(batch_size=config.batch_size, gradcache_chunk=task.objective.gradcache_chunk,
                     mesh_shape=dict(mesh.shape), remat=task.objective.remat)  # what a refusal names
        jitted = jit_train_step(enc_cfg, task.objective, tx, state_shards, frozen_shards, mesh,
                                teacher_shards=teacher_shards, ema_decay=ema_decay)
        step_fns[name] = CompiledSteps(jitted, limit=_memory_limit(config), knobs=knobs)

    # ------------------------------------------------------------------ loop
    log_every, eval_every, save_every = config.log_every, config.eval_every, config.checkpoint.every
    pending: list[tuple[int, dict]] = []
    progress = _progress(total_steps, start)
    t_last, examples = time.perf_counter(), 0
    for step in range(start + 1, total_steps + 1):
        task_name, host_batch = next_task_batch(data_iter, tasks)
        host_batch = distributed.global_batch(_model_batch(host_batch), pad_token_id=enc_cfg.pad_token_id)
        batch = sharding.to_global(host_batch, mesh)
        state, metrics = step_fns[task_name](state, batch, frozen, teacher_params)
        pending.append((step, metrics if len(tasks) == 1 else {**metrics, f"loss/{task_name}": metrics["loss"]}))
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
            per_task = {k: v for _, m in fetched for k, v in m.items() if k.startswith("loss/")}  # each source's latest
            last = fetched[-1][1] | per_task | {"lr": float(lr_at(step - 1)), "examples_per_s": examples / (now - t_last)}
            t_last, examples = now, 0
            writer.write(step, last)
            progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                 ex_s=f"{last['examples_per_s']:.0f}", refresh=False)
        busy_since = time.perf_counter()
        if due["eval"]:
            dev, candidate, ranked = evaluate_state(state)
            writer.write(step, dev)
            ckpt.save_best(step, candidate, ranked)
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
    with paths.local_copy(workdir) as exported:  # a gs:// workdir's export, downloaded
        after = add_select_metric(config.select_metric, suite.run_all(evaluators, load_pretrained(exported)))
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


def export_model(config, encoder, params, workdir: epath.Path, *, sentence_transformers: bool) -> None:
    """The best params as a model directory: LoRA adapters merged into the weights (a plain
    Hugging Face / sentence-transformers model), and with ``lora.save_peft`` also a PEFT adapter
    directory ``workdir/adapter`` that ``peft.PeftModel.from_pretrained`` loads over the base model."""
    if encoder.cfg.lora is not None and config.lora.save_peft:
        with paths.staged(workdir / "adapter") as adapter:  # gs://: written locally, then copied
            lora.save_peft(adapter, params, encoder.cfg, base_model_name_or_path=str(config.model))
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

    def __call__(self, state, batch, frozen, teacher=None):
        shapes = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
        if shapes not in self.compiled:
            compiled = self.jitted.lower(state, batch, frozen, teacher).compile()
            try:
                mem = memory.step_memory(compiled)
            except RuntimeError as err:
                log.info("train step for batch %s: %s", dict((k, s) for k, s, _ in shapes), err)
            else:
                log.info("train step for batch %s: %s", dict((k, s) for k, s, _ in shapes), mem.describe())
                memory.check_fits(mem, self.limit, **self.knobs)
            self.compiled[shapes] = compiled
        return self.compiled[shapes](state, batch, frozen, teacher)


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
