"""One training step as a pure function (jit it with shardings and donate the state)."""

from __future__ import annotations

import jax
import optax

from embedjax.train.objective import Objective, batch_loss
from embedjax.train.state import TrainState


def train_step(state: TrainState, batch, *, enc_cfg, objective: Objective, tx):
    """Returns ``(new_state, metrics)``; dropout/sampling key = fold_in(state.rng, step).

    Metrics: loss, grad_norm and param_norm (global L2 norms; the loop's NaN guard reads them).
    """
    key = jax.random.fold_in(state.rng, state.step)
    loss, grads = jax.value_and_grad(batch_loss)(state.params, enc_cfg, objective, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

