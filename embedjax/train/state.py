"""The train state: a pytree of step, params, optimizer state and PRNG key, and how it is sharded."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position (saved beside it)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key: plain arrays checkpoint everywhere
    ema: Any = None  # exponential moving average of params (optim.ema > 0), else None

    @classmethod
    def create(cls, params, tx, seed: int, ema: bool = False) -> "TrainState":
        """The state at step 0; with ``ema`` the average starts at the initial params."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed),
            ema=jax.tree.map(jnp.copy, params) if ema else None,
        )


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
