"""Plan a run before paying for it: the per-device memory of a config's train step, from the
model's ``config.json`` alone (no weights downloaded, nothing allocated).

    from embedjax.train import plan
    mem = plan.step_memory(config, hf_config=json.load(open("config.json")))
    print(mem.describe())

Everything is abstract (``jax.ShapeDtypeStruct``) and goes through the run's own builders
(``TrainConfig``, ``state.state_shardings``, ``step.jit_train_step``, ``encoders.split_trainable``,
``lora.attach``, ``Objective``, the optimizer), so the compiled program is the one the run would
execute on its first batch of the longest length. A cross-encoder config (``model_kind``) is
planned on padded candidate groups of its size; a SPLADE, ColBERT or three-head config with the
heads a fresh model on a plain backbone gets (the MLM head and its vocabulary-wide logits, the
ColBERT projection and MaxSim block, the lexical and multi-vector heads); an MNTP config with its
LM head (untied: ``lm_head.weight``; frozen under LoRA) and the vocabulary-wide logits of its chunks.
``benchmarks/llm_memory.py`` uses it for a Mistral-7B-shaped LoRA step on 8 simulated devices.
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


def _own_heads(model: ModelConfig, cfg, objective_section, length: int, total_steps: int):
    """``(head params, objective, (query length, document length))`` of a SPLADE, ColBERT or
    three-head run, abstract. A ColBERT section's unset values are a fresh model's on a plain
    backbone (PyLate's: 128 wide, queries of 32 tokens, documents of 180 at most, and ``length``)."""
    key = jax.random.key(0)
    if model.sparse:
        from embedjax import sparse
        from embedjax.sparse_model import QUERY_STATIC
        from embedjax.train.sparse_objective import SparseObjective

        splade = dict(model.splade or {})
        heads = {"mlm_head": jax.eval_shape(lambda k: sparse.init_mlm_head(
            cfg.hidden_size, cfg.vocab_size, k, kind=splade.get("head_init", "identity")), key)}
        if splade.get("inference_free"):
            heads[QUERY_STATIC] = jax.ShapeDtypeStruct((cfg.vocab_size,), jnp.float32)
        return heads, SparseObjective.from_config(objective_section, splade).for_run(total_steps), (length, length)
    if model.late:
        from embedjax import colbert
        from embedjax.train.colbert_objective import ColbertObjective

        section = model.colbert or {}
        dim = section.get("dim") or colbert.DEFAULT_DIM
        heads = {"projection": jax.eval_shape(lambda k: colbert.init_projection(cfg.hidden_size, dim, key=k), key)}
        lengths = (section.get("query_length") or 32, min(section.get("document_length") or 180, length))
        return heads, ColbertObjective.from_config(objective_section, dim=dim), lengths
    from types import SimpleNamespace

    from embedjax import m3
    from embedjax.m3_model import HEADS_KEY
    from embedjax.train.m3_objective import M3Objective

    heads = {HEADS_KEY: jax.eval_shape(lambda k: m3.init_heads(cfg.hidden_size, k), key)}
    shapes = SimpleNamespace(cfg=cfg, vocab_size=cfg.vocab_size, special_ids=())  # ids change values, not shapes
    return heads, M3Objective.from_config(objective_section, shapes), (length, length)


def _mntp_head(params, cfg, hf_config, objective_section):
    """An MNTP run's abstract params (an untied LM head added, as ``mntp_objective.add_lm_head``
    reads it) and its settings (the section's rates and chunks; token ids do not change the step)."""
    from embedjax import mntp
    from embedjax.train.mntp_objective import LM_HEAD, MntpSettings, options

    tied = mntp.tie_word_embeddings(hf_config)
    if not tied:
        head = jax.ShapeDtypeStruct((cfg.vocab_size, cfg.hidden_size), jnp.float32)
        params = {**params, LM_HEAD: {"weight": head}}
    kw = options(objective_section["loss_kwargs"])
    settings = MntpSettings(probability=kw["probability"], replace=kw["replace"], random=kw["random"],
                            vocab_size=cfg.vocab_size, chunk_size=kw["chunk_size"], tied=tied,
                            softcap=mntp.final_logit_softcap(hf_config))
    return params, settings


def abstract_batch(batch_size: int, length: int, *, negatives: bool, pool_mask: bool = False,
                   query_length: int | None = None, pool_every_side: bool = False) -> Batch:
    """The padded batch the pipeline yields (global shapes): ids, masks, types, hashes per side,
    and the query side's pooling mask when instruction tokens are excluded (``pool_mask``).
    ``query_length``: the query side's own length (default ``length``); ``pool_every_side``: every
    side carries a pooling mask (ColBERT's layout, ``colbert.ColbertFormat``)."""
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731

    def side(pool: bool = False, tokens: int = length) -> Side:
        pool = pool or pool_every_side
        return Side(hashes=ints(batch_size), ids=ints(batch_size, tokens), mask=ints(batch_size, tokens),
                    types=ints(batch_size, tokens), pool=ints(batch_size, tokens) if pool else None)

    return Batch(a=side(pool_mask, query_length or length), b=side(), n=side() if negatives else None)


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
    if hf_config is None:
        hf_config = hf.read_json(hf.resolve(model.path) / "config.json")
    cfg = registry.config_from_hf(hf_config, dtype=model.dtype)
    if model.attention:
        cfg = dataclasses.replace(cfg, attention=model.attention)
    if model.late:  # a plain backbone gains PyLate's [Q] / [D] marker rows
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 2)
    params = _abstract_params(cfg, model)
    source = next(iter(run.sources.values()))  # a mixture's first source
    head = None
    if model.cross_encoder:
        head = ce.HeadSpec(ce.head_kind_for(cfg), model.num_labels)
        params = {**params, "head": jax.eval_shape(lambda k: ce.init_head(cfg, head, k), jax.random.key(0))}
    length = int(length or model.max_length or cfg.max_length)
    side_lengths = (length, length)
    own = None
    if model.sparse or model.late or model.multi_head:
        heads, own, side_lengths = _own_heads(model, cfg, source.objective, length, total_steps)
        params = {**params, **heads}
    mntp_settings = None
    if source.objective["loss"] == "mntp":  # the LM head and its vocabulary-wide logits (embedjax.train.mntp_objective)
        params, mntp_settings = _mntp_head(params, cfg, hf_config, source.objective)
    spec = run.lora.spec()
    if spec is not None:
        params = jax.eval_shape(lambda p: lora.attach(p, cfg, spec, jax.random.key(0))[0], params)
        cfg = dataclasses.replace(cfg, lora=spec)
    trainable, frozen = encoders.split_trainable(params, spec is not None)
    objective = (own if own is not None else CrossObjective.from_config(source.objective, head) if head is not None
                 else Objective.from_config(source.objective, model.pooling or "mean"))
    if mntp_settings is not None:
        objective = dataclasses.replace(objective, mntp=mntp_settings)
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
    if head is not None:  # a candidate group: the positive, its hard negatives, the in-batch ones
        data = source.data
        group = 1 + data.num_negatives * (data.kind == "beir") + int(negatives) + data.in_batch_negatives
        batch = abstract_pair_batch(run.batch_size, group, length)
        if objective.reads == "teacher":
            batch = dataclasses.replace(batch, teacher=jax.ShapeDtypeStruct((run.batch_size, group), jnp.float32))
    else:
        batch = abstract_batch(run.batch_size, side_lengths[1], negatives=negatives, query_length=side_lengths[0],
                               pool_mask=bool(model.prompts) and not model.include_prompt and own is None,
                               pool_every_side=model.late)
    if mntp_settings is not None:  # single texts (a packed run's rows hold as many tokens at most)
        batch = dataclasses.replace(batch, b=None, n=None)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh)),
                         batch)
    step = jit_train_step(cfg, objective, tx, state_shards, frozen_shards, mesh)
    compiled = step.lower(place(abstract_state, state_shards), batch, place(frozen, frozen_shards), None).compile()
    return memory.step_memory(compiled)
