"""Plan a run before paying for it: the per-device memory of a config's train step, from the
model's ``config.json`` alone (no weights downloaded, nothing allocated).

    from embedjax.train import plan
    mem = plan.step_memory(config, hf_config=json.load(open("config.json")))
    print(mem.describe())

Everything is abstract (``jax.ShapeDtypeStruct``) and goes through the run's own builders
(``TrainConfig``, ``state.state_shardings``, ``step.jit_train_step``, ``encoders.split_trainable``,
``lora.attach``, ``Objective``, the optimizer), so the compiled program is the one the run would
execute on its first batch of the longest length. A cross-encoder config (``model_kind``) is
planned on padded candidate groups of its size. ``benchmarks/llm_memory.py`` uses it for a Mistral-7B-shaped LoRA step
on 8 simulated devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from embedjax import cross_encoder as ce
from embedjax import hf, lora, pooling as pooling_lib, sharding
from embedjax.data.batch import Batch, Side
from embedjax.encoders import registry
from embedjax.train import encoders, memory, optim
from embedjax.train.config import ModelConfig, TrainConfig
from embedjax.train.cross_objective import CrossObjective
from embedjax.train.objective import Objective
from embedjax.train.state import TrainState, state_shardings
from embedjax.train.step import jit_train_step


def _abstract_params(cfg, model: ModelConfig) -> dict:
    params = jax.eval_shape(functools.partial(registry.of(cfg).init, cfg), jax.random.key(0))
    if model.pooling in pooling_lib.PARAMETRIC:
        pooler = jax.eval_shape(lambda k: pooling_lib.init_latent_attention(k, cfg.hidden_size, **model.pooler_init),
                                jax.random.key(0))
        params = {**params, "pooler": pooler}
    return params


def abstract_batch(batch_size: int, length: int, *, negatives: bool, pool_mask: bool = False) -> Batch:
    """The padded batch the pipeline yields (global shapes): ids, masks, types, hashes per side,
    and the query side's pooling mask when instruction tokens are excluded (``pool_mask``)."""
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

    def side(pool: bool = False) -> Side:
        return Side(hashes=ints(batch_size), ids=ints(batch_size, length), mask=ints(batch_size, length),
                    types=ints(batch_size, length), pool=ints(batch_size, length) if pool else None)

    return Batch(a=side(pool_mask), b=side(), n=side() if negatives else None)


def abstract_pair_batch(batch_size: int, group: int, length: int) -> Batch:
    """A cross-encoder's padded batch (``embedjax.data.cross_batches``): ``group`` pairs per row."""
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    pairs = Side(hashes=ints(batch_size, group), ids=ints(batch_size, group, length),
                 mask=ints(batch_size, group, length), types=ints(batch_size, group, length))
    return Batch(a=pairs, labels=jax.ShapeDtypeStruct((batch_size, group), jnp.float32))


def step_memory(config, hf_config: Mapping[str, Any] | None = None, *, mesh=None, length: int | None = None,
                negatives: bool | None = None, total_steps: int = 1000) -> memory.StepMemory:
    """Per-device memory of ``config``'s train step (``memory.StepMemory``).

    Args:
      config: a training config (configs/base.py keys), or a parsed ``TrainConfig``.
      hf_config: the model's ``config.json`` as a dict; default: read from ``config.model``.
      mesh: default ``sharding.mesh_from_config(config.mesh)`` over this process's devices
        (simulate a pod on CPU with ``--xla_force_host_platform_device_count``).
      length: tokens per text; default ``config.max_length`` (the longest batch the run can see),
        else the model's position limit.
      negatives: whether records carry a hard negative; default: the data kind's (triplets).
    """
    run = config if isinstance(config, TrainConfig) else TrainConfig.from_config(config)
    model = run.model
    if model.late or model.multi_head:
        raise NotImplementedError("step_memory sizes bi- and cross-encoder steps; a ColBERT run's (its "
                                  "(queries x documents x tokens x tokens) MaxSim block) is not modelled yet")
    if model.sparse:
        raise NotImplementedError("step_memory sizes bi- and cross-encoder steps; a SPLADE run's (its vocabulary-wide "
                                  "logits) is not planned yet: its first step's compiled memory is logged and checked")
    if hf_config is None:
        hf_config = hf.read_json(hf.resolve(model.path) / "config.json")
    cfg = registry.config_from_hf(hf_config, dtype=model.dtype)
    if model.attention:
        cfg = dataclasses.replace(cfg, attention=model.attention)
    params = _abstract_params(cfg, model)
    head = None
    if model.cross_encoder:
        head = ce.HeadSpec(ce.head_kind_for(cfg), model.num_labels)
        params = {**params, "head": jax.eval_shape(lambda k: ce.init_head(cfg, head, k), jax.random.key(0))}
    spec = run.lora.spec()
    if spec is not None:
        params = jax.eval_shape(lambda p: lora.attach(p, cfg, spec, jax.random.key(0))[0], params)
        cfg = dataclasses.replace(cfg, lora=spec)
    trainable, frozen = encoders.split_trainable(params, spec is not None)
    source = next(iter(run.sources.values()))  # a mixture's first source
    objective = (CrossObjective.from_config(source.objective, head) if head is not None
                 else Objective.from_config(source.objective, model.pooling or "mean"))
    tx, _ = optim.make_optimizer(run.optim, total_steps - total_steps % run.optim.accumulate,
                                 no_decay=registry.of(cfg).no_decay)
    mesh = mesh or sharding.mesh_from_config(run.mesh)
    rules = sharding.rules_for(cfg, run.sharding_rules)
    abstract_state = jax.eval_shape(functools.partial(TrainState.create, tx=tx, seed=0), trainable)
    state_shards, frozen_shards = state_shardings(abstract_state, frozen, mesh, rules)
    place = lambda tree, shards: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shards)
    if negatives is None:
        negatives = source.data.kind in ("triplets", "sick_triplets")
    length = int(length or model.max_length or cfg.max_length)
    if head is not None:  # a candidate group: the positive, its hard negatives, the in-batch ones
        data = source.data
        group = 1 + data.num_negatives * (data.kind == "beir") + int(negatives) + data.in_batch_negatives
        batch = abstract_pair_batch(run.batch_size, group, length)
        if objective.reads == "teacher":
            batch = dataclasses.replace(batch, teacher=jax.ShapeDtypeStruct((run.batch_size, group), jnp.float32))
    else:
        batch = abstract_batch(run.batch_size, length, negatives=negatives,
                               pool_mask=bool(model.prompts) and not model.include_prompt)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)),
                         batch)
    step = jit_train_step(cfg, objective, tx, state_shards, frozen_shards, mesh)
    compiled = step.lower(place(abstract_state, state_shards), batch, place(frozen, frozen_shards), None).compile()
    return memory.step_memory(compiled)
