"""LoRA (Hu et al., arXiv:2106.09685) as pure functions over plain param trees.

Adapters are extra leaves next to the kernels they adapt: a dense ``{"kernel": W (.., in, out),
...}`` chosen by ``LoraSpec.targets`` gains ``lora_a`` (.., in, r) and ``lora_b`` (.., r, out),
and every backbone's ``dense`` (``embedjax/encoders/layers.py``) adds
``scale * dropout(x) @ lora_a @ lora_b`` (``scale = alpha / r``, or ``alpha / sqrt(r)`` with
rsLoRA, arXiv:2312.03732). The spec travels in the backbone config (``cfg.lora``), a static jit
argument. With stacked layers (a leading ``L`` axis on every layer param) the adapters are
stacked too: ``lora_a`` (L, in, r), ``lora_b`` (L, r, out).

The life cycle::

    params, cfg = lora.attach(params, cfg, LoraSpec(rank=16, alpha=32), key)  # B = 0: same outputs
    trainable, frozen = lora.partition(params)            # adapters vs everything else
    grads = jax.grad(lambda t: loss(lora.combine(t, frozen)))(trainable)
    opt_state = optimizer.init(trainable)                # state for the adapters alone
    lora.save_peft(directory, params, cfg)               # a PEFT adapter directory
    params, cfg = lora.merge(params, cfg)                # W + scale * A @ B, adapters gone

PEFT files: ``save_peft`` / ``load_peft`` read and write the directory layout of Hugging Face
PEFT's ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r)); the
PyTorch module names come from the backbone's ``dense_modules`` (``embedjax/encoders/registry.py``),
so a directory written here loads with ``PeftModel.from_pretrained(AutoModel.from_pretrained(base),
directory)`` and one PEFT wrote loads here (``tests/test_lora.py`` checks both ways).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ADAPTER_KEYS = ("lora_a", "lora_b")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which dense layers get adapters and how they are scaled (hashable: part of the static config).

    ``targets`` is a regex ``re.search``-ed against each dense layer's '/'-joined param path
    (e.g. ``layers/attention/(q|k|v|o)$``); empty means ``default_targets(cfg)`` in ``attach``.
    ``dropout`` applies to the adapter's input only (as PEFT's ``lora_dropout``).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = ""
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# --------------------------------------------------------------------------- paths


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def is_adapter(path) -> bool:
    """True for an adapter leaf: ``path`` is a '/'-joined string or a JAX key path ending in lora_a / lora_b."""
    if not isinstance(path, str):
        path = _path_str(path)
    return path.rsplit("/", 1)[-1] in ADAPTER_KEYS


def dense_paths(params) -> list[str]:
    """'/'-joined paths of every dense dict (a dict holding a ``kernel``), sorted (JAX's own key order)."""
    out: list[str] = []

    def walk(node, prefix):
        if isinstance(node, dict):
            if "kernel" in node:
                out.append(prefix)
            for name, child in node.items():
                walk(child, f"{prefix}/{name}" if prefix else str(name))

    walk(params, "")
    return sorted(out)


def _get(params, path: str):
    node = params
    for part in path.split("/"):
        node = node[part]
    return node


def _replace(params, path: str, fn):
    """A copy of ``params`` (dicts along ``path`` copied, leaves shared) whose dict at ``path`` is ``fn(dict)``."""
    head, _, rest = path.partition("/")
    out = dict(params)
    out[head] = fn(params[head]) if not rest else _replace(params[head], rest, fn)
    return out


def adapted_paths(params) -> list[str]:
    """Paths of the dense dicts that carry adapters."""
    return [p for p in dense_paths(params) if "lora_a" in _get(params, p)]


def _dense_modules(cfg) -> tuple:
    from embedjax.encoders import registry

    return registry.of(cfg).dense_modules


def default_targets(cfg) -> str:
    """A ``targets`` regex for every dense layer the backbone names for PEFT (``Backbone.dense_modules``):
    the attention projections and the MLP projections, as PEFT's ``target_modules="all-linear"``
    on the base model."""
    paths = [ours for ours, _ in _dense_modules(cfg)]
    if not paths:
        raise ValueError(f"backbone {cfg.model_type!r} lists no dense_modules; give LoraSpec.targets explicitly")
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


# --------------------------------------------------------------------------- attach / strip / merge


def attach(params, cfg, spec: LoraSpec, key) -> tuple[dict, Any]:
    """Adds LoRA adapters to every dense dict whose path ``re.search``-es ``spec.targets``.

    ``lora_a`` is drawn as PEFT does (``kaiming_uniform_(a=sqrt(5))`` over fan_in = ``in``, i.e.
    U(-1/sqrt(in), 1/sqrt(in)), independently per stacked layer) and ``lora_b`` is zero, so the
    model's outputs are unchanged until B is trained. Adapters are float32 like the kernels.

    Returns ``(params, cfg)`` with ``cfg.lora = spec`` (its ``targets`` resolved to
    ``default_targets(cfg)`` when empty). Raises ValueError when the params already carry
    adapters, or when the regex matches no dense layer (the message lists those available).
    """
    if spec.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
    if not 0.0 <= spec.dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {spec.dropout}")
    if adapted_paths(params):
        raise ValueError(f"the params already carry LoRA adapters at {adapted_paths(params)}: merge or strip them first")
    if not spec.targets:
        spec = dataclasses.replace(spec, targets=default_targets(cfg))
    available = dense_paths(params)
    chosen = [p for p in available if re.search(spec.targets, p)]
    if not chosen:
        raise ValueError(f"LoRA targets {spec.targets!r} match no dense layer; the dense paths are {available}")
    shapes = tuple(tuple(_get(params, p)["kernel"].shape) for p in chosen)
    for path, (a, b) in zip(chosen, _init_adapters(key, shapes, spec.rank)):
        params = _replace(params, path, lambda dense, a=a, b=b: {**dense, "lora_a": a, "lora_b": b})
    return params, dataclasses.replace(cfg, lora=spec)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_adapters(key, shapes: tuple, rank: int) -> list:
    """(A, B) for kernels of the given shapes: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
    ``kaiming_uniform_(a=sqrt(5))``), B = 0. One compiled program for all of them (eager
    draws would compile one per shape)."""
    out = []
    for k, (*lead, d_in, d_out) in zip(jax.random.split(key, len(shapes)), shapes):
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(k, (*lead, d_in, rank), jnp.float32, -bound, bound)
        out.append((a, jnp.zeros((*lead, rank, d_out), jnp.float32)))
    return out


def strip(params, cfg=None):
    """``params`` without adapter leaves (and ``cfg`` with ``lora=None`` when given): the base model."""
    for path in adapted_paths(params):
        params = _replace(params, path, lambda d: {k: v for k, v in d.items() if k not in ADAPTER_KEYS})
    return params if cfg is None else (params, dataclasses.replace(cfg, lora=None))


def merge(params, cfg) -> tuple[dict, Any]:
    """Folds every adapter into its kernel: ``W + scale * A @ B`` (float32), adapters removed,
    ``cfg.lora = None``. The merged model computes what the adapted one does without dropout."""
    paths = adapted_paths(params)
    if paths and cfg.lora is None:
        raise ValueError("the params carry LoRA adapters but cfg.lora is None: no scale to merge with")
    for path in paths:
        def fold(d):
            delta = jnp.einsum("...ir,...ro->...io", d["lora_a"].astype(jnp.float32), d["lora_b"].astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
            kernel = (d["kernel"].astype(jnp.float32) + cfg.lora.scale * delta).astype(d["kernel"].dtype)
            return {**{k: v for k, v in d.items() if k not in ADAPTER_KEYS}, "kernel": kernel}

        params = _replace(params, path, fold)
    return params, dataclasses.replace(cfg, lora=None)


# --------------------------------------------------------------------------- trainable / frozen


def _is_none(x) -> bool:
    return x is None


def trainable_mask(params):
    """A pytree like ``params`` of bools: True on the adapter leaves (``lora_a`` / ``lora_b``)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_adapter(path), params)


def partition(params, mask=None) -> tuple[Any, Any]:
    """Splits ``params`` into ``(trainable, frozen)``: two pytrees of the same structure, each holding
    the leaves of its side and None where a leaf belongs to the other side.

    ``mask`` is a pytree of bools like ``params`` (True = trainable); default ``trainable_mask(params)``.
    JAX treats the None holes as empty subtrees, so ``jax.grad`` wrt ``trainable`` and an optax
    ``init(trainable)`` see the trainable leaves alone (no optimizer state for the frozen weights).
    """
    if mask is None:
        mask = trainable_mask(params)
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return trainable, frozen


def combine(trainable, frozen):
    """The inverse of ``partition``: fills each None hole of one side with the other side's leaf."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=_is_none)


# --------------------------------------------------------------------------- PEFT files


def _module_regex(template: str) -> re.Pattern:
    """A PyTorch module-name template (``layers.{i}.self_attn.q_proj``) as a regex with the
    layer index as group 'i' and anything before it as group 'prefix'."""
    parts = template.split("{i}")
    body = r"(?P<i>\d+)".join(re.escape(p) for p in parts)
    return re.compile(r"(?P<prefix>(?:.*\.)?)" + body)


def _module_names(template: str, lead: tuple) -> list[tuple[int | None, str]]:
    """(layer index or None, module name) for a dense param with leading stack axes ``lead``."""
    if "{i}" not in template:
        if lead:
            raise ValueError(f"module template {template!r} has no layer index but the param is stacked {lead}")
        return [(None, template)]
    if len(lead) != 1:
        raise ValueError(f"module template {template!r} needs one stacked layer axis, the param has {lead}")
    return [(i, template.format(i=i)) for i in range(lead[0])]


def _target_modules(targeted: list[str], templates: dict[str, str]) -> list[str] | str:
    """PEFT ``target_modules`` selecting exactly the targeted modules: their short names
    (``query``, ``q_proj``) when each is unique among the backbone's dense modules, otherwise a
    regex that PEFT ``re.fullmatch``-es against full module names."""
    last = [t.rsplit(".", 1)[-1] for t in templates.values()]
    short = [templates[p].rsplit(".", 1)[-1] for p in targeted]
    if all(last.count(s) == 1 for s in short):
        return sorted(short)
    alts = [r"\d+".join(re.escape(part) for part in templates[p].split("{i}")) for p in targeted]
    return "(" + "|".join(alts) + ")"


def _peft_matches(patterns, name: str) -> bool:
    """PEFT's module-name rule: a string is ``re.fullmatch``-ed, a list entry matches the whole
    name or a '.'-separated suffix of it."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return patterns == "all-linear" or re.fullmatch(patterns, name) is not None
    return any(name == t or name.endswith("." + t) for t in patterns)


def _peft_selects(conf: dict, name: str) -> bool:
    """Whether a PEFT config's ``target_modules`` (less its ``exclude_modules``) selects module ``name``."""
    return _peft_matches(conf.get("target_modules"), name) and not _peft_matches(conf.get("exclude_modules"), name)


def save_peft(directory, params, cfg, *, base_model_name_or_path: str = "") -> Path:
    """Writes the adapters as a Hugging Face PEFT LoRA directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base),
    directory)`` loads onto the base model (no missing or unexpected adapter keys).

    Tensor names are ``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight``
    (out, r), the module names from the backbone's ``dense_modules``. Only adapted dense layers
    the backbone names can be written (ValueError otherwise). Returns the directory.
    """
    spec = cfg.lora
    paths = adapted_paths(params)
    if spec is None or not paths:
        raise ValueError("nothing to save: the params carry no LoRA adapters (or cfg.lora is None)")
    templates = dict(_dense_modules(cfg))
    unknown = [p for p in paths if p not in templates]
    if unknown:
        raise ValueError(f"adapters at {unknown} have no PyTorch module name in backbone {cfg.model_type!r} "
                         f"(dense_modules names {sorted(templates)}): PEFT cannot load them")
    tensors: dict[str, np.ndarray] = {}
    for path in paths:
        d = jax.device_get(_get(params, path))
        a, b = np.asarray(d["lora_a"], np.float32), np.asarray(d["lora_b"], np.float32)
        if a.shape[-1] != spec.rank:
            raise ValueError(f"{path}/lora_a has rank {a.shape[-1]}, cfg.lora.rank is {spec.rank}")
        for i, name in _module_names(templates[path], a.shape[:-2]):
            ai, bi = (a, b) if i is None else (a[i], b[i])
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(ai.T)
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(bi.T)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path or None,
        "revision": None,
        "inference_mode": True,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": _target_modules(paths, templates),
        "use_rslora": spec.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


# PEFT LoraConfig settings this loader cannot represent: (field, value meaning "off").
_UNSUPPORTED = (
    ("bias", "none"), ("use_dora", False), ("fan_in_fan_out", False), ("modules_to_save", None),
    ("layers_to_transform", None), ("rank_pattern", {}), ("alpha_pattern", {}), ("lora_bias", False),
    ("target_parameters", None), ("trainable_token_indices", None), ("layer_replication", None),
    ("use_qalora", False), ("use_bdlora", None),
)


def load_peft(directory, params, cfg, *, strict: bool = True) -> tuple[dict, Any]:
    """Reads a PEFT LoRA directory (one ``save_peft`` or PEFT's own ``save_pretrained`` wrote) onto
    ``params`` of the same base model; returns ``(params, cfg)`` with the adapters attached (any
    adapters already there are replaced) and ``cfg.lora`` from ``adapter_config.json``.

    Tensor names may carry a wrapper prefix after ``base_model.model.`` (e.g. ``model.`` from a
    ``*ForCausalLM``); it must be the same for every tensor. Raises ValueError naming the file and
    the key when: the config is not LoRA or uses a feature with no equivalent here (bias, DoRA,
    per-module ranks, modules_to_save, ...); a tensor names no dense module of the backbone
    (``strict=False`` skips such tensors instead, e.g. adapters on BERT's pooler, which no
    embedding uses); a module ``target_modules`` selects lacks its tensors, or a stacked layer
    lacks some layers; a shape does not fit the kernel or the rank ``r``.
    """
    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else "no such directory"
            raise FileNotFoundError(f"{f}: not found (a PEFT adapter directory has {ADAPTER_CONFIG} and "
                                    f"{ADAPTER_WEIGHTS}; found {found})")
    try:
        conf = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if conf.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type is {conf.get('peft_type')!r}, only 'LORA' is supported")
    for field, off in _UNSUPPORTED:
        value = conf.get(field)
        if not (value is None or value == off or (isinstance(value, (list, dict, str)) and not value)):
            raise ValueError(f"{config_file}: {field}={value!r} is not supported (only {field}={off!r})")
    rank = int(conf["r"])
    spec_fields = dict(rank=rank, alpha=float(conf.get("lora_alpha", 8)), dropout=float(conf.get("lora_dropout", 0.0)),
                       rslora=bool(conf.get("use_rslora", False)))

    from safetensors.numpy import load_file

    state = load_file(str(weights_file))
    templates = dict(_dense_modules(cfg))
    regexes = {path: _module_regex(t) for path, t in templates.items()}
    params = strip(params)

    # Each tensor -> (our path, layer index, 'A' / 'B'); the wrapper prefix must be shared.
    found: dict[tuple[str, int | None], dict[str, np.ndarray]] = {}
    prefixes: dict[str, str] = {}
    unexpected = []
    for key, value in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight", key)
        hit = None
        if m:
            for path, rx in regexes.items():
                mm = rx.fullmatch(m["module"])
                if mm:
                    hit = (path, int(mm["i"]) if mm.groupdict().get("i") is not None else None, mm["prefix"])
                    break
        if hit is None:
            unexpected.append(key)
            continue
        path, i, prefix = hit
        prefixes.setdefault(prefix, key)
        found.setdefault((path, i), {})[m["ab"]] = value
    if unexpected and strict:
        raise ValueError(f"{weights_file}: tensor {unexpected[0]!r} is not a LoRA A/B weight of any dense module of "
                         f"backbone {cfg.model_type!r} (all unexpected: {unexpected}; module names: "
                         f"{sorted(templates.values())}); load_peft(..., strict=False) skips them")
    if len(prefixes) > 1:
        raise ValueError(f"{weights_file}: tensors disagree on the model prefix: {prefixes}")
    if not found:
        raise ValueError(f"{weights_file}: no LoRA weights for any dense module of backbone {cfg.model_type!r}")
    prefix = next(iter(prefixes))
    selection = f"target_modules={conf.get('target_modules')!r}"
    if conf.get("exclude_modules"):
        selection += f" less exclude_modules={conf['exclude_modules']!r}"

    loaded = []
    for path in dense_paths(params):
        if path not in templates:
            continue
        kernel = _get(params, path)["kernel"]
        *lead, d_in, d_out = kernel.shape
        names = _module_names(templates[path], tuple(lead))
        have = [(i, n) for i, n in names if (path, i) in found]
        selected = [(i, n) for i, n in names if _peft_selects(conf, prefix + n)]
        if not have and not selected:
            continue
        for i, name in names if have else selected:
            for ab in "AB":
                if ab not in found.get((path, i), {}):
                    raise ValueError(f"{weights_file}: missing tensor '{_PEFT_PREFIX}{prefix}{name}.lora_{ab}.weight' "
                                     f"({config_file.name} {selection} selects {prefix}{name})")
        a = [found[(path, i)]["A"] for i, _ in names]
        b = [found[(path, i)]["B"] for i, _ in names]
        for (i, name), ai, bi in zip(names, a, b):
            for ab, arr, want in (("A", ai, (rank, d_in)), ("B", bi, (d_out, rank))):
                if tuple(arr.shape) != want:
                    raise ValueError(f"{weights_file}: '{_PEFT_PREFIX}{prefix}{name}.lora_{ab}.weight' has shape "
                                     f"{tuple(arr.shape)}, expected {want} (r={rank}, kernel {path} is {d_in} -> {d_out})")
        a_arr = np.stack([x.T for x in a]) if lead else a[0].T
        b_arr = np.stack([x.T for x in b]) if lead else b[0].T
        params = _replace(params, path, lambda d, a_arr=a_arr, b_arr=b_arr: {
            **d, "lora_a": jnp.asarray(a_arr, jnp.float32), "lora_b": jnp.asarray(b_arr, jnp.float32)})
        loaded.append(path)
    stray = sorted({p for p, _ in found} - set(loaded))
    if stray:
        raise ValueError(f"{weights_file}: LoRA weights for {stray}, which these params do not have")
    spec = LoraSpec(targets="^(" + "|".join(re.escape(p) for p in loaded) + ")$", **spec_fields)
    return params, dataclasses.replace(cfg, lora=spec)


def peft_files_exist(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a PEFT adapter (``adapter_config.json``)."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()
