"""Decoder-LLM backbones as pure functions: Llama (incl. Llama-3 RoPE scaling), Mistral, Qwen2,
Qwen3, Gemma 2 and Gemma 3 (text), one generic module behind the backbone seam
(``embedjax/encoders/registry.py``).

The families differ only in switches of ``DecoderConfig``:

* Llama / Mistral: pre-norm RMSNorm blocks, rotary embeddings, grouped K/V heads, SwiGLU MLP;
  Mistral adds a sliding attention window on every layer.
* Qwen2: biases on q/k/v; optional sliding window on the layers past ``max_window_layers``.
* Qwen3: per-head RMSNorm on queries and keys before the rotation (``qk_norm``), explicit ``head_dim``.
* Gemma 2: embeddings times ``sqrt(hidden_size)`` (in the compute dtype), RMSNorm weights stored as
  offsets from 1, norms before *and* after attention and MLP (``sandwich_norm``), GeGLU with tanh
  GELU, attention-logit soft-capping, sliding and full layers alternating, scores scaled by
  ``query_pre_attn_scalar ** -0.5``.
* Gemma 3 (``gemma3_text``): Gemma 2 plus q/k norms, a separate RoPE base for the sliding layers
  (``local_rope_theta``) and the ``layer_types`` pattern; no soft-capping.

``attention`` picks the mask per run (``dataclasses.replace(cfg, attention=...)``): ``"causal"``
as pretrained, or ``"bidirectional"`` (padding-only; every token sees the whole text), the
LLM2Vec (arXiv:2404.05961) / NV-Embed (arXiv:2405.17428) recipe for turning a decoder into an
embedding encoder. A sliding layer keeps a window in both modes: causal ``i - j < window``;
bidirectional ``|i - j| <= window // 2`` (Gemma 3's ``use_bidirectional_attention`` convention),
which is padding-only whenever the text is shorter than half the window.

Param tree (kernels ``(in, out)``; ``L`` layers stacked on a leading axis and run under
``lax.scan``, as in ``bert.py``; N query heads, K key/value heads of size D)::

    embed (V, H)
    layers: attention: q {kernel (L, H, N*D)[, bias]}, k / v {kernel (L, H, K*D)[, bias]},
                       o {kernel (L, N*D, H)[, bias]}[, q_norm / k_norm {scale (L, D)}]
            mlp:       gate / up {kernel (L, H, I)[, bias]}, down {kernel (L, I, H)[, bias]}
            input_norm, post_attention_norm[, pre_feedforward_norm, post_feedforward_norm] {scale (L, H)}
    final_norm {scale (H,)}

The norm names follow Hugging Face's: in Llama-style blocks ``post_attention_norm`` is the norm
*before* the MLP (``post_attention_layernorm``); Gemma's sandwich blocks apply it to the attention
output and add ``pre_feedforward_norm`` / ``post_feedforward_norm`` around the MLP.

Hidden states match Hugging Face's ``output_hidden_states``: index 0 is the embedding output,
index i the output of layer i, and the last entry of a full run is taken after the final norm.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from embedjax.encoders import layers as L
from embedjax.encoders import registry, statedict

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")
FULL, SLIDING = "full_attention", "sliding_attention"
_ARCHITECTURES = {
    "llama": "LlamaModel", "mistral": "MistralModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model",
    "gemma2": "Gemma2Model", "gemma3_text": "Gemma3TextModel",
}
# The defaults of each family's Hugging Face config class, for keys a config.json may leave out
# (Gemma 3's nested text_config lists only what differs from them).
_FAMILY_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=2048, rope_theta=10000.0,
                  bos_token_id=1, eos_token_id=2),
    "mistral": dict(rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=131072, rope_theta=10000.0,
                    bos_token_id=1, eos_token_id=2, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=32768, rope_theta=10000.0,
                  sliding_window=4096, max_window_layers=28),
    "qwen3": dict(rms_norm_eps=1e-6, hidden_act="silu", max_position_embeddings=32768, rope_theta=10000.0,
                  sliding_window=4096, max_window_layers=28, head_dim=128),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                   max_position_embeddings=8192, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                   rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                   attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                        pad_token_id=0, eos_token_id=1, bos_token_id=2, rope_theta=1_000_000.0,
                        rope_local_base_freq=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                        sliding_window_pattern=6, attn_logit_softcapping=None),
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Static architecture description (hashable: a jit static argument). ``dtype`` is the compute
    dtype; parameters stay float32.

    ``rope_scaling`` holds the full-attention layers' RoPE type and parameters as sorted
    ``(key, value)`` pairs (``rope_type`` among them; empty = plain RoPE with ``rope_theta``).
    ``local_rope_theta`` is the base of the sliding layers when it differs (Gemma 3).
    ``layer_types`` gives each layer ``"full_attention"`` or ``"sliding_attention"``; a sliding
    layer attends within ``sliding_window`` tokens (a sliding layer with no window is full).
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()
    local_rope_theta: float | None = None
    max_position_embeddings: int = 4096
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_plus_one: bool = False       # Gemma: RMSNorm multiplies by (1 + weight)
    sandwich_norm: bool = False       # Gemma: norms before and after attention and MLP
    scale_embeddings: bool = False    # Gemma: embeddings * sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # scores scaled by this ** -0.5 (else head_dim ** -0.5)
    attn_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple = ()
    max_window_layers: int | None = None  # Qwen2/3: kept for to_hf
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: Any = None
    attention: str = "causal"
    dtype: str = "float32"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    lora: Any = None  # embedjax.lora.LoraSpec when the params carry adapters

    def __post_init__(self):
        if self.attention not in ("causal", "bidirectional"):
            raise ValueError(f"attention must be 'causal' or 'bidirectional', got {self.attention!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = set(self.layer_types) - {FULL, SLIDING}
        if bad:
            raise ValueError(f"unsupported layer_types {sorted(bad)}; supported: {FULL!r}, {SLIDING!r}")

    @property
    def max_length(self) -> int:
        """Longest input the positions allow (the pretrained context length)."""
        return self.max_position_embeddings

    @property
    def rope(self) -> dict:
        """The full-attention layers' RoPE parameters as a ``config.json`` ``rope_parameters`` dict."""
        return {"rope_type": "default", **dict(self.rope_scaling), "rope_theta": self.rope_theta}

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "DecoderConfig":
        """Builds the config from a Hugging Face ``config.json`` dict (transformers 4 and 5 layouts:
        ``rope_theta`` / ``rope_scaling`` or ``rope_parameters``, flat or per layer type). A
        ``gemma3`` (multimodal) config reads its ``text_config``."""
        model_type = hf.get("model_type")
        if model_type == "gemma3":
            hf = {**hf.get("text_config", {}), "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type not in _ARCHITECTURES:
            raise statedict.CheckpointError(
                f"unsupported architecture model_type={model_type!r} (architectures={hf.get('architectures')}); "
                f"embedjax's decoder supports {SUPPORTED_MODEL_TYPES}")
        d = {**_FAMILY_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k in (
            "attn_logit_softcapping", "sliding_window", "head_dim", "pad_token_id", "bos_token_id", "eos_token_id")}}
        gemma = model_type.startswith("gemma")
        n_layers, n_heads = d["num_hidden_layers"], d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // n_heads

        # RoPE: full layers, and the sliding layers' base when it differs (Gemma 3).
        rp = d.get("rope_parameters")
        local_theta = None
        if isinstance(rp, Mapping) and (FULL in rp or SLIDING in rp):
            full = dict(rp.get(FULL) or {})
            local = dict(rp.get(SLIDING) or {})
            full.setdefault("rope_theta", d["rope_theta"])
            if local:
                if local.get("rope_type", local.get("type", "default")) != "default":
                    raise ValueError(f"unsupported RoPE scaling on sliding layers: {local}")
                local_theta = float(local.get("rope_theta", d.get("rope_local_base_freq", d["rope_theta"])))
        else:
            full = dict(rp or {})
            full.update(d.get("rope_scaling") or {})
            full.setdefault("rope_theta", d["rope_theta"])
            if model_type == "gemma3_text":
                local_theta = float(d.get("rope_local_base_freq", 10000.0))
        theta = float(full.pop("rope_theta"))
        kind = full.pop("rope_type", full.pop("type", "default")) or "default"
        full.pop("type", None)
        rope_scaling = () if kind == "default" else tuple(sorted({"rope_type": kind, **full}.items()))
        L.rope_frequencies(head_dim, theta, dict(rope_scaling), d["max_position_embeddings"])  # validates

        # Which layers slide, and over how many tokens.
        window = d.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
            window = None
        if d.get("layer_types"):
            types = tuple(d["layer_types"])
        elif model_type == "mistral":
            types = (SLIDING if window else FULL,) * n_layers
        elif model_type in ("qwen2", "qwen3"):
            types = tuple(SLIDING if window is not None and i >= d["max_window_layers"] else FULL
                          for i in range(n_layers))
        elif model_type == "gemma2":
            types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n_layers))
        elif model_type == "gemma3_text":
            pattern = d.get("sliding_window_pattern") or 6
            types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n_layers))
        else:
            types = (FULL,) * n_layers
        if local_theta is not None and local_theta == theta and not rope_scaling:
            local_theta = None

        pad = d.get("pad_token_id")
        eos = d.get("eos_token_id")
        if pad is None:
            pad = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) if eos is not None else 0
        attention_bias = bool(d.get("attention_bias", False))
        fields = dict(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            intermediate_size=d["intermediate_size"],
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            local_rope_theta=local_theta,
            max_position_embeddings=d["max_position_embeddings"],
            hidden_act=(d.get("hidden_activation") or d.get("hidden_act")) if gemma else d.get("hidden_act", "silu"),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_plus_one=gemma,
            sandwich_norm=gemma,
            scale_embeddings=gemma,
            query_pre_attn_scalar=float(d["query_pre_attn_scalar"]) if gemma else None,
            attn_logit_softcap=(float(d["attn_logit_softcapping"]) if d.get("attn_logit_softcapping") else None),
            sliding_window=int(window) if window else None,
            layer_types=types,
            max_window_layers=d.get("max_window_layers") if model_type in ("qwen2", "qwen3") else None,
            pad_token_id=int(pad),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            attention="bidirectional" if model_type == "gemma3_text" and d.get("use_bidirectional_attention")
            else "causal",
            attention_dropout=float(d.get("attention_dropout") or 0.0),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """The Hugging Face ``config.json`` dict (``rope_theta`` / ``rope_scaling``, which transformers
        4 reads and transformers 5 converts). ``attention="bidirectional"`` is written as Gemma 3's
        ``use_bidirectional_attention``; the other families have no such field (their config
        describes the causal model)."""
        mt = self.model_type
        gemma = mt.startswith("gemma")
        out = {
            "architectures": [_ARCHITECTURES[mt]],
            "model_type": mt,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation" if gemma else "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "attention_dropout": self.attention_dropout,
        }
        if self.rope_scaling:
            out["rope_scaling"] = dict(self.rope_scaling)
        if mt in ("llama", "qwen3", "gemma2", "gemma3_text"):
            out["attention_bias"] = self.qkv_bias
        if mt == "llama":
            out["mlp_bias"] = self.mlp_bias
        if mt == "mistral":
            out["sliding_window"] = self.sliding_window
        if mt in ("qwen2", "qwen3"):
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
            out["max_window_layers"] = self.max_window_layers if self.max_window_layers is not None else self.num_layers
            out["layer_types"] = list(self.layer_types)
        if gemma:
            qpas = self.query_pre_attn_scalar
            out["query_pre_attn_scalar"] = int(qpas) if float(qpas).is_integer() else qpas  # int in transformers 5
            out["attn_logit_softcapping"] = self.attn_logit_softcap
            out["sliding_window"] = self.sliding_window
            out["layer_types"] = list(self.layer_types)
        if mt == "gemma3_text":
            out["rope_local_base_freq"] = self.local_rope_theta if self.local_rope_theta is not None else self.rope_theta
            out["use_bidirectional_attention"] = self.attention == "bidirectional"
        return out


# --------------------------------------------------------------------------- init


def _norm_names(cfg: DecoderConfig) -> tuple[str, ...]:
    names = ("input_norm", "post_attention_norm")
    return names + ("pre_feedforward_norm", "post_feedforward_norm") if cfg.sandwich_norm else names


def init(cfg: DecoderConfig, key) -> dict:
    """Random parameters: normal(0.02) kernels and embeddings, zero biases, unit norms (zeros where
    the norm multiplies by 1 + weight)."""
    h, n, d = cfg.hidden_size, cfg.num_layers, cfg.head_dim
    keys = iter(jax.random.split(key, 16))

    def normal(*shape):
        return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

    def linear(d_in, d_out, bias):
        p = {"kernel": normal(n, d_in, d_out)}
        if bias:
            p["bias"] = jnp.zeros((n, d_out), jnp.float32)
        return p

    def norm(*shape):
        return {"scale": (jnp.zeros if cfg.norm_plus_one else jnp.ones)(shape, jnp.float32)}

    q_out, kv_out = cfg.num_heads * d, cfg.num_kv_heads * d
    attention = {
        "q": linear(h, q_out, cfg.qkv_bias),
        "k": linear(h, kv_out, cfg.qkv_bias),
        "v": linear(h, kv_out, cfg.qkv_bias),
        "o": linear(q_out, h, cfg.o_bias),
    }
    if cfg.qk_norm:
        attention["q_norm"], attention["k_norm"] = norm(n, d), norm(n, d)
    i = cfg.intermediate_size
    mlp = {"gate": linear(h, i, cfg.mlp_bias), "up": linear(h, i, cfg.mlp_bias), "down": linear(i, h, cfg.mlp_bias)}
    layer = {"attention": attention, "mlp": mlp, **{name: norm(n, h) for name in _norm_names(cfg)}}
    return {"embed": normal(cfg.vocab_size, h), "layers": layer, "final_norm": norm(h)}


# --------------------------------------------------------------------------- forward


def _variant(cfg: DecoderConfig, layer_type: str, length: int):
    """What makes a layer's computation differ: (attention window or None, sliding RoPE or not).
    A window that cannot bind at this sequence length is dropped."""
    sliding = layer_type == SLIDING
    window = None
    if sliding and cfg.sliding_window:
        w = cfg.sliding_window
        if cfg.attention == "causal":
            window = (w - 1, 0) if length > w else None
        else:
            window = (w // 2, w // 2) if length - 1 > w // 2 else None
    return window, sliding and cfg.local_rope_theta is not None


def layer(p, cfg: DecoderConfig, x, rope, mask_args, window, dropout_key=None, edit_context=None):
    """One decoder block. ``rope``: (cos, sin) for this layer's positions; ``mask_args``: the
    ``lengths`` / ``segment_ids`` for ``layers.attention``; ``window``: its (left, right) or None;
    ``edit_context``: None, or a function of the heads' concatenated outputs (B, T, N*D), the
    input of the output projection, returning what the projection reads (Contrastive Prompting)."""
    keys = [None] * 10 if dropout_key is None else list(jax.random.split(dropout_key, 10))
    b, t, _ = x.shape
    a = p["attention"]
    norm = lambda q, y: L.rms_norm(q, y, cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)

    y = norm(p["input_norm"], x)
    q = L.dense(a["q"], y, cfg.lora, keys[0]).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = L.dense(a["k"], y, cfg.lora, keys[1]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = L.dense(a["v"], y, cfg.lora, keys[2]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = norm(a["q_norm"], q), norm(a["k_norm"], k)
    q, k = L.rotate(q, *rope), L.rotate(k, *rope)
    scale = (cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar else cfg.head_dim) ** -0.5
    ctx = L.attention(q, k, v, **mask_args, causal=cfg.attention == "causal", window=window,
                      softcap=cfg.attn_logit_softcap, scale=scale, dropout_rate=cfg.attention_dropout,
                      dropout_key=keys[3])
    ctx = ctx.reshape(b, t, -1)
    if edit_context is not None:
        ctx = edit_context(ctx)
    out = L.dense(a["o"], ctx, cfg.lora, keys[4])
    if cfg.sandwich_norm:
        out = norm(p["post_attention_norm"], out)
    x = x + L.dropout(out, cfg.hidden_dropout, keys[5])

    m = p["mlp"]
    y = norm(p["pre_feedforward_norm" if cfg.sandwich_norm else "post_attention_norm"], x)
    act = L.activation(cfg.hidden_act)
    hidden = act(L.dense(m["gate"], y, cfg.lora, keys[6])) * L.dense(m["up"], y, cfg.lora, keys[7])
    out = L.dense(m["down"], hidden, cfg.lora, keys[8])
    if cfg.sandwich_norm:
        out = norm(p["post_feedforward_norm"], out)
    return x + L.dropout(out, cfg.hidden_dropout, keys[9])


def embed_tokens(params, cfg: DecoderConfig, input_ids):
    """Token embeddings in the compute dtype (times sqrt(hidden_size), rounded to that dtype, for Gemma)."""
    dtype = jnp.dtype(cfg.dtype)
    x = params["embed"][input_ids].astype(dtype)
    if cfg.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    return x


# --------------------------------------------------------------------------- training-free options

STEERING_STRATEGIES = ("scaled", "norm", "scaled_norm", "sub_head_norm")


@dataclasses.dataclass(frozen=True)
class TokenPrepending:
    """Token Prepending (arXiv:2412.11556), ``apply``'s ``token_prepending`` (static, hashable).

    The rule of the official code (``fuyuchenIfyw/token_prepending``, ``senllm/modeling_llama.py``,
    ``LlamaModel.forward`` with ``plan == "tp"``): before each layer ``i`` with
    ``start <= i < stop`` (0-based; the official ``tp_starting_index`` / ``tp_exiting_index``),
    the hidden state of the placeholder token (the first ``token_id`` of the row; ``<PST>`` there)
    is replaced by the last token's hidden state at that point, the previous layer's output (the
    embeddings before layer 0). Causal attention then lets the tokens after the placeholder read
    a summary of the whole text. ``stop`` None: up to the last layer (the official default
    ``tp_exiting_index=99`` never stops). A row without the placeholder is left as it is.
    """

    token_id: int
    start: int = 1
    stop: int | None = None

    def span(self, cfg: DecoderConfig, vocab_rows: int) -> tuple[int, int]:
        """``(start, stop)`` checked against the model: ``0 <= start < stop <= num_layers``."""
        stop = cfg.num_layers if self.stop is None else int(self.stop)
        if not 0 <= int(self.start) < stop <= cfg.num_layers:
            raise ValueError(f"token_prepending: layers start={self.start}, stop={self.stop} must satisfy "
                             f"0 <= start < stop <= {cfg.num_layers} (this model's layers)")
        if not 0 <= int(self.token_id) < vocab_rows:
            raise ValueError(f"token_prepending: token_id {self.token_id} is outside the embedding's {vocab_rows} "
                             "rows (embedjax.prompting.add_placeholder adds the placeholder)")
        return int(self.start), stop


@dataclasses.dataclass(frozen=True)
class ContrastivePrompting:
    """Contrastive Prompting (arXiv:2505.12831), ``apply``'s ``contrastive_prompting`` (static).

    The rule of the official code (``zifengcheng/CP``: ``evaluate_intervention.py`` and the hooks
    of ``activation_intervention/__init__.py``): every text is run twice, with its prompt and with
    an auxiliary prompt (``"The irrelevant information of this sentence : ..."``). At layer
    ``layer`` (0-based, the official ``act_layer``), the input of the attention output projection
    (``o_proj``: the heads' concatenated outputs) at the last token is A for the prompt and B for
    the auxiliary prompt, and the prompt's A is replaced (the official ``intervention_plan``):

    * ``scaled``: ``coeff * (A - B)`` (the official scripts' choice);
    * ``norm``: ``(A - B) * |A| / (|A - B| + 1e-7)``;
    * ``scaled_norm``: ``coeff * (A - B) * |A| / (|A - B| + 1e-7)``;
    * ``sub_head_norm``: ``norm`` within each attention head's slice.

    Only the last token changes at that layer (causal attention: no other token reads it), so
    its state above that layer is what is steered.
    """

    layer: int
    coeff: float = 1.0
    strategy: str = "scaled"

    def check(self, k: int) -> int:
        """The steered layer, checked against ``k``, the number of layers run."""
        if self.strategy not in STEERING_STRATEGIES:
            raise ValueError(f"contrastive_prompting: unknown strategy {self.strategy!r}; "
                             f"choose one of {STEERING_STRATEGIES}")
        if not 0 <= int(self.layer) < k:
            raise ValueError(f"contrastive_prompting: layer {self.layer} must be in 0..{k - 1} "
                             f"(the {k} layers run)")
        return int(self.layer)


def steer(a, b, spec: ContrastivePrompting, num_heads: int):
    """Contrastive Prompting's replacement of A (``ContrastivePrompting``): a, b (N, heads * D) ->
    (N, heads * D) float32."""
    a = a.astype(jnp.float32)
    diff = a - b.astype(jnp.float32)
    if spec.strategy == "scaled":
        return spec.coeff * diff
    if spec.strategy == "sub_head_norm":
        ah, dh = a.reshape(a.shape[0], num_heads, -1), diff.reshape(a.shape[0], num_heads, -1)
        out = dh * jnp.linalg.norm(ah, axis=-1, keepdims=True) / (jnp.linalg.norm(dh, axis=-1, keepdims=True) + 1e-7)
        return out.reshape(a.shape)
    out = diff * jnp.linalg.norm(a, axis=-1, keepdims=True) / (jnp.linalg.norm(diff, axis=-1, keepdims=True) + 1e-7)
    return spec.coeff * out if spec.strategy == "scaled_norm" else out


def _at(h, index):
    """h (B, T, ...) at one position per row: index (B,) -> (B, ...)."""
    return jnp.take_along_axis(h, index.reshape(-1, *([1] * (h.ndim - 1))), axis=1)[:, 0]


def _prepender(input_ids, attention_mask, last, token_id: int):
    """Token Prepending's edit of a layer's input: the placeholder's state := the last token's."""
    slot = (input_ids == token_id) & (attention_mask > 0)
    first = jnp.argmax(slot, axis=1)
    target = (jnp.arange(input_ids.shape[1])[None] == first[:, None]) & jnp.any(slot, axis=1)[:, None]

    def prepend(h):
        return jnp.where(target[..., None], _at(h, last)[:, None], h)

    return prepend


def _steerer(spec: ContrastivePrompting, last, n: int, num_heads: int):
    """Contrastive Prompting's edit of the steered layer's ``o_proj`` input over 2n rows (n prompts,
    then their n auxiliary prompts): the prompts' last-token entries replaced by ``steer``."""

    def edit(ctx):
        at_last = _at(ctx, last)
        new = steer(at_last[:n], at_last[n:], spec, num_heads).astype(ctx.dtype)
        is_last = jnp.arange(ctx.shape[1])[None] == last[:n, None]
        return jnp.concatenate([jnp.where(is_last[..., None], new[:, None], ctx[:n]), ctx[n:]], axis=0)

    return edit


def _run_layers(cfg: DecoderConfig, stack, keys, h, lo: int, hi: int, ropes, mask_args, *, all_layers: bool,
                remat, unroll, prepend=None, prepend_span=(0, 0), edit_context=None):
    """Layers ``lo..hi-1`` of the (first-k) stack under ``lax.scan``: ``(last state, every output
    (hi - lo, B, T, H) or None)``. ``prepend``: Token Prepending's edit, applied before the layers
    of ``prepend_span``; ``edit_context``: ``layer``'s, on every layer run here."""
    if hi <= lo:
        return h, (jnp.zeros((0, *h.shape), h.dtype) if all_layers else None)
    if (lo, hi) != (0, jax.tree.leaves(stack)[0].shape[0]):
        stack = jax.tree.map(lambda w: w[lo:hi], stack)
    t = h.shape[1]
    variants = [_variant(cfg, kind, t) for kind in cfg.layer_types[lo:hi]]
    distinct = sorted(set(variants), key=variants.index)

    def branch(variant):
        window, local = variant

        def run(p, x, key):
            return layer(p, cfg, x, ropes[1 if local else 0], mask_args, window, key, edit_context)

        return run

    branches = [branch(v) for v in distinct]
    which = jnp.asarray([distinct.index(v) for v in variants], jnp.int32)
    if keys is not None and (lo, hi) != (0, keys.shape[0]):
        keys = keys[lo:hi]
    xs = (stack, keys, which)
    if prepend is not None:  # which layers get Token Prepending's edit
        xs += (jnp.asarray([prepend_span[0] <= i < prepend_span[1] for i in range(lo, hi)]),)

    def body(x, xs):
        p, key, idx = xs[:3]
        if prepend is not None:
            x = jnp.where(xs[3], prepend(x), x)
        if len(branches) == 1:
            x = branches[0](p, x, key)
        else:
            x = jax.lax.switch(idx, branches, p, x, key)
        return x, (x if all_layers else None)

    return jax.lax.scan(L.rematerialized(body, remat), h, xs, unroll=unroll)


def _check_options(cfg, params, segment_ids, rows: int, k: int, token_prepending, contrastive_prompting):
    """Token Prepending's layer span (or None) and Contrastive Prompting's layer (or None), checked."""
    if token_prepending is None and contrastive_prompting is None:
        return None, None
    names = [n for n, o in (("token_prepending", token_prepending), ("contrastive_prompting", contrastive_prompting))
             if o is not None]
    if segment_ids is not None:
        raise ValueError(f"{' and '.join(names)} cannot run on packed rows (segment_ids given): each method edits "
                         "the state of a row's last token, one text per row; pad the texts instead (embed, not "
                         "embed_packed)")
    if len(names) == 2:
        raise ValueError("token_prepending and contrastive_prompting together are not supported; choose one")
    if token_prepending is not None:
        return token_prepending.span(cfg, params["embed"].shape[0]), None
    if rows % 2:
        raise ValueError(f"contrastive_prompting: the rows are the prompts then their auxiliary prompts, so their "
                         f"number must be even, got {rows}")
    return None, contrastive_prompting.check(k)


def apply(
    params,
    cfg: DecoderConfig,
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
    unroll: bool | int = True,
    token_prepending: TokenPrepending | None = None,
    contrastive_prompting: ContrastivePrompting | None = None,
):
    """Runs the decoder as an encoder (the shared ``apply`` of ``embedjax/encoders/registry.py``).

    Args:
      params, cfg: the param pytree (module docstring) and the static ``DecoderConfig``.
      input_ids, attention_mask: (B, T) integer arrays; the mask is 1 on real tokens, which come
        first in each row (right padding, as ``embedjax.tokenize.Tokenizer.pad`` writes).
      token_type_ids: ignored (decoders have no token types).
      segment_ids, positions: packed rows (``Tokenizer.pack``): ``segment_ids`` numbers the texts
        of a row (0 = padding), a token attends only within its own text, and ``positions`` is
        each token's index within its text (the RoPE position). The result equals running every
        text in a row of its own.
      dropout_key: a PRNG key turns dropout on (hidden, attention, LoRA); None is deterministic.
      num_layers: run only the first k layers (the rest are not computed).
      all_layers: return every hidden state (True) or only the last (False).
      remat: rematerialise each layer in the backward pass: True (save nothing) or the name of a
        ``jax.checkpoint_policies`` policy, e.g. ``"dots_with_no_batch_dims_saveable"``.
      unroll: ``lax.scan``'s unroll (True: fully unrolled; False / 1: one compiled layer).
      token_prepending: a ``TokenPrepending`` (static): the placeholder's state is replaced by the
        last token's before the layers it names (arXiv:2412.11556). None: off.
      contrastive_prompting: a ``ContrastivePrompting`` (static; arXiv:2505.12831): the 2B rows are
        B prompts, then the B auxiliary prompts of the same texts in the same order; the prompts'
        last-token attention output is steered away from the auxiliary one's at its layer, and
        only the B prompt rows are returned. None: off.
      Neither option runs on packed rows (``segment_ids``), nor both together: ValueError.

    Returns:
      ``(k + 1, B, T, H)`` hidden states as Hugging Face's ``output_hidden_states``: index 0 the
      embeddings, index i the output of layer i, and, when all layers run, the last one after the
      final norm -- or only the last of them (B, T, H) with ``all_layers=False``.
    """
    del token_type_ids
    stack, k = L.first_layers(params["layers"], cfg.num_layers, num_layers)
    b, t = input_ids.shape
    span, steered = _check_options(cfg, params, segment_ids, b, k, token_prepending, contrastive_prompting)

    layer_keys = None
    if dropout_key is not None:
        layer_keys = jax.random.split(dropout_key, k)

    x = embed_tokens(params, cfg, input_ids)
    lengths = jnp.sum(attention_mask > 0, axis=-1).astype(jnp.int32)
    if segment_ids is None:
        mask_args = {"lengths": lengths}
    else:
        mask_args = {"segment_ids": jnp.where(attention_mask > 0, segment_ids, 0)}
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    inv_freq, factor = L.rope_frequencies(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling),
                                          cfg.max_position_embeddings)
    ropes = [L.rope_cos_sin(positions, inv_freq, factor)]
    if cfg.local_rope_theta is not None:
        local_freq, _ = L.rope_frequencies(cfg.head_dim, cfg.local_rope_theta)
        ropes.append(L.rope_cos_sin(positions, local_freq))

    run = functools.partial(_run_layers, cfg, stack, layer_keys, all_layers=all_layers, remat=remat, unroll=unroll)
    last_index = jnp.maximum(lengths - 1, 0)
    if steered is None:
        prepend = None
        if span is not None:
            prepend = _prepender(input_ids, attention_mask, last_index, token_prepending.token_id)
        last, hidden = run(x, 0, k, ropes, mask_args, prepend=prepend, prepend_span=span or (0, 0))
    else:  # prompts and auxiliary prompts up to the steered layer, then the prompts alone
        n = b // 2
        edit = _steerer(contrastive_prompting, last_index, n, cfg.num_heads)
        h, below = run(x, 0, steered, ropes, mask_args)
        h, at = run(h, steered, steered + 1, ropes, mask_args, edit_context=edit)
        half = lambda a: a[:n]  # noqa: E731
        x = x[:n]
        last, above = run(h[:n], steered + 1, k, jax.tree.map(half, ropes), {"lengths": lengths[:n]})
        hidden = jnp.concatenate([below[:, :n], at[:, :n], above], axis=0) if all_layers else None
    if k == cfg.num_layers:
        last = L.rms_norm(params["final_norm"], last, cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)
    if all_layers:
        return jnp.concatenate([x[None], hidden[:-1], last[None]], axis=0)
    return last


# --------------------------------------------------------------------------- Hugging Face names

_ATTENTION_MAP = [("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")]
_MLP_MAP = [("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")]
_NORM_MAP = {
    "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_feedforward_norm": "pre_feedforward_layernorm",
    "post_feedforward_norm": "post_feedforward_layernorm",
}
# Tensors a checkpoint may carry that the encoder does not use: LM / classification heads, RoPE
# buffers of old checkpoints, and the vision half of a multimodal Gemma 3.
_IGNORED = re.compile(r"^(lm_head\.|score\.|classifier\.|.*rotary_emb\.inv_freq$|(model\.)?(vision_tower|"
                      r"multi_modal_projector)\.)")
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def _bias(cfg: DecoderConfig, ours: str) -> bool:
    if ours in ("q", "k", "v"):
        return cfg.qkv_bias
    if ours == "o":
        return cfg.o_bias
    return cfg.mlp_bias


def params_from_state_dict(state: dict, cfg: DecoderConfig) -> dict:
    """Maps a PyTorch-named state dict onto the param tree: base-model names (``embed_tokens.weight``,
    ``layers.0.self_attn.q_proj.weight``, ``norm.weight``, as ``LlamaModel.save_pretrained`` writes)
    or causal-LM names (``model.``-prefixed; ``lm_head.`` ignored). ``CheckpointError`` lists every
    missing and unexpected tensor, and shapes are checked against the config."""
    state = statedict.strip_prefix(state, _PREFIXES, "embed_tokens.")
    reader = statedict.Reader(state)

    def linear(name: str, bias: bool):
        p = {"kernel": reader.take(f"{name}.weight", transpose=True)}
        if bias:
            p["bias"] = reader.take(f"{name}.bias")
        return p

    per_layer = []
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        attention = {ours: linear(pre + "self_attn." + theirs, _bias(cfg, ours)) for ours, theirs in _ATTENTION_MAP}
        if cfg.qk_norm:
            attention["q_norm"] = {"scale": reader.take(pre + "self_attn.q_norm.weight")}
            attention["k_norm"] = {"scale": reader.take(pre + "self_attn.k_norm.weight")}
        mlp = {ours: linear(pre + "mlp." + theirs, _bias(cfg, ours)) for ours, theirs in _MLP_MAP}
        norms = {ours: {"scale": reader.take(pre + _NORM_MAP[ours] + ".weight")} for ours in _norm_names(cfg)}
        per_layer.append({"attention": attention, "mlp": mlp, **norms})
    params = {
        "embed": reader.take("embed_tokens.weight"),
        "layers": None,
        "final_norm": {"scale": reader.take("norm.weight")},
    }
    reader.check(f"a {cfg.model_type} decoder with {cfg.num_layers} layers", _IGNORED)
    params["layers"] = statedict.stack_layers(per_layer)
    statedict.check_shapes(params, jax.eval_shape(lambda: init(cfg, jax.random.key(0))))
    return params


def state_dict_from_params(params: dict, cfg: DecoderConfig) -> dict:
    """The inverse of ``params_from_state_dict``: base-model names (as ``AutoModel`` loads them),
    (out, in) linear weights, float32."""
    params = jax.device_get(params)
    out: dict[str, Any] = {"embed_tokens.weight": params["embed"], "norm.weight": params["final_norm"]["scale"]}
    lay = params["layers"]
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        for group, table, prefix in (("attention", _ATTENTION_MAP, "self_attn."), ("mlp", _MLP_MAP, "mlp.")):
            for ours, theirs in table:
                p = lay[group][ours]
                out[f"{pre}{prefix}{theirs}.weight"] = p["kernel"][i].T
                if "bias" in p:
                    out[f"{pre}{prefix}{theirs}.bias"] = p["bias"][i]
        if cfg.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = lay["attention"]["q_norm"]["scale"][i]
            out[pre + "self_attn.k_norm.weight"] = lay["attention"]["k_norm"]["scale"][i]
        for ours in _norm_names(cfg):
            out[pre + _NORM_MAP[ours] + ".weight"] = lay[ours]["scale"][i]
    return {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in out.items()}


# --------------------------------------------------------------------------- sharding, weight decay

# FSDP x tensor parallelism, as bert.SHARDING_RULES: q/k/v/gate/up split their outputs over 'model'
# (whole heads / MLP slices per device) and their inputs over 'fsdp'; o/down the other way round;
# the stacked layer axis stays None (lax.scan slices it). The embedding shards its hidden axis
# (vocabularies rarely divide the mesh). Column-parallel biases follow their outputs; norms and
# the row-parallel biases are replicated. LoRA adapters follow their kernel's in / out axes.
SHARDING_RULES = (
    (r"^embed$", P(None, "fsdp")),
    (r"^layers/(attention/(q|k|v)|mlp/(gate|up))/bias$", P(None, "model")),
    (r"/(bias|scale)$", P()),
    (r"^layers/(attention/o|mlp/down)/lora_a$", P(None, "model", None)),
    (r"/lora_a$", P(None, "fsdp", None)),
    (r"^layers/(attention/(q|k|v)|mlp/(gate|up))/lora_b$", P(None, None, "model")),
    (r"/lora_b$", P(None, None, "fsdp")),
    (r"^layers/(attention/(q|k|v)|mlp/(gate|up))/kernel$", P(None, "fsdp", "model")),
    (r"^layers/(attention/o|mlp/down)/kernel$", P(None, "model", "fsdp")),
)
# Norm scales, biases and the embedding table get no weight decay.
NO_DECAY = r"(bias|scale)$|^embed$"

BACKBONE = registry.register(registry.Backbone(
    name="decoder", model_types=SUPPORTED_MODEL_TYPES, config_from_hf=DecoderConfig.from_hf, init=init, apply=apply,
    params_from_state_dict=params_from_state_dict, state_dict_from_params=state_dict_from_params,
    sharding_rules=SHARDING_RULES, no_decay=NO_DECAY,
    dense_modules=tuple((f"layers/attention/{ours}", f"layers.{{i}}.self_attn.{theirs}") for ours, theirs in _ATTENTION_MAP)
    + tuple((f"layers/mlp/{ours}", f"layers.{{i}}.mlp.{theirs}") for ours, theirs in _MLP_MAP),
))
