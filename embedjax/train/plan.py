"""Plan a run before paying for it: the per-device memory of a config's train step, from the
model's ``config.json`` alone (no weights downloaded, nothing allocated).

    from embedjax.train import plan
    mem = plan.step_memory(config, hf_config=json.load(open("config.json")))
    print(mem.describe())

Everything is abstract (``jax.ShapeDtypeStruct``) and goes through the loop's own pieces
(``loop.state_shardings``, ``loop.jit_train_step``, ``lora.attach``, ``Objective``, the
optimizer), so the compiled program is the one the run would execute on its first batch of
the longest length. ``benchmarks/llm_memory.py`` uses it for a Mistral-7B-shaped LoRA step
on 8 simulated devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from embedjax import hf, lora, pooling as pooling_lib, sharding
from embedjax.encoders import registry
from embedjax.train import loop, memory, optim
from embedjax.train.objective import Objective
from embedjax.train.state import TrainState


def _abstract_params(cfg, config) -> dict:
    params = jax.eval_shape(functools.partial(registry.of(cfg).init, cfg), jax.random.key(0))
    if config.pooling in pooling_lib.PARAMETRIC:
        pooler = jax.eval_shape(lambda k: pooling_lib.init_latent_attention(k, cfg.hidden_size,
                                                                            **dict(config.pooler_init)),
                                jax.random.key(0))
        params = {**params, "pooler": pooler}
    return params


def abstract_batch(config, length: int, *, negatives: bool) -> dict:
    """The padded batch the pipeline yields (global shapes): ids, masks, types, hashes per side,
    pooling masks when instruction tokens are excluded."""
    b = int(config.batch_size)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    batch = {}
    for side in ("a", "b") + (("n",) if negatives else ()):
        batch.update({f"{side}_ids": ints(b, length), f"{side}_mask": ints(b, length), f"{side}_types": ints(b, length),
                      f"{side}_hash": ints(b)})
    if (config.prompts.query or config.prompts.document) and not config.include_prompt:
        batch["a_pool"] = ints(b, length)
    return batch


def step_memory(config, hf_config: Mapping[str, Any] | None = None, *, mesh=None, length: int | None = None,
                negatives: bool | None = None, total_steps: int = 1000) -> memory.StepMemory:
    """Per-device memory of ``config``'s train step (``memory.StepMemory``).

    Args:
      config: a training config (configs/base.py keys: model, dtype, attention, pooling, lora,
        objective, optim, batch_size, mesh, sharding_rules, prompts, include_prompt).
      hf_config: the model's ``config.json`` as a dict; default: read from ``config.model``.
      mesh: default ``sharding.mesh_from_config(config.mesh)`` over this process's devices
        (simulate a pod on CPU with ``--xla_force_host_platform_device_count``).
      length: tokens per text; default ``config.max_length`` (the longest batch the run can see).
      negatives: whether records carry a hard negative; default: the data kind's (triplets).
    """
    if hf_config is None:
        hf_config = hf.read_json(hf.resolve(config.model) / "config.json")
    cfg = registry.config_from_hf(hf_config, dtype=config.dtype)
    if config.attention:
        cfg = dataclasses.replace(cfg, attention=config.attention)
    params = _abstract_params(cfg, config)
    spec = loop.lora_spec(config)
    if spec is not None:
        params = jax.eval_shape(lambda p: lora.attach(p, cfg, spec, jax.random.key(0))[0], params)
        cfg = dataclasses.replace(cfg, lora=spec)
    trainable, frozen = loop.split_trainable(params, spec is not None)
    objective = Objective.from_config(config.objective, config.pooling or "mean")
    tx, _ = optim.make_optimizer(config.optim, total_steps - total_steps % int(config.optim.accumulate),
                                 no_decay=registry.of(cfg).no_decay)
    mesh = mesh or sharding.mesh_from_config(config.mesh)
    rules = sharding.rules_for(cfg, config.sharding_rules)
    abstract_state = jax.eval_shape(functools.partial(TrainState.create, tx=tx, seed=0), trainable)
    state_shards, frozen_shards = loop.state_shardings(abstract_state, frozen, mesh, rules)
    place = lambda tree, shards: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shards)
    if negatives is None:
        negatives = config.data.kind in ("triplets", "sick_triplets")
    batch = abstract_batch(config, int(length or config.max_length), negatives=negatives)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)),
                         batch)
    step = loop.jit_train_step(cfg, objective, tx, state_shards, frozen_shards, mesh)
    compiled = step.lower(place(abstract_state, state_shards), batch, place(frozen, frozen_shards), None).compile()
    return memory.step_memory(compiled)
