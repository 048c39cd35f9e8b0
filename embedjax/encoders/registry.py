"""The backbone seam: one registry keyed by the Hugging Face ``model_type``.

A backbone module (``bert.py``, ``decoder.py``, ``static.py``) owns everything architecture-specific and
exposes it as a ``Backbone``: its config (``from_hf`` / ``to_hf``), ``init``, ``apply``, its
safetensors name map, its sharding rules and its no-weight-decay pattern. ``embed``,
``Encoder``, ``hf``, export, sharding and the optimizer ask this registry (``of(cfg)`` or
``for_model_type(...)``) and never import a backbone directly.

``apply`` has one signature for every backbone::

    apply(params, cfg, input_ids, attention_mask, *, token_type_ids=None, segment_ids=None,
          positions=None, dropout_key=None, num_layers=None, all_layers=True, remat=False,
          unroll=True) -> (k + 1, B, T, H) hidden states, or (B, T, H) with all_layers=False

(a backbone without token types ignores ``token_type_ids``). Every config carries at least
``model_type``, ``hidden_size``, ``num_layers``, ``pad_token_id``, ``max_length``, ``dtype``,
``hidden_dropout``, ``attention_dropout``, ``lora`` (``embedjax.lora.LoraSpec`` or None) and
``to_hf()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from embedjax.encoders.statedict import CheckpointError


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One architecture family behind the seam (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[..., Any]          # (hf config.json dict, **overrides) -> cfg
    init: Callable[..., Any]                    # (cfg, key) -> params
    apply: Callable[..., Any]                   # see the module docstring
    params_from_state_dict: Callable[..., Any]  # (state dict, cfg) -> params; CheckpointError on mismatch
    state_dict_from_params: Callable[..., Any]  # (params, cfg) -> PyTorch-named state dict
    sharding_rules: tuple = ()                  # ((regex over the param path, PartitionSpec), ...)
    no_decay: str = r"(bias|scale)$"            # params whose path matches get no weight decay
    # (our dense path, its PyTorch module name with {i} for the layer index), e.g.
    # ("layers/attention/q", "layers.{i}.self_attn.q_proj"): what LoRA / PEFT files name
    dense_modules: tuple = ()
    # (cfg) -> {PyTorch name: shape}: tensors the Hugging Face model class has but the encoder never
    # reads (BERT's pooler). An export carries them over from the source checkpoint (zeros when it has
    # none), so AutoModel / SentenceTransformer load the export without missing weights.
    unused_tensors: Callable[[Any], dict] | None = None
    # (config.json dict, state dict) -> the dict completed from the weights' shapes, for a family whose
    # config.json does not record them (model2vec's records no vocabulary size); None: config.json is complete
    config_from_weights: Callable[[Mapping, Mapping], dict] | None = None
    # (cfg, tokenizers backend) -> embedjax.tokenize.Tokenizer keyword arguments the family reads texts with
    # (a static table: no special tokens); None: the tokenizer's defaults
    tokenizer_options: Callable[[Any, Any], dict] | None = None
    # the sentence-transformers module that reads this family's directory: "Transformer" (token states,
    # then a Pooling module) or "StaticEmbedding" (already pooled by mean: no Pooling module)
    sentence_transformers_module: str = "Transformer"
    # apply also takes params["layers"] as a tuple of per-layer trees (``layers.unstacked``), which
    # ``Encoder.encode`` passes on CPU so that no compiled call slices (copies) the stacked weights
    unstacked_layers: bool = False


_BACKBONES: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Adds ``backbone`` under each of its ``model_types`` (a later registration replaces)."""
    for model_type in backbone.model_types:
        _BACKBONES[model_type] = backbone
    return backbone


def supported_model_types() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_BACKBONES))


def for_model_type(model_type: str) -> Backbone:
    """The backbone registered for a Hugging Face ``model_type``; CheckpointError names the supported ones."""
    _load_builtin()
    try:
        return _BACKBONES[model_type]
    except KeyError:
        raise CheckpointError(f"unsupported architecture model_type={model_type!r}; embedjax supports "
                              f"{supported_model_types()}") from None


def of(cfg) -> Backbone:
    """The backbone of a config (by its ``model_type``)."""
    return for_model_type(cfg.model_type)


def config_from_hf(hf: Mapping[str, Any], **overrides):
    """The backbone config for a Hugging Face ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type not in supported_model_types():
        raise CheckpointError(f"unsupported architecture model_type={model_type!r} (architectures="
                              f"{hf.get('architectures')}); embedjax supports {supported_model_types()}")
    return for_model_type(model_type).config_from_hf(hf, **overrides)


_loaded = False


def _load_builtin() -> None:
    """Imports the built-in backbone modules (each registers itself) on first use."""
    global _loaded
    if not _loaded:
        _loaded = True
        import importlib

        for module in _BUILTIN:
            importlib.import_module(module)


_BUILTIN = ("embedjax.encoders.bert", "embedjax.encoders.decoder", "embedjax.encoders.static")
