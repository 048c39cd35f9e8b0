"""The BERT encoder family as pure functions: BERT, MiniLM, BGE, E5, GTE (BERT-style),
RoBERTa and XLM-RoBERTa.

``params`` is a plain dict pytree. The transformer layers are stacked along a
leading axis of size ``num_layers`` and run with ``lax.scan`` (unrolled by default), so:

* ``num_layers=k`` slices the stack to its first k layers *before* the scan:
  the layers above k are never computed (what 2D Matryoshka inference needs).

Param tree (kernels are ``(in, out)``; ``L`` = number of layers)::

    embeddings: word (V, H), position (P, H), token_type (T, H), norm {scale, bias}
    layers:     attention: query/key/value/output {kernel (L, H, H), bias (L, H)}, norm
                mlp:       up {kernel (L, H, I), bias}, down {kernel (L, I, H), bias}, norm
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from embedjax.encoders import layers as L
from embedjax.encoders import registry, statedict

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Static architecture description (hashable, so it can be a jit static argument).

    ``position_style`` is ``"absolute"`` for BERT (positions 0..T-1) and ``"roberta"``
    for RoBERTa / XLM-R (positions count non-pad tokens, offset by ``pad_token_id + 1``).
    ``dtype`` is the compute dtype; parameters stay float32.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    model_type: str = "bert"
    position_style: str = "absolute"
    dtype: str = "float32"
    lora: Any = None  # embedjax.lora.LoraSpec when the params carry adapters

    @property
    def max_length(self) -> int:
        """Longest input the position table allows (RoBERTa reserves pad_token_id + 1 slots)."""
        if self.position_style == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "BertConfig":
        """Builds the config from a Hugging Face ``config.json`` dict."""
        model_type = hf.get("model_type", "bert")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise statedict.CheckpointError(
                f"unsupported architecture model_type={model_type!r} "
                f"(architectures={hf.get('architectures')}); embedjax supports {SUPPORTED_MODEL_TYPES}"
            )
        pos_type = hf.get("position_embedding_type", "absolute")
        if pos_type not in (None, "absolute"):
            raise ValueError(f"unsupported position_embedding_type={pos_type!r}; only 'absolute' is implemented")
        fields = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
            model_type=model_type,
            position_style="roberta" if model_type in ("roberta", "xlm-roberta") else "absolute",
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """The Hugging Face ``config.json`` dict for this architecture."""
        arch = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
        return {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
        }


def init(cfg: BertConfig, key) -> dict:
    """Random parameters (BERT's init: normal(0.02) weights, zero biases, unit layer norms)."""
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    keys = iter(jax.random.split(key, 16))

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

    def linear(d_in, d_out):
        return {"kernel": normal(n, d_in, d_out), "bias": jnp.zeros((n, d_out), jnp.float32)}

    def norm(*lead):
        return {"scale": jnp.ones((*lead, h), jnp.float32), "bias": jnp.zeros((*lead, h), jnp.float32)}

    return {
        "embeddings": {
            "word": normal(cfg.vocab_size, h),
            "position": normal(cfg.max_position_embeddings, h),
            "token_type": normal(max(cfg.type_vocab_size, 1), h),
            "norm": norm(),
        },
        "layers": {
            "attention": {
                "query": linear(h, h),
                "key": linear(h, h),
                "value": linear(h, h),
                "output": linear(h, h),
                "norm": norm(n),
            },
            "mlp": {"up": linear(h, i), "down": linear(i, h), "norm": norm(n)},
        },
    }


def position_ids(cfg: BertConfig, input_ids, positions=None):
    """Position ids as the reference PyTorch models compute them.

    ``positions`` (packed sequences): each token's 0-based index within its own text,
    given by the packer; the ids then follow the model's convention from there.
    """
    if positions is not None:
        return positions + (cfg.pad_token_id + 1 if cfg.position_style == "roberta" else 0)
    if cfg.position_style == "roberta":
        not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def embed_tokens(params, cfg: BertConfig, input_ids, token_type_ids=None, dropout_key=None, positions=None):
    """Word + position + token-type embeddings, layer norm, dropout -> (B, T, H)."""
    p = params["embeddings"]
    dtype = jnp.dtype(cfg.dtype)
    if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
    pos = position_ids(cfg, input_ids, positions)
    x = p["word"][input_ids] + p["position"][pos] + p["token_type"][token_type_ids]
    x = L.layer_norm(p["norm"], x, cfg.layer_norm_eps).astype(dtype)
    return L.dropout(x, cfg.hidden_dropout, dropout_key)


def layer(p, cfg: BertConfig, x, bias, dropout_key=None):
    """One post-LN transformer layer: attention + residual + norm, MLP + residual + norm."""
    keys = [None] * 9 if dropout_key is None else list(jax.random.split(dropout_key, 9))
    a = p["attention"]
    ctx = L.self_attention(
        a, x, bias, num_heads=cfg.num_heads, dropout_rate=cfg.attention_dropout, dropout_key=keys[0],
        lora=cfg.lora, lora_keys=keys[3:6],
    )
    out = L.dense(a["output"], ctx, cfg.lora, keys[6])
    x = L.layer_norm(a["norm"], x + L.dropout(out, cfg.hidden_dropout, keys[1]), cfg.layer_norm_eps)
    m = p["mlp"]
    up = L.activation(cfg.hidden_act)(L.dense(m["up"], x, cfg.lora, keys[7]))
    y = L.dense(m["down"], up, cfg.lora, keys[8])
    return L.layer_norm(m["norm"], x + L.dropout(y, cfg.hidden_dropout, keys[2]), cfg.layer_norm_eps)


def apply(
    params,
    cfg: BertConfig,
    input_ids,
    attention_mask,
    *,
    token_type_ids=None,
    segment_ids=None,
    positions=None,
    dropout_key=None,
    num_layers: int | None = None,
    all_layers: bool = True,
    remat: bool | str = False,
    unroll: bool = True,
):
    """Runs the encoder.

    Args:
      params: the param pytree (see the module docstring); ``params["layers"]`` may also be a tuple
        of per-layer trees (``layers.unstacked``: no weight slicing inside the program).
      cfg: the static ``BertConfig``.
      input_ids, attention_mask: (B, T) integer arrays; mask is 1 for real tokens.
      token_type_ids: optional (B, T); zeros when omitted.
      segment_ids, positions: packed sequences (see ``embedjax.tokenize.Tokenizer.pack``):
        several texts share a row; ``segment_ids`` (B, T) numbers them (0 = padding) and a
        token attends only within its own segment; ``positions`` is each token's index
        within its text. The result equals running every text in a row of its own.
      dropout_key: a PRNG key turns dropout on; None (the default) is deterministic.
      num_layers: run only the first k layers (the rest are not computed).
      all_layers: return every hidden state (True) or only the last (False).
      remat: rematerialise each layer in the backward pass (saves activation memory): True, or a
        ``jax.checkpoint_policies`` name.
      unroll: unroll the layer scan in the compiled program. Faster (no stacking of each
        layer's residuals into scan buffers: ~20% of a CPU training step for MiniLM-L6);
        ``False`` keeps one copy of the layer (faster compiles for very deep models).

    Returns:
      ``(k + 1, B, T, H)`` hidden states -- index 0 is the embedding output and index i
      the output of layer i, as Hugging Face's ``hidden_states`` -- or ``(B, T, H)`` for
      the last layer when ``all_layers=False``.
    """
    stack, k = L.first_layers(params["layers"], cfg.num_layers, num_layers)

    emb_key, layer_keys = None, None
    if dropout_key is not None:
        emb_key, layers_key = jax.random.split(dropout_key)
        layer_keys = jax.random.split(layers_key, k)

    x = embed_tokens(params, cfg, input_ids, token_type_ids, emb_key, positions)
    if segment_ids is None:
        bias = L.attention_bias(attention_mask, jnp.float32)
    else:
        bias = L.segment_attention_bias(jnp.where(attention_mask > 0, segment_ids, 0), jnp.float32)

    def body(h, xs):
        p, key = xs
        h = layer(p, cfg, h, bias, key)
        return h, (h if all_layers else None)

    last, hidden = L.scan_layers(body, x, stack, layer_keys, unroll=unroll, remat=remat)
    if all_layers:
        return jnp.concatenate([x[None], hidden], axis=0)
    return last


# --------------------------------------------------------------------------- Hugging Face names

# Per-layer tensors: (our path inside params['layers'], torch name inside encoder.layer.{i}).
_LAYER_MAP = [
    (("attention", "query"), "attention.self.query"),
    (("attention", "key"), "attention.self.key"),
    (("attention", "value"), "attention.self.value"),
    (("attention", "output"), "attention.output.dense"),
    (("attention", "norm"), "attention.output.LayerNorm"),
    (("mlp", "up"), "intermediate.dense"),
    (("mlp", "down"), "output.dense"),
    (("mlp", "norm"), "output.LayerNorm"),
]
_EMBEDDING_MAP = [
    ("word", "embeddings.word_embeddings"),
    ("position", "embeddings.position_embeddings"),
    ("token_type", "embeddings.token_type_embeddings"),
    ("norm", "embeddings.LayerNorm"),
]
# Tensors a base-model checkpoint may carry that an encoder does not use.
_IGNORED = re.compile(r"^(pooler\.|cls\.|lm_head\.|embeddings\.position_ids$|qa_outputs\.|classifier\.)")
_PREFIXES = ("bert.", "roberta.", "xlm_roberta.", "model.", "encoder_model.")


def _legacy(name: str):
    # Old TF-converted checkpoints call layer-norm params gamma/beta.
    return (name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"),)


def params_from_state_dict(state: dict, cfg: BertConfig) -> dict:
    """Maps a PyTorch-named state dict (``BertModel``, ``bert.``-prefixed task models, RoBERTa,
    XLM-R) onto the param tree; ``CheckpointError`` lists every missing and unexpected tensor."""
    state = statedict.strip_prefix(state, _PREFIXES, "embeddings.")
    reader = statedict.Reader(state, _legacy)

    def linear(name: str):
        return {"kernel": reader.take(f"{name}.weight", transpose=True), "bias": reader.take(f"{name}.bias")}

    def norm(name: str):
        return {"scale": reader.take(f"{name}.weight"), "bias": reader.take(f"{name}.bias")}

    emb = {ours: norm(theirs) if ours == "norm" else reader.take(f"{theirs}.weight") for ours, theirs in _EMBEDDING_MAP}
    per_layer = []
    for i in range(cfg.num_layers):
        layer: dict[str, Any] = {"attention": {}, "mlp": {}}
        for (group, ours), theirs in _LAYER_MAP:
            full = f"encoder.layer.{i}.{theirs}"
            layer[group][ours] = norm(full) if ours == "norm" else linear(full)
        per_layer.append(layer)
    reader.check(f"a {cfg.model_type} encoder with {cfg.num_layers} layers", _IGNORED)
    params = {"embeddings": emb, "layers": statedict.stack_layers(per_layer)}
    statedict.check_shapes(params, jax.eval_shape(lambda: init(cfg, jax.random.key(0))))
    return params


def state_dict_from_params(params: dict, cfg: BertConfig) -> dict:
    """The inverse of ``params_from_state_dict``: PyTorch names, (out, in) linear weights, no model
    prefix (as ``BertModel.save_pretrained`` writes them)."""
    params = jax.device_get(params)
    out: dict[str, Any] = {}
    emb = params["embeddings"]
    for ours, theirs in _EMBEDDING_MAP:
        if ours == "norm":
            out[f"{theirs}.weight"], out[f"{theirs}.bias"] = emb["norm"]["scale"], emb["norm"]["bias"]
        else:
            out[f"{theirs}.weight"] = emb[ours]
    for i in range(cfg.num_layers):
        for (group, ours), theirs in _LAYER_MAP:
            p = params["layers"][group][ours]
            name = f"encoder.layer.{i}.{theirs}"
            if ours == "norm":
                out[f"{name}.weight"], out[f"{name}.bias"] = p["scale"][i], p["bias"][i]
            else:
                out[f"{name}.weight"], out[f"{name}.bias"] = p["kernel"][i].T, p["bias"][i]
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}


# --------------------------------------------------------------------------- sharding, weight decay

# FSDP x tensor parallelism. Big matrices shard one non-layer axis over 'fsdp' and the other over
# 'model' (Megatron: q/k/v/up split their outputs, output/down their inputs, so each attention head
# and MLP slice stays on one 'model' device); the leading stacked layer axis stays None (lax.scan
# slices it). Embedding tables shard the HIDDEN axis: vocabularies (30522, 250002) rarely divide the
# mesh, hidden sizes always do. LoRA adapters follow their kernel's in / out axes. No catch-all: a new
# parameter must get a rule (or the `.*` of sharding.REPLICATED_RULES) on purpose.
SHARDING_RULES = (
    (r"^embeddings/(word|position)$", P(None, "fsdp")),
    (r"^embeddings/token_type$", P()),
    (r"/(bias|scale)$", P()),
    (r"^layers/(attention/output|mlp/down)/lora_a$", P(None, "model", None)),
    (r"/lora_a$", P(None, "fsdp", None)),
    (r"^layers/(attention/(query|key|value)|mlp/up)/lora_b$", P(None, None, "model")),
    (r"/lora_b$", P(None, None, "fsdp")),
    (r"^layers/attention/(query|key|value)/kernel$", P(None, "fsdp", "model")),  # (L, H, H)
    (r"^layers/attention/output/kernel$", P(None, "model", "fsdp")),
    (r"^layers/mlp/up/kernel$", P(None, "fsdp", "model")),  # (L, H, I)
    (r"^layers/mlp/down/kernel$", P(None, "model", "fsdp")),  # (L, I, H)
)
# Biases, layer norms and embedding tables get no weight decay (BERT's convention).
NO_DECAY = r"(bias|scale)$|^embeddings/"

BACKBONE = registry.register(registry.Backbone(
    name="bert", model_types=SUPPORTED_MODEL_TYPES, config_from_hf=BertConfig.from_hf, init=init, apply=apply,
    params_from_state_dict=params_from_state_dict, state_dict_from_params=state_dict_from_params,
    sharding_rules=SHARDING_RULES, no_decay=NO_DECAY, unstacked_layers=True,
    dense_modules=tuple(("layers/" + "/".join(ours), f"encoder.layer.{{i}}.{theirs}")
                        for ours, theirs in _LAYER_MAP if ours[1] != "norm"),
    # BertModel / RobertaModel / XLMRobertaModel build a pooler (dense + tanh over [CLS]) no embedding reads
    unused_tensors=lambda cfg: {"pooler.dense.weight": (cfg.hidden_size, cfg.hidden_size),
                                "pooler.dense.bias": (cfg.hidden_size,)},
))
