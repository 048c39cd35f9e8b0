"""One training step: the pure ``train_step``, and its compiled form for a run
(``jit_train_step``: shardings, donated state; ``CompiledSteps``: compiled ahead of time per
batch shape, its memory checked before it first runs)."""

from __future__ import annotations

import functools
import logging

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax import lora, sharding
from embedjax.train import flops, memory
from embedjax.train.colbert_objective import ColbertObjective, colbert_batch_loss
from embedjax.train.cross_objective import CrossObjective, cross_batch_loss
from embedjax.train.m3_objective import M3Objective, m3_batch_loss
from embedjax.train.mntp_objective import mntp_batch_loss
from embedjax.train.objective import Objective, batch_loss
from embedjax.train.sparse_objective import SparseObjective, sparse_batch_loss
from embedjax.train.optim import ema_update
from embedjax.train.state import TrainState

log = logging.getLogger(__name__)


def train_step(state: TrainState, batch, frozen=None, teacher=None, *, enc_cfg, objective: Objective, tx,
               ema_decay: float = 0.0):
    """Returns ``(new_state, metrics)``; dropout/sampling key = fold_in(state.rng, step).

    ``state.params`` are the params that train; ``frozen`` (``embedjax.lora.partition``) the
    rest of the tree, e.g. the base model under LoRA: no gradient and no optimizer state is
    ever formed for them. None: everything trains. ``teacher``: a teacher encoder's params
    (``objective.distill_loss``). ``ema_decay`` > 0: ``state.ema`` follows the new params
    (``optim.ema_update``).

    Metrics: loss, grad_norm and param_norm (global L2 norms of the trained params; the loop's
    NaN guard reads them); a SPLADE objective adds its loss's parts (FLOPS terms, active terms), a
    three-head one each head's terms, an MNTP one its accuracy over the masked tokens.
    """
    key = jax.random.fold_in(state.rng, state.step)
    sparse_run = isinstance(objective, SparseObjective)
    mntp_run = isinstance(objective, Objective) and objective.loss == "mntp"
    with_parts = sparse_run or mntp_run or isinstance(objective, M3Objective)  # the loss's terms are logged too
    if sparse_run:  # its regulariser warms up with the step
        loss_fn = functools.partial(sparse_batch_loss, step=state.step)
    elif mntp_run:  # its accuracy over the masked tokens is logged
        loss_fn = functools.partial(mntp_batch_loss, return_metrics=True)
    elif isinstance(objective, M3Objective):
        loss_fn = m3_batch_loss
    elif isinstance(objective, ColbertObjective):
        loss_fn = colbert_batch_loss
    else:
        loss_fn = cross_batch_loss if isinstance(objective, CrossObjective) else batch_loss

    def loss_of(trainable):
        params = trainable if frozen is None else lora.combine(trainable, frozen)
        return loss_fn(params, enc_cfg, objective, batch, key, teacher=teacher)

    if with_parts:
        (loss, parts), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    else:
        (loss, grads), parts = jax.value_and_grad(loss_of)(state.params), {}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        **parts,
    }
    ema = state.ema if state.ema is None else ema_update(state.ema, params, ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics



def jit_train_step(enc_cfg, objective: Objective, tx, state_shards, frozen_shards, mesh, *, teacher_shards=None,
                   ema_decay: float = 0.0):
    """``train_step`` jitted with the run's shardings, the state donated:
    ``step(state, batch, frozen, teacher)`` (``teacher``: a distillation teacher's params, or None).
    Lower it with abstract arguments (``jax.ShapeDtypeStruct``) to learn a configuration's
    per-device memory without allocating it (``embedjax.train.memory``)."""
    if isinstance(objective, Objective):
        objective = objective.on_mesh(mesh)  # a ring loss runs over the mesh's batch axes
    return jax.jit(
        functools.partial(train_step, enc_cfg=enc_cfg, objective=objective, tx=tx, ema_decay=ema_decay),
        in_shardings=(state_shards, sharding.batch_sharding(mesh), frozen_shards, teacher_shards),
        out_shardings=(state_shards, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


class CompiledSteps:
    """The jitted step compiled ahead of time once per batch shape, its per-device memory logged
    and checked against the device (``embedjax.train.memory``) BEFORE the shape first runs; a
    config that will not fit is refused with what to change (``knobs``: the settings a refusal
    names). Each shape's model FLOPs are recorded too (``work``; ``embedjax.train.flops``: XLA's
    cost analysis, else the analytic count of ``model_cfg``'s backbone)."""

    def __init__(self, jitted, *, limit: int | None, knobs: dict, model_cfg=None):
        self.jitted, self.limit, self.knobs, self.model_cfg = jitted, limit, knobs, model_cfg
        self.compiled: dict = {}
        self.works: dict = {}  # shape -> flops.StepWork

    def work(self, batch) -> flops.StepWork:
        """What one step on ``batch``'s shapes computes (FLOPs over all devices, token slots);
        known once a step of that shape has run."""
        return self.works[_shape_key(batch)[0]]

    def __call__(self, state, batch, frozen, teacher=None):
        shapes, leaves = _shape_key(batch)
        if shapes not in self.compiled:
            compiled = self.jitted.lower(state, batch, frozen, teacher).compile()
            described = {jax.tree_util.keystr(path): tuple(x.shape) for path, x in leaves}
            try:
                mem = memory.step_memory(compiled)
            except RuntimeError as err:
                log.info("train step for batch %s: %s", described, err)
            else:
                log.info("train step for batch %s: %s", described, mem.describe())
                memory.check_fits(mem, self.limit, **self.knobs)
            work, note = flops.step_work(compiled, batch, self.model_cfg)
            if note:
                log.info("train step for batch %s: %s", described, note)
            log.info("train step for batch %s: %s", described, work.describe())
            self.compiled[shapes], self.works[shapes] = compiled, work
        return self.compiled[shapes](state, batch, frozen, teacher)


def _shape_key(batch):
    """(a hashable key of the batch's tree structure, shapes and dtypes; its leaves with paths)."""
    leaves, structure = jax.tree_util.tree_flatten_with_path(batch)
    return (structure, tuple((tuple(x.shape), str(x.dtype)) for _, x in leaves)), leaves
