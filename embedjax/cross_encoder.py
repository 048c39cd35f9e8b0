"""Cross-encoders as pure functions: a backbone reads a text pair together, a head scores it.

A cross-encoder's params are the backbone's tree plus ``params["head"]``, so everything that
walks a backbone (sharding rules, LoRA, checkpoints, export of the backbone tensors) works on
it unchanged. The head is what Hugging Face's ``*ForSequenceClassification`` classes put on
top of the backbone, by family:

- ``first_token`` (BERT, RoBERTa, XLM-R): the first token's state through a dense layer and
  tanh, then a linear layer to ``num_labels`` logits. ``BertForSequenceClassification`` calls
  the first layer ``bert.pooler.dense`` and the second ``classifier``;
  ``RobertaForSequenceClassification`` calls them ``classifier.dense`` and ``classifier.out_proj``.
- ``last_token`` (Llama, Mistral, Qwen, Gemma): a linear layer without bias (``score``) on the
  state of the last real token, the token that has read the whole pair (decoder rerankers).

Pairs are tokenized by the tokenizer's pair template (``[CLS] a [SEP] b [SEP]`` with token
types 0 / 1 for BERT), or, for decoders, from a text template (``embedjax.cross_model``).
``score`` and ``score_packed`` give the same logits for the same pair (packing puts several
pairs in one row, as the bi-encoder's training does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.embed import embed, embed_packed
from embedjax.encoders import registry

HEAD_KINDS = ("first_token", "last_token")
_POOLING = {"first_token": "cls", "last_token": "last_token"}


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """The scoring head: its ``kind`` (one of ``HEAD_KINDS``) and how many logits it gives."""

    kind: str
    num_labels: int = 1

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; choose one of {HEAD_KINDS}")
        if int(self.num_labels) < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")


def head_kind_for(cfg) -> str:
    """The head a backbone's family uses: ``first_token`` for the BERT family, else ``last_token``."""
    return "first_token" if registry.of(cfg).name == "bert" else "last_token"


def init_head(cfg, head: HeadSpec, key) -> dict:
    """Fresh head params: normal(0, 0.02) kernels and zero biases, as transformers initialises them."""
    hidden = cfg.hidden_size
    k_dense, k_out = jax.random.split(key)
    out = {"kernel": 0.02 * jax.random.normal(k_out, (hidden, head.num_labels), jnp.float32)}
    if head.kind == "last_token":
        return {"out": out}
    return {"dense": {"kernel": 0.02 * jax.random.normal(k_dense, (hidden, hidden), jnp.float32),
                      "bias": jnp.zeros((hidden,), jnp.float32)},
            "out": {**out, "bias": jnp.zeros((head.num_labels,), jnp.float32)}}


def apply_head(head_params: dict, pooled, *, dropout_rate: float = 0.0, dropout_key=None):
    """Logits (B, num_labels) float32 from the pooled token states (B, H).

    Dropout (``dropout_rate`` with a ``dropout_key``; training only) is applied before the last
    linear layer, where ``BertForSequenceClassification`` applies it.
    """
    x = pooled.astype(jnp.float32)
    if "dense" in head_params:
        x = jnp.tanh(x @ head_params["dense"]["kernel"] + head_params["dense"]["bias"])
    if dropout_key is not None and dropout_rate > 0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout_rate), 0.0)
    logits = x @ head_params["out"]["kernel"]
    if "bias" in head_params["out"]:
        logits = logits + head_params["out"]["bias"]
    return logits


def _split_key(dropout_key):
    if dropout_key is None:
        return None, None
    backbone_key, head_key = jax.random.split(dropout_key)
    return backbone_key, head_key


def score(params, cfg, head: HeadSpec, input_ids, attention_mask, *, token_type_ids=None, dropout_key=None,
          remat: bool | str = False, unroll: bool | int = True):
    """Pair token ids (B, T) -> logits (B, num_labels), float32.

    ``params``: the backbone's tree with ``params["head"]``; ``dropout_key``: training dropout in
    the backbone and before the head's last layer (None: deterministic, as at inference).
    """
    backbone_key, head_key = _split_key(dropout_key)
    pooled = embed(params, cfg, input_ids, attention_mask, pooling=_POOLING[head.kind], normalize=False,
                   token_type_ids=token_type_ids, dropout_key=backbone_key, remat=remat, unroll=unroll)
    return apply_head(params["head"], pooled, dropout_rate=cfg.hidden_dropout, dropout_key=head_key)


def score_packed(params, cfg, head: HeadSpec, input_ids, segment_ids, positions, *, num_pairs: int,
                 token_type_ids=None, dropout_key=None, remat: bool | str = False, unroll: bool | int = True):
    """``score`` for packed rows (``Tokenizer.pack`` of pair encodings): logits (num_pairs, num_labels)."""
    backbone_key, head_key = _split_key(dropout_key)
    pooled = embed_packed(params, cfg, input_ids, segment_ids, positions, num_texts=num_pairs,
                          token_type_ids=token_type_ids, pooling=_POOLING[head.kind], normalize=False,
                          dropout_key=backbone_key, remat=remat, unroll=unroll)
    return apply_head(params["head"], pooled, dropout_rate=cfg.hidden_dropout, dropout_key=head_key)


@functools.partial(jax.jit, static_argnames=("cfg", "head"))
def score_jit(params, cfg, head: HeadSpec, input_ids, attention_mask, token_type_ids):
    """``score`` compiled for inference, one program per shape."""
    return score(params, cfg, head, input_ids, attention_mask, token_type_ids=token_type_ids)


# --------------------------------------------------------------------------- PyTorch names

# (our head path, PyTorch module name) per layout; a state dict names ``<module>.weight`` / ``.bias``.
_LAYOUTS = {
    "bert": (("dense", "pooler.dense"), ("out", "classifier")),
    "roberta": (("dense", "classifier.dense"), ("out", "classifier.out_proj")),
    "decoder": (("out", "score"),),
}
# the model prefix transformers' *ForSequenceClassification puts before the backbone's names
_MODEL_PREFIX = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta."}
_ARCHITECTURE = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
                 "xlm-roberta": "XLMRobertaForSequenceClassification"}


def layout_for(cfg) -> str:
    """Which PyTorch naming the head of ``cfg``'s family uses (``bert``, ``roberta`` or ``decoder``)."""
    if registry.of(cfg).name != "bert":
        return "decoder"
    return "bert" if cfg.model_type == "bert" else "roberta"


def model_prefix(cfg) -> str:
    """The prefix of the backbone's tensors in a ``*ForSequenceClassification`` state dict."""
    return _MODEL_PREFIX.get(cfg.model_type, "model.")


def architecture(cfg) -> str:
    """The transformers class name of ``cfg``'s family with a sequence-classification head."""
    if cfg.model_type in _ARCHITECTURE:
        return _ARCHITECTURE[cfg.model_type]
    family = {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama", "mistral": "Mistral", "gemma": "Gemma",
              "gemma2": "Gemma2", "gemma3_text": "Gemma3Text"}.get(cfg.model_type)
    if family is None:
        raise ValueError(f"no sequence-classification architecture known for model_type={cfg.model_type!r}")
    return f"{family}ForSequenceClassification"


def head_from_state_dict(state: dict[str, np.ndarray], cfg) -> dict | None:
    """The head's params out of a ``*ForSequenceClassification`` state dict; None when the checkpoint
    has no complete head (a plain backbone: the caller initialises one). A ``first_token`` head
    whose classifier is missing but whose pooler is there (``BertModel`` checkpoints carry the
    pooler) keeps the pooler: what ``from_pretrained`` of the classification class does."""
    found = {}
    for ours, theirs in _LAYOUTS[layout_for(cfg)]:
        candidates = [k for k in state if k == f"{theirs}.weight" or k.endswith(f".{theirs}.weight")]
        if not candidates:
            continue
        name = candidates[0][: -len(".weight")]
        layer = {"kernel": np.asarray(state[name + ".weight"], np.float32).T}
        if name + ".bias" in state:
            layer["bias"] = np.asarray(state[name + ".bias"], np.float32)
        found[ours] = layer
    return found or None


def head_state_dict(head_params: dict, cfg) -> dict[str, np.ndarray]:
    """The head's tensors under the names ``*ForSequenceClassification`` gives them."""
    head_params = jax.device_get(head_params)
    out = {}
    prefix = model_prefix(cfg) if layout_for(cfg) == "bert" else ""  # bert.pooler.dense.*
    for ours, theirs in _LAYOUTS[layout_for(cfg)]:
        name = (prefix if ours == "dense" else "") + theirs
        out[f"{name}.weight"] = np.ascontiguousarray(np.asarray(head_params[ours]["kernel"], np.float32).T)
        if "bias" in head_params[ours]:
            out[f"{name}.bias"] = np.asarray(head_params[ours]["bias"], np.float32)
    return out


def num_labels_of(head_params: dict[str, Any]) -> int:
    """How many logits a head gives (its last kernel's width)."""
    return int(np.shape(head_params["out"]["kernel"])[-1])
