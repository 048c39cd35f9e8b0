"""One training step as a pure function (jit it with shardings and donate the state)."""

from __future__ import annotations

import jax
import optax

from embedjax import lora
from embedjax.train.objective import Objective, batch_loss
from embedjax.train.optim import ema_update
from embedjax.train.state import TrainState


def train_step(state: TrainState, batch, frozen=None, teacher=None, *, enc_cfg, objective: Objective, tx,
               ema_decay: float = 0.0):
    """Returns ``(new_state, metrics)``; dropout/sampling key = fold_in(state.rng, step).

    ``state.params`` are the params that train; ``frozen`` (``embedjax.lora.partition``) the
    rest of the tree, e.g. the base model under LoRA: no gradient and no optimizer state is
    ever formed for them. None: everything trains. ``teacher``: a teacher encoder's params
    (``objective.distill_loss``). ``ema_decay`` > 0: ``state.ema`` follows the new params
    (``optim.ema_update``).

    Metrics: loss, grad_norm and param_norm (global L2 norms of the trained params; the loop's
    NaN guard reads them).
    """
    key = jax.random.fold_in(state.rng, state.step)

    def loss_of(trainable):
        params = trainable if frozen is None else lora.combine(trainable, frozen)
        return batch_loss(params, enc_cfg, objective, batch, key, teacher=teacher)

    loss, grads = jax.value_and_grad(loss_of)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    ema = state.ema if state.ema is None else ema_update(state.ema, params, ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

