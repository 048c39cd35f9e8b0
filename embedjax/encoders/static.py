"""A static token table as a backbone: model2vec models and sentence-transformers' ``StaticEmbedding``.

A text's embedding is the mean of its tokens' rows of one (V, H) table: no transformer, no
positions, no attention. Behind the registry seam the table is an encoder with 0 layers whose
hidden states are the rows of its tokens, so mean pooling gives the static embedding and
``embed``, ``Encoder.encode``, the evaluators, sharding, the training loop and checkpoints all
work unchanged; the table trains like any parameter (``embedjax.static`` distils one from a
transformer).

Param tree::

    embeddings: (V, H)      one row per token id (model2vec's ``embeddings`` tensor)

Checkpoints read: model2vec's directory (``config.json`` with ``model_type: "model2vec"``,
``model.safetensors`` with ``embeddings`` and, for vocabulary-quantised models, ``mapping`` and
``weights``, folded into one row per token as sentence-transformers folds them) and
sentence-transformers' ``StaticEmbedding`` module (``embedding.weight``). Written: model2vec's
names, so ``StaticModel.from_pretrained`` and ``SentenceTransformer`` both load an export.

How texts become tokens (``tokenizer_options``): without the tokenizer's special tokens, as both
libraries do; ``tokenize_as="model2vec"`` (model2vec's ``StaticModel.encode``) also drops the
unknown token from every text and first cuts a text to ``max_length`` times the vocabulary's
median token length in characters; ``"sentence_transformers"`` (a ``StaticEmbedding`` directory
without model2vec's config) keeps both as sentence-transformers does.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from embedjax.encoders import layers as L
from embedjax.encoders import registry, statedict

MODEL_TYPES = ("model2vec",)
TOKENIZE_AS = ("model2vec", "sentence_transformers")
DEFAULT_MAX_LENGTH = 512  # model2vec's StaticModel default truncation, in tokens
# sentence-transformers' StaticEmbedding module type, in modules.json
ST_MODULE = "StaticEmbedding"


@dataclasses.dataclass(frozen=True)
class StaticConfig:
    """A static table's static description (hashable: a jit static argument).

    ``max_length``: tokens per text (model2vec's ``max_length``, 512 by default). ``tokenize_as``:
    whose tokenization the model reproduces (see the module docstring). ``sif_coefficient``,
    ``apply_pca`` and ``base_model`` record a distillation (model2vec's config fields). Dropout
    (``hidden_dropout``) applies to the token rows in training, off by default.
    """

    vocab_size: int
    hidden_size: int
    pad_token_id: int = 0
    max_length: int = DEFAULT_MAX_LENGTH
    tokenize_as: str = "model2vec"
    apply_pca: int | None = None
    sif_coefficient: float | None = None
    base_model: str | None = None
    model_type: str = "model2vec"
    dtype: str = "float32"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    lora: Any = None

    def __post_init__(self):
        if self.tokenize_as not in TOKENIZE_AS:
            raise ValueError(f"tokenize_as must be one of {TOKENIZE_AS}, got {self.tokenize_as!r}")
        if self.vocab_size < 1 or self.hidden_size < 1:
            raise ValueError(f"a static table needs vocab_size and hidden_size >= 1, got {self.vocab_size} x "
                             f"{self.hidden_size}")

    @property
    def num_layers(self) -> int:
        """No transformer layers: the hidden states are the table's rows."""
        return 0

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "StaticConfig":
        """From model2vec's ``config.json`` (``hidden_dim``, ``max_length``, ...) completed with
        ``vocab_size`` (``config_from_weights``)."""
        if "vocab_size" not in hf or "hidden_dim" not in hf:
            raise statedict.CheckpointError("a static model's config needs vocab_size and hidden_dim (read from the "
                                            "weights by embedjax.hf.load_checkpoint)")
        pca = hf.get("apply_pca")
        fields = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_dim"]),
            pad_token_id=int(hf.get("pad_token_id") or 0),
            max_length=int(hf.get("max_length") or DEFAULT_MAX_LENGTH),
            tokenize_as=hf.get("tokenize_as", "model2vec"),
            apply_pca=pca if isinstance(pca, int) and not isinstance(pca, bool) else None,
            sif_coefficient=hf.get("sif_coefficient"),
            base_model=hf.get("tokenizer_name") or None,
            model_type=hf.get("model_type", "model2vec"),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict:
        """model2vec's ``config.json`` fields (it reads ``normalize`` and ``max_length``; the export adds
        ``normalize``), plus ``vocab_size``, ``pad_token_id`` and ``tokenize_as`` for embedjax."""
        return {
            "model_type": "model2vec",
            "architectures": ["StaticModel"],
            "tokenizer_name": self.base_model or "",
            "apply_pca": self.apply_pca,
            "sif_coefficient": self.sif_coefficient,
            "hidden_dim": self.hidden_size,
            "seq_length": 1000000,
            "pooling": "mean",
            "max_length": self.max_length,
            "embedding_dtype": "float32",
            "vocab_size": self.vocab_size,
            "pad_token_id": self.pad_token_id,
            "tokenize_as": self.tokenize_as,
        }


def config_from_weights(hf: Mapping[str, Any], state: Mapping[str, Any]) -> dict:
    """``hf`` completed from the table's shape: model2vec's config.json records the width
    (``hidden_dim``) but not the vocabulary, and a ``StaticEmbedding`` directory has no config."""
    vocab, hidden = table_shape(state)
    if hf.get("hidden_dim") not in (None, hidden):
        raise statedict.CheckpointError(f"config.json hidden_dim {hf['hidden_dim']} but the table is "
                                        f"{vocab} x {hidden}")
    return {**hf, "vocab_size": vocab, "hidden_dim": hidden}


def table_shape(state: Mapping[str, Any]) -> tuple[int, int]:
    """(vocabulary, width) of the table a state dict holds (after folding a token ``mapping``)."""
    if "embedding.weight" in state:
        return tuple(np.shape(state["embedding.weight"]))
    if "embeddings" not in state:
        raise statedict.CheckpointError(f"no static table in the checkpoint: expected 'embeddings' (model2vec) or "
                                        f"'embedding.weight' (sentence-transformers' StaticEmbedding), found "
                                        f"{sorted(state)[:10]}")
    rows = np.shape(state["mapping"])[0] if "mapping" in state else np.shape(state["embeddings"])[0]
    return rows, np.shape(state["embeddings"])[1]


def init(cfg: StaticConfig, key) -> dict:
    """A random table, N(0, 1) rows scaled by 1/sqrt(H) (unit-norm rows on average)."""
    return {"embeddings": jax.random.normal(key, (cfg.vocab_size, cfg.hidden_size), jnp.float32)
            / np.sqrt(cfg.hidden_size)}


def apply(params, cfg: StaticConfig, input_ids, attention_mask, *, token_type_ids=None, segment_ids=None,
          positions=None, dropout_key=None, num_layers: int | None = None, all_layers: bool = True,
          remat: bool | str = False, unroll: bool = True):
    """The rows of the tokens: ``(1, B, T, H)`` (the one "layer" is the table), or ``(B, T, H)`` with
    ``all_layers=False``. The registry's signature; a token's row ignores its context, so types,
    segments (packed rows), positions, remat and unroll change nothing. ``num_layers`` must be
    None or 0. A dropout key applies ``hidden_dropout`` to the rows."""
    if num_layers not in (None, 0):
        raise ValueError(f"a static table has no layers; num_layers must be None, got {num_layers}")
    rows = params["embeddings"][input_ids].astype(jnp.dtype(cfg.dtype))
    rows = L.dropout(rows, cfg.hidden_dropout, dropout_key)
    return rows[None] if all_layers else rows


def params_from_state_dict(state: dict, cfg: StaticConfig) -> dict:
    """model2vec's ``embeddings`` (with a vocabulary-quantised model's ``mapping`` and per-token
    ``weights`` folded in: row i = ``embeddings[mapping[i]] * weights[i]``) or sentence-transformers'
    ``embedding.weight`` -> ``{"embeddings": (V, H)}`` float32."""
    reader = statedict.Reader(state)
    if "embedding.weight" in state:
        table = reader.take("embedding.weight")
    else:
        table = reader.take("embeddings")
        if table is not None and "mapping" in state:
            reader.used.add("mapping")
            table = table[np.asarray(state["mapping"], np.int64)]
        if table is not None and "weights" in state:
            table = table * reader.take("weights")[:, None]
    reader.check("a static (model2vec) table", _IGNORED)
    params = {"embeddings": np.ascontiguousarray(table, np.float32)}
    statedict.check_shapes(params, jax.eval_shape(lambda: init(cfg, jax.random.key(0))))
    return params


def state_dict_from_params(params: dict, cfg: StaticConfig) -> dict:
    """``{"embeddings": (V, H)}``: model2vec's name, which sentence-transformers' ``StaticEmbedding`` reads too."""
    return {"embeddings": np.ascontiguousarray(np.asarray(jax.device_get(params["embeddings"]), np.float32))}


def tokenizer_options(cfg: StaticConfig, backend) -> dict:
    """``embedjax.tokenize.Tokenizer`` keyword arguments that reproduce the reference encode from a
    ``tokenizers`` backend: never the special tokens; with ``tokenize_as="model2vec"`` also the
    unknown token dropped and the character cut (``chars_per_token``: the median length of the
    vocabulary's tokens, as model2vec computes it)."""
    if cfg.tokenize_as == "sentence_transformers":
        return {"add_special_tokens": False}
    unknown = unknown_token_id(backend)
    lengths = [len(token) for token in backend.get_vocab(with_added_tokens=True)]
    return {"add_special_tokens": False, "drop_ids": () if unknown is None else (unknown,),
            "chars_per_token": max(int(np.median(lengths)), 1) if lengths else None}


def unknown_token_id(backend) -> int | None:
    """The unknown token's id of a ``tokenizers`` backend (WordPiece / BPE ``unk_token``, Unigram
    ``unk_id``), None without one."""
    model = json.loads(backend.to_str())["model"]
    if model.get("type") == "Unigram":
        return model.get("unk_id")
    token = model.get("unk_token")
    return None if token is None else backend.token_to_id(token)


_IGNORED = re.compile(r"^$")  # every tensor of a static checkpoint is read

# The table shards its width over 'fsdp' (vocabularies rarely divide the mesh, widths do), as BERT's.
SHARDING_RULES = ((r"^embeddings$", P(None, "fsdp")),)
# An embedding table gets no weight decay (BERT's convention; the table is the whole model).
NO_DECAY = r"(bias|scale)$|^embeddings$"

BACKBONE = registry.register(registry.Backbone(
    name="static", model_types=MODEL_TYPES, config_from_hf=StaticConfig.from_hf, init=init, apply=apply,
    params_from_state_dict=params_from_state_dict, state_dict_from_params=state_dict_from_params,
    sharding_rules=SHARDING_RULES, no_decay=NO_DECAY, config_from_weights=config_from_weights,
    tokenizer_options=tokenizer_options, sentence_transformers_module=ST_MODULE,
))
