"""The train state: a pytree of step, params, optimizer state and PRNG key."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


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
