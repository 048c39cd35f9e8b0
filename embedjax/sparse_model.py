"""``load_sparse_encoder`` and ``SparseEncoder``: encode texts to SPLADE vectors, kept sparse.

A SPLADE checkpoint is a masked-language model (``BertForMaskedLM``: the backbone and its MLM
head, ``cls.predictions.*``) and a pooling over its vocabulary logits. sentence-transformers
saves it as a ``SparseEncoder`` (modules ``MLMTransformer`` + ``SpladePooling``); that layout,
a bare ``BertForMaskedLM`` (max pooling, ReLU) and a bare ``BertModel`` (a fresh head, see
``embedjax.sparse.init_mlm_head``) all load here. ``save_sparse_encoder`` writes the
sentence-transformers layout back, which ``sentence_transformers.SparseEncoder`` loads and
scores the same, and which this module loads again.

``encode`` returns a scipy CSR matrix (texts x vocabulary): the vectors leave the device one
batch at a time and are kept sparse from then on (``embedjax.sparse_index`` searches them).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from embedjax import hf, sparse, tokenize
from embedjax.encoders.statedict import CheckpointError
from embedjax.export import TOKENIZER_FILES, _write_json
from embedjax.model import _check_texts, _progress

log = logging.getLogger(__name__)

SPARSE_ENCODER_RECORD = "embedjax_sparse_encoder.json"
SUPPORTED_MODEL_TYPES = ("bert",)  # the MLM-head names of embedjax.sparse are BERT's
# sentence-transformers 5's module paths: sentence-transformers 6 maps them to its own on load
_ST_MLM = "sentence_transformers.sparse_encoder.models.MLMTransformer"
_ST_POOLING = "sentence_transformers.sparse_encoder.models.SpladePooling"


@dataclasses.dataclass
class SparseEncoder:
    """A loaded SPLADE encoder: ``params`` (the backbone's tree plus ``params["mlm_head"]``; the
    head's decoder is tied to ``params["embeddings"]["word"]``), the backbone's static config, the
    tokenizer, and how vocabulary logits are pooled (``pooling`` "max"/"sum", ``activation``
    "relu"/"log1p_relu"). ``top_k``: keep each vector's k largest terms (0: all; sentence-
    transformers' ``max_active_dims``). ``prompts``: the checkpoint's instructions by name."""

    params: Any
    cfg: Any
    tokenizer: tokenize.Tokenizer
    max_length: int = 512
    pooling: str = "max"
    activation: str = "relu"
    top_k: int = 0
    prompts: dict = dataclasses.field(default_factory=dict)
    path: Path | None = None

    @property
    def vocab_size(self) -> int:
        """Width of the sparse vectors."""
        return int(self.params["embeddings"]["word"].shape[0])

    def encode(self, texts: str | Sequence[str], *, batch_size: int = 32, prompt: str | None = None,
               prompt_name: str | None = None, top_k: int | None = None,
               show_progress: bool | None = None) -> sp.csr_matrix:
        """SPLADE vectors of ``texts``: float32 CSR (N, vocab_size), rows in the caller's order (one
        row for a single string).

        Texts are sorted by length and padded to static buckets; each batch's dense (rows, V)
        weights are pruned to ``top_k`` on the device and made sparse on the host.
        ``prompt`` / ``prompt_name``: an instruction prefixed to every text (a string, or one of
        ``prompts``). ``top_k``: overrides the encoder's ``top_k``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = _check_texts([texts] if isinstance(texts, str) else texts)
        prefix = self._prompt(prompt, prompt_name)
        encodings = self.tokenizer.encode([prefix + t for t in texts])
        k = self.top_k if top_k is None else int(top_k)
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        blocks = []
        for start in _progress(range(0, len(order), batch_size), len(order), batch_size, show_progress):
            chunk = order[start:start + batch_size]
            batch = self.tokenizer.pad([encodings[i] for i in chunk], tokenize.rows_for(len(chunk), batch_size))
            weights = splade_jit(self.params, self.cfg, batch.input_ids, batch.attention_mask, batch.token_type_ids,
                                 pooling=self.pooling, activation=self.activation, k=k)
            blocks.append(sparse_index_rows(np.asarray(weights)[: len(chunk)]))
        if not blocks:
            return sp.csr_matrix((0, self.vocab_size), dtype=np.float32)
        stacked = sp.vstack(blocks, format="csr")
        return stacked[np.argsort(order, kind="stable")]  # back to the caller's order

    def encode_query(self, texts, **kw) -> sp.csr_matrix:
        """``encode`` with the checkpoint's "query" prompt when it has one."""
        return self.encode(texts, **_named_prompt(self.prompts, "query", kw))

    def encode_document(self, texts, **kw) -> sp.csr_matrix:
        """``encode`` with the checkpoint's "document" prompt when it has one."""
        return self.encode(texts, **_named_prompt(self.prompts, "document", kw))

    def decode(self, vector: sp.spmatrix, top: int | None = None) -> list[tuple[str, float]]:
        """One vector's terms as (token, weight), heaviest first (``top`` of them): what a
        SPLADE vector says about its text."""
        row = sp.csr_matrix(vector)
        if row.shape[0] != 1:
            raise ValueError(f"decode takes one vector (1, V), got shape {row.shape}")
        order = np.argsort(-row.data, kind="stable")[:top]
        return [(self.tokenizer.backend.id_to_token(int(row.indices[i])), float(row.data[i])) for i in order]

    def _prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        if prompt is not None and prompt_name is not None:
            raise ValueError("pass a prompt or a prompt name, not both")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise KeyError(f"prompt name {prompt_name!r} not in this checkpoint's prompts {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        return prompt or ""


def _named_prompt(prompts: dict, name: str, kw: dict) -> dict:
    if "prompt" not in kw and "prompt_name" not in kw and prompts.get(name):
        return {**kw, "prompt_name": name}
    return kw


def sparse_index_rows(weights: np.ndarray) -> sp.csr_matrix:
    """A batch's dense (B, V) weights as CSR (only the positive terms: SPLADE weights are >= 0)."""
    from embedjax.sparse_index import to_csr

    return to_csr(weights)


@functools.partial(jax.jit, static_argnames=("cfg", "pooling", "activation", "k"))
def splade_jit(params, cfg, input_ids, attention_mask, token_type_ids, *, pooling: str, activation: str, k: int):
    """``embedjax.sparse.splade_embed`` of ``params`` (with ``params["mlm_head"]``), compiled."""
    backbone = {key: v for key, v in params.items() if key != "mlm_head"}
    return sparse.splade_embed(backbone, cfg, params["mlm_head"], input_ids, attention_mask,
                               token_type_ids=token_type_ids, pooling=pooling, activation=activation, k=k)


# --------------------------------------------------------------------------- loading


def _modules(directory: Path) -> tuple[dict, dict | None]:
    """(SpladePooling's config, the transformer's sentence_bert_config) of a sentence-transformers
    directory; ({}, None) for a bare checkpoint. A dense SentenceTransformer (a ``Transformer`` then
    pooling modules) gives its backbone only (a SPLADE model to train from it); other module stacks
    are refused."""
    modules = hf.read_json(directory / "modules.json")
    if modules is None:
        return {}, None
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if modules and modules[0].get("path", "") not in ("", ".") and kinds[0] in ("MLMTransformer", "Transformer"):
        raise CheckpointError(f"{directory / 'modules.json'}: the {kinds[0]} must be at the top level, "
                              f"not in {modules[0]['path']!r}")
    st_config = hf.read_json(directory / "sentence_bert_config.json") or {}
    if kinds == ["MLMTransformer", "SpladePooling"]:
        return hf.read_json(directory / modules[1]["path"] / "config.json") or {}, st_config
    if kinds and kinds[0] == "Transformer" and not {"MLMTransformer", "SpladePooling", "Router"} & set(kinds):
        log.info("%s is a dense SentenceTransformer (%s): its backbone is read, its pooling modules are not",
                 directory, kinds)
        return {}, st_config
    raise CheckpointError(f"{directory / 'modules.json'}: modules {kinds}; embedjax loads SparseEncoders made of "
                          "['MLMTransformer', 'SpladePooling'] (an inference-free Router is not supported yet), "
                          "or a dense SentenceTransformer's backbone")


def load_sparse_encoder(name_or_path: str | os.PathLike, *, max_length: int | None = None, top_k: int | None = None,
                        pooling: str | None = None, activation: str | None = None, dtype: str | None = None,
                        buckets: Sequence[int] = tokenize.DEFAULT_BUCKETS, seed: int = 0) -> SparseEncoder:
    """Loads a SPLADE encoder from a checkpoint directory or hub id.

    Args:
      name_or_path: a sentence-transformers SparseEncoder (MLMTransformer + SpladePooling), a
        ``BertForMaskedLM`` (its head is loaded) or a ``BertModel`` / dense SentenceTransformer
        (a fresh MLM head from ``seed``, logged: its vectors are meaningless until trained).
      max_length: truncation in tokens; default: the saved one, else min(512, the model's limit).
      top_k: keep each vector's k largest terms (default: the saved value, else all).
      pooling / activation: override the saved SpladePooling (default max / relu).
      dtype: compute dtype ("float32" or "bfloat16"); params stay float32.
    """
    from embedjax.encoders import registry

    directory = hf.resolve(name_or_path)
    config = hf.read_json(directory / "config.json")
    if config is None:
        raise CheckpointError(f"{directory}: no config.json")
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{directory}: model_type {config.get('model_type')!r}; SPLADE encoders load for "
                              f"{SUPPORTED_MODEL_TYPES} (the BertForMaskedLM head)")
    cfg = registry.config_from_hf(config, **({"dtype": jnp.dtype(dtype).name} if dtype else {}))
    pooling_cfg, st_cfg = _modules(directory)
    record = hf.read_json(directory / SPARSE_ENCODER_RECORD) or {}
    state = hf.load_state_dict(directory)
    params = hf.params_from_state_dict(state, cfg)
    head = sparse.mlm_head_from_state_dict(state, str(directory))
    if head is None:
        log.warning("%s carries no MLM head (cls.predictions.*): a fresh one (seed %d); train it before use",
                    directory, seed)
        head = sparse.init_mlm_head(cfg.hidden_size, params["embeddings"]["word"].shape[0], jax.random.key(seed))
    max_length = int(max_length or record.get("max_length") or (st_cfg or {}).get("max_seq_length")
                     or min(512, cfg.max_length))
    if not 1 <= max_length <= cfg.max_length:
        raise ValueError(f"max_length must be in 1..{cfg.max_length} for this model, got {max_length}")
    pooling = pooling or pooling_cfg.get("pooling_strategy", "max")
    activation = activation or pooling_cfg.get("activation_function", "relu")
    if pooling not in sparse.POOLINGS or activation not in sparse.ACTIVATIONS:
        raise ValueError(f"{directory}: SPLADE pooling {pooling!r} / activation {activation!r}; embedjax has "
                         f"{sparse.POOLINGS} / {sparse.ACTIVATIONS}")
    top_k = int(top_k if top_k is not None else record.get("top_k") or 0)
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: keep every term), got {top_k}")
    st_config = hf.read_json(directory / "config_sentence_transformers.json") or {}
    tokenizer = tokenize.Tokenizer.from_directory(directory, max_length, cfg.pad_token_id, buckets=buckets)
    return SparseEncoder(params=jax.device_put({**params, "mlm_head": head}), cfg=cfg, tokenizer=tokenizer,
                         max_length=max_length, pooling=pooling, activation=activation, top_k=top_k,
                         prompts={k: v for k, v in (st_config.get("prompts") or {}).items() if v}, path=directory)


# --------------------------------------------------------------------------- saving


def save_sparse_encoder(model: SparseEncoder, directory: str | os.PathLike, *, params=None) -> Path:
    """Writes ``model`` (or these ``params``) as a sentence-transformers SparseEncoder.

    The directory holds a ``BertForMaskedLM`` (``config.json``, ``model.safetensors`` with the
    head under ``cls.predictions.*``, its decoder tied to the word embeddings), the tokenizer
    files, ``modules.json`` (MLMTransformer + SpladePooling), the pooling's config, the prompts
    in ``config_sentence_transformers.json`` and ``embedjax_sparse_encoder.json`` (max_length,
    top_k). Returns the directory.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(model.params if params is None else params)
    cfg = model.cfg
    backbone = {k: v for k, v in params.items() if k != "mlm_head"}
    state = {"bert." + k: np.asarray(v, np.float32) for k, v in hf.state_dict_from_params(backbone, cfg).items()
             if not k.startswith("pooler.")}  # BertForMaskedLM has no pooler
    state.update(sparse.mlm_head_to_state_dict(params["mlm_head"]))
    tmp = directory / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")  # atomic: never a half-written model file
    version = __import__("embedjax").__version__
    _write_json(directory / "config.json", {**cfg.to_hf(), "architectures": ["BertForMaskedLM"],
                                            "tie_word_embeddings": True, "torch_dtype": "float32"})
    if model.path is not None and Path(model.path).resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            if (Path(model.path) / name).is_file():
                shutil.copyfile(Path(model.path) / name, directory / name)
    _write_json(directory / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": _ST_MLM},
        {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": _ST_POOLING}])
    _write_json(directory / "sentence_bert_config.json", {"max_seq_length": model.max_length, "do_lower_case": False})
    (directory / "1_SpladePooling").mkdir(exist_ok=True)
    _write_json(directory / "1_SpladePooling" / "config.json",
                {"pooling_strategy": model.pooling, "activation_function": model.activation,
                 "word_embedding_dimension": model.vocab_size})
    _write_json(directory / "config_sentence_transformers.json",
                {"model_type": "SparseEncoder", "prompts": dict(model.prompts), "default_prompt_name": None,
                 "similarity_fn_name": "dot", "__version__": {"embedjax": version}})
    _write_json(directory / SPARSE_ENCODER_RECORD,
                {"max_length": model.max_length, "top_k": model.top_k, "embedjax_version": version})
    return directory


def save_trained(model: SparseEncoder, params, directory: str | os.PathLike) -> None:
    """A trained SPLADE model's export (a run's, into its workdir, local or ``gs://``): LoRA
    adapters merged into the weights, written by ``save_sparse_encoder``."""
    from embedjax import lora, paths

    cfg = model.cfg
    if cfg.lora is not None:
        params, cfg = lora.merge(params, cfg)
    with paths.staged(directory) as local:
        save_sparse_encoder(dataclasses.replace(model, cfg=cfg), local, params=params)
