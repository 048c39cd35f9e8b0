"""Device mesh, parameter sharding rules and batch sharding.

The mesh has three axes: ``data`` (data parallel), ``fsdp`` (data parallel whose members
also split the parameters) and ``model`` (tensor parallel: the members split each big matrix
and see the same examples). The batch is split over ``data`` and ``fsdp`` (every one of
those devices gets distinct examples); parameters are split over ``fsdp`` and ``model`` by
rules written as data, which each backbone owns (``Backbone.sharding_rules``):

    rules = [(regex over the '/'-joined param path, PartitionSpec), ...]   first match wins

Axis type: every axis is ``AxisType.Auto``. ``jax.make_mesh`` defaults to ``Explicit``,
under which a contrastive ``za @ zb.T`` with both sides sharded on the batch raises a
``ShardingTypeError`` (the result would be sharded twice over the same axis). With ``Auto``
the losses stay plain global-batch jnp code and GSPMD inserts the all-gather of the
candidates: in-batch negatives span the global batch by default. ``local_negatives``
restricts them to each device's shard instead, for comparison.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch is split over the data-parallel axes; 'model' members share it

REPLICATED_RULES: list[tuple[str, P]] = [(r".*", P())]
# A trainable pooler (``params["pooler"]``: NV-Embed's latent attention, ~270M params at hidden 4096,
# mostly its GeGLU MLP) is FSDP x tensor-parallel sharded like a transformer block, whatever the backbone.
POOLER_RULES: list[tuple[str, P]] = [
    (r"^pooler/.*/(bias|scale)$", P()),
    (r"^pooler/latents$", P(None, "fsdp")),                # (r, H)
    (r"^pooler/(q|k|v)/kernel$", P("fsdp", "model")),      # (H, heads, head_dim)
    (r"^pooler/o/kernel$", P("model", None, "fsdp")),      # (heads, head_dim, H)
    (r"^pooler/mlp_in/kernel$", P("fsdp", "model")),       # (H, 2 x mlp)
    (r"^pooler/mlp_out/kernel$", P("model", "fsdp")),      # (mlp, H)
    (r"^pooler/", P()),
]


def rules_for(cfg, name: str) -> tuple:
    """The sharding rules called ``name`` for a backbone config: ``"fsdp"`` (the backbone's own
    FSDP x tensor-parallel rules) or ``"replicated"``."""
    if name == "replicated":
        return tuple(REPLICATED_RULES)
    if name == "fsdp":
        from embedjax.encoders import registry

        # a cross-encoder's head, a tri-encoder's, a SPLADE model's MLM head, a ColBERT projection (small), a
        # TSDAE decoder's own weights (4 H x H per layer): replicated; an MNTP run's untied LM head (V, H): as
        # a decoder's embedding, its hidden axis over fsdp
        return (*POOLER_RULES, (r"^(tri_|mlm_)?head/", P()), (r"^projection/", P()), (r"^query_static$", P()), (r"^m3_heads/", P()),
                (r"^tsdae_decoder/", P()), (r"^lm_head/weight$", P(None, "fsdp")),
                *registry.of(cfg).sharding_rules)
    raise ValueError(f"unknown sharding_rules {name!r}; choose 'fsdp' or 'replicated'")


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'fsdp', 'model')`` mesh with ``Auto`` axes (see the module docstring for why).

    ``-1`` for one axis means "all remaining devices"; ``data * fsdp * model`` must equal the
    number of devices used (``devices``, default all of ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, model]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if n % known:
            raise ValueError(f"{n} devices cannot be split into mesh axes {dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, got {n}")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def local_mesh() -> Mesh:
    """A 1-D ``('data',)`` mesh over this process's devices: per-host work such as encoding."""
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def mesh_from_config(config: Mapping[str, Any]) -> Mesh:
    """``make_mesh`` from a dict / ``ml_collections.ConfigDict`` with optional ``data``, ``fsdp``, ``model``."""
    return make_mesh(config.get("data", -1), config.get("fsdp", 1), config.get("model", 1))


def param_path(path) -> str:
    """'/'-joined name of a pytree path, e.g. ``layers/mlp/up/kernel``."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_specs(params_or_shapes, mesh: Mesh, rules, *, strict: bool = True):
    """Pytree of PartitionSpecs for a param pytree (arrays or ``jax.ShapeDtypeStruct``).

    Each leaf takes the spec of the first rule whose regex ``re.search``-es its path; mesh
    axes of size 1 are dropped from it (``P(None, 'fsdp', 'model')`` on a mesh without
    tensor parallelism is ``P(None, 'fsdp')``).
    Raises ValueError naming the parameter when no rule matches, when the spec has more
    axes than the array, or when a sharded axis is not divisible by the mesh axis size.
    With ``strict=False`` an indivisible axis is replicated instead, with a warning (a
    silent fallback would hide a memory blow-up, hence strict by default).
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def spec_for(path, leaf):
        name = param_path(path)
        spec = next((s for r, s in compiled if r.search(name)), None)
        if spec is None:
            raise ValueError(f"no sharding rule matches parameter {name!r} {tuple(leaf.shape)}")
        if len(spec) > len(leaf.shape):
            raise ValueError(f"spec {spec} has more axes than parameter {name!r} {tuple(leaf.shape)}")
        out = []
        for dim, axes in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
            # Mesh axes of size 1 (or absent from this mesh) split nothing: dropped, so one rule set
            # serves a ('data', 'fsdp', 'model') mesh of any shape.
            named = (axes,) if isinstance(axes, str) else tuple(axes or ())
            named = tuple(a for a in named if mesh.shape.get(a, 1) > 1)
            axes = None if not named else named[0] if len(named) == 1 else named
            size = int(np.prod([mesh.shape[a] for a in named]))
            if dim % size:
                msg = f"parameter {name!r} {tuple(leaf.shape)}: axis of size {dim} not divisible by mesh axes {axes} ({size})"
                if strict:
                    raise ValueError(msg)
                warnings.warn(msg + "; replicating that axis", stacklevel=3)
                axes = None
            out.append(axes)
        while out and out[-1] is None:  # canonical form: P(None, 'fsdp'), P() for replicated
            out.pop()
        return P(*out)

    return jax.tree_util.tree_map_with_path(spec_for, params_or_shapes)


def param_shardings(params_or_shapes, mesh: Mesh, rules, *, strict: bool = True):
    """Pytree of ``NamedSharding`` for the params (see ``param_specs``); use as
    ``jax.jit(init, out_shardings=param_shardings(jax.eval_shape(init, ...), mesh, rules_for(cfg, "fsdp")))``."""
    specs = param_specs(params_or_shapes, mesh, rules, strict=strict)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel axes: ``P(('data', 'fsdp'))``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def to_global(batch, mesh: Mesh):
    """Per-host numpy batch (pytree, leading axis = this host's examples) -> global jax.Arrays
    sharded by ``batch_sharding``. On one host the global batch is the local one."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def local_negatives(loss_fn: Callable, mesh: Mesh) -> Callable:
    """``loss_fn`` with in-batch negatives restricted to each device's shard.

    Every positional argument must be batch-major (split like ``batch_sharding``); options go
    in a ``functools.partial``. Each device computes ``loss_fn`` on its own examples only (its
    candidates are its own positives/negatives) and the result is the mean over devices: the
    behaviour of per-GPU contrastive losses without a gather. The default (calling
    ``loss_fn`` directly on global arrays) uses the whole global batch instead.
    """

    def per_shard(*args):
        return jax.lax.pmean(loss_fn(*args), BATCH_AXES)

    def wrapped(*args):
        return jax.shard_map(
            per_shard, mesh=mesh, in_specs=tuple(P(BATCH_AXES) for _ in args), out_specs=P()
        )(*args)

    return wrapped
