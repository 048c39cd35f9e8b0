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

An inference-free model (SPLADE-doc; sentence-transformers' ``Router`` with a
``SparseStaticEmbedding`` query route) encodes queries with no transformer at all: each query is
a learned weight per vocabulary id on the ids it contains (``params["query_static"]``,
``embedjax.sparse.static_query_weights``; its tokens read without [CLS] / [SEP]). That layout loads
and saves too (``with_static_queries`` turns any SPLADE model into one).
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
_ST_STATIC = "sentence_transformers.sparse_encoder.models.SparseStaticEmbedding"
_ST_ROUTER = "sentence_transformers.models.Router"
QUERY_STATIC = "query_static"  # params key of an inference-free query side's (V,) term weights
# the Router's module folders, as sentence-transformers names them
_ROUTER_FOLDERS = {"query": "query_0_SparseStaticEmbedding", "mlm": "document_0_MLMTransformer",
                   "pooling": "document_1_SpladePooling"}


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

    @property
    def inference_free(self) -> bool:
        """Queries are encoded by a static term-weight table, not the transformer."""
        return QUERY_STATIC in self.params

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
        """``encode`` with the checkpoint's "query" prompt when it has one; an inference-free model's
        queries: each query's distinct token ids (no [CLS] / [SEP]) weighted by ``params["query_static"]``."""
        if not self.inference_free:
            return self.encode(texts, **_named_prompt(self.prompts, "query", kw))
        kw = _named_prompt(self.prompts, "query", kw)
        unknown = sorted(set(kw) - {"prompt", "prompt_name", "top_k", "batch_size", "show_progress"})
        if unknown:
            raise TypeError(f"encode_query: unknown arguments {unknown}")
        texts = _check_texts([texts] if isinstance(texts, str) else texts)
        prefix = self._prompt(kw.get("prompt"), kw.get("prompt_name"))
        weights = np.asarray(self.params[QUERY_STATIC], np.float32)
        rows = np.zeros((len(texts), self.vocab_size), np.float32)
        for row, e in zip(rows, self.tokenizer.backend.encode_batch([prefix + t for t in texts],
                                                                    add_special_tokens=False)):
            ids = np.unique(np.asarray(e.ids, np.int64))
            row[ids] = weights[ids]
        k = self.top_k if kw.get("top_k") is None else int(kw["top_k"])
        if k:
            rows = np.asarray(sparse.top_k(rows, k))
        return sparse_index_rows(rows)

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
    backbone = {key: v for key, v in params.items() if key not in ("mlm_head", QUERY_STATIC)}
    return sparse.splade_embed(backbone, cfg, params["mlm_head"], input_ids, attention_mask,
                               token_type_ids=token_type_ids, pooling=pooling, activation=activation, k=k)


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a SPLADE checkpoint keeps its parts."""

    model_dir: Path              # the MLM transformer (config.json, weights, tokenizer)
    pooling: dict                # SpladePooling's config ({}: max / relu)
    st_config: dict | None       # the transformer's sentence_bert_config (None: a bare checkpoint)
    static_dir: Path | None = None  # an inference-free query side's SparseStaticEmbedding


def _router_layout(directory: Path) -> _Layout:
    """A ``Router`` whose "query" route is a SparseStaticEmbedding and whose "document" route is
    MLMTransformer + SpladePooling (sentence-transformers' inference-free SPLADE)."""
    router = hf.read_json(directory / "router_config.json") or {}
    structure, types = router.get("structure", {}), router.get("types", {})
    kinds = {route: [types.get(m, "").rsplit(".", 1)[-1] for m in structure.get(route, [])]
             for route in ("query", "document")}
    if kinds != {"query": ["SparseStaticEmbedding"], "document": ["MLMTransformer", "SpladePooling"]} or \
            set(structure) != {"query", "document"}:
        raise CheckpointError(f"{directory / 'router_config.json'}: routes {kinds}; embedjax loads the "
                              "inference-free layout: query ['SparseStaticEmbedding'], document "
                              "['MLMTransformer', 'SpladePooling']")
    mlm, pooling = (directory / m for m in structure["document"])
    return _Layout(mlm, hf.read_json(pooling / "config.json") or {},
                   hf.read_json(mlm / "sentence_bert_config.json") or {}, static_dir=directory / structure["query"][0])


def _modules(directory: Path) -> _Layout:
    """The parts of a sentence-transformers directory, or of a bare checkpoint. A dense
    SentenceTransformer (a ``Transformer`` then pooling modules) gives its backbone only (a SPLADE
    model to train from it); other module stacks are refused."""
    modules = hf.read_json(directory / "modules.json")
    if modules is None:
        return _Layout(directory, {}, None)
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds == ["Router"]:
        return _router_layout(directory / modules[0].get("path", ""))
    if modules and modules[0].get("path", "") not in ("", ".") and kinds[0] in ("MLMTransformer", "Transformer"):
        raise CheckpointError(f"{directory / 'modules.json'}: the {kinds[0]} must be at the top level, "
                              f"not in {modules[0]['path']!r}")
    st_config = hf.read_json(directory / "sentence_bert_config.json") or {}
    if kinds == ["MLMTransformer", "SpladePooling"]:
        return _Layout(directory, hf.read_json(directory / modules[1]["path"] / "config.json") or {}, st_config)
    if kinds and kinds[0] == "Transformer" and not {"MLMTransformer", "SpladePooling", "Router"} & set(kinds):
        log.info("%s is a dense SentenceTransformer (%s): its backbone is read, its pooling modules are not",
                 directory, kinds)
        return _Layout(directory, {}, st_config)
    raise CheckpointError(f"{directory / 'modules.json'}: modules {kinds}; embedjax loads SparseEncoders made of "
                          "['MLMTransformer', 'SpladePooling'], an inference-free ['Router'] (a SparseStaticEmbedding "
                          "query route), or a dense SentenceTransformer's backbone")


def load_sparse_encoder(name_or_path: str | os.PathLike, *, max_length: int | None = None, top_k: int | None = None,
                        pooling: str | None = None, activation: str | None = None, dtype: str | None = None,
                        buckets: Sequence[int] = tokenize.DEFAULT_BUCKETS, seed: int = 0,
                        head_init: str = "identity") -> SparseEncoder:
    """Loads a SPLADE encoder from a checkpoint directory or hub id.

    Args:
      name_or_path: a sentence-transformers SparseEncoder (MLMTransformer + SpladePooling), a
        ``BertForMaskedLM`` (its head is loaded) or a ``BertModel`` / dense SentenceTransformer
        (a fresh MLM head, logged: ``head_init``, see ``embedjax.sparse.init_mlm_head``; "random"
        draws it from ``seed``).
      max_length: truncation in tokens; default: the saved one, else min(512, the model's limit).
      top_k: keep each vector's k largest terms (default: the saved value, else all).
      pooling / activation: override the saved SpladePooling (default max / relu).
      dtype: compute dtype ("float32" or "bfloat16"); params stay float32.
    """
    from embedjax.encoders import registry

    directory = hf.resolve(name_or_path)
    layout = _modules(directory)
    config = hf.read_json(layout.model_dir / "config.json")
    if config is None:
        raise CheckpointError(f"{layout.model_dir}: no config.json")
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{directory}: model_type {config.get('model_type')!r}; SPLADE encoders load for "
                              f"{SUPPORTED_MODEL_TYPES} (the BertForMaskedLM head)")
    cfg = registry.config_from_hf(config, **({"dtype": jnp.dtype(dtype).name} if dtype else {}))
    pooling_cfg, st_cfg = layout.pooling, layout.st_config
    record = hf.read_json(directory / SPARSE_ENCODER_RECORD) or {}
    state = hf.load_state_dict(layout.model_dir)
    params = hf.params_from_state_dict(state, cfg)
    head = sparse.mlm_head_from_state_dict(state, str(directory))
    if head is None:
        log.warning("%s carries no MLM head (cls.predictions.*): a fresh %s one; fine-tune it before use",
                    directory, head_init)
        head = sparse.init_mlm_head(cfg.hidden_size, params["embeddings"]["word"].shape[0], jax.random.key(seed),
                                    kind=head_init)
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
    tokenizer = tokenize.Tokenizer.from_directory(layout.model_dir, max_length, cfg.pad_token_id, buckets=buckets)
    params = {**params, "mlm_head": head}
    if layout.static_dir is not None:
        from safetensors.numpy import load_file

        files = sorted(layout.static_dir.glob("*.safetensors"))
        if not files or "weight" not in (static := load_file(str(files[0]))):
            raise CheckpointError(f"{layout.static_dir}: no SparseStaticEmbedding weight (model.safetensors 'weight')")
        if static["weight"].shape != (params["embeddings"]["word"].shape[0],):
            raise CheckpointError(f"{layout.static_dir}: static weights of shape {static['weight'].shape}, the "
                                  f"vocabulary has {params['embeddings']['word'].shape[0]} ids")
        params[QUERY_STATIC] = np.asarray(static["weight"], np.float32)
    return SparseEncoder(params=jax.device_put(params), cfg=cfg, tokenizer=tokenizer,
                         max_length=max_length, pooling=pooling, activation=activation, top_k=top_k,
                         prompts={k: v for k, v in (st_config.get("prompts") or {}).items() if v}, path=directory)


# --------------------------------------------------------------------------- saving


def save_sparse_encoder(model: SparseEncoder, directory: str | os.PathLike, *, params=None) -> Path:
    """Writes ``model`` (or these ``params``) as a sentence-transformers SparseEncoder.

    The directory holds a ``BertForMaskedLM`` (``config.json``, ``model.safetensors`` with the
    head under ``cls.predictions.*``, its decoder tied to the word embeddings), the tokenizer
    files, ``modules.json`` (MLMTransformer + SpladePooling), the pooling's config, the prompts
    in ``config_sentence_transformers.json`` and ``embedjax_sparse_encoder.json`` (max_length,
    top_k). An inference-free model (``params["query_static"]``) is written as
    sentence-transformers' ``Router``: the same MLMTransformer and SpladePooling as the "document"
    route, a ``SparseStaticEmbedding`` (its ``weight``) as the "query" route. Returns the directory.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(model.params if params is None else params)
    cfg = model.cfg
    routed = QUERY_STATIC in params
    mlm_dir, pooling_dir = ((directory / _ROUTER_FOLDERS["mlm"], directory / _ROUTER_FOLDERS["pooling"]) if routed
                            else (directory, directory / "1_SpladePooling"))
    mlm_dir.mkdir(exist_ok=True)
    backbone = {k: v for k, v in params.items() if k not in ("mlm_head", QUERY_STATIC)}
    state = {"bert." + k: np.asarray(v, np.float32) for k, v in hf.state_dict_from_params(backbone, cfg).items()
             if not k.startswith("pooler.")}  # BertForMaskedLM has no pooler
    state.update(sparse.mlm_head_to_state_dict(params["mlm_head"]))
    tmp = mlm_dir / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(mlm_dir / "model.safetensors")  # atomic: never a half-written model file
    version = __import__("embedjax").__version__
    _write_json(mlm_dir / "config.json", {**cfg.to_hf(), "architectures": ["BertForMaskedLM"],
                                          "tie_word_embeddings": True, "torch_dtype": "float32"})
    tokenizer_dirs = [mlm_dir] + ([directory / _ROUTER_FOLDERS["query"]] if routed else [])
    source = None if model.path is None else _modules(Path(model.path)).model_dir
    for target in tokenizer_dirs:
        target.mkdir(exist_ok=True)
        if source is not None and source.resolve() != target.resolve():
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, target / name)
    _write_json(mlm_dir / "sentence_bert_config.json", {"max_seq_length": model.max_length, "do_lower_case": False})
    pooling_dir.mkdir(exist_ok=True)
    _write_json(pooling_dir / "config.json",
                {"pooling_strategy": model.pooling, "activation_function": model.activation,
                 "word_embedding_dimension": model.vocab_size})
    if routed:
        save_file({"weight": np.asarray(params[QUERY_STATIC], np.float32)},
                  str(directory / _ROUTER_FOLDERS["query"] / "model.safetensors"), metadata={"format": "pt"})
        _write_json(directory / _ROUTER_FOLDERS["query"] / "config.json", {"frozen": False})
        _write_json(directory / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": _ST_ROUTER}])
        _write_json(directory / "router_config.json", {
            "types": {_ROUTER_FOLDERS["query"]: _ST_STATIC, _ROUTER_FOLDERS["mlm"]: _ST_MLM,
                      _ROUTER_FOLDERS["pooling"]: _ST_POOLING},
            "structure": {"query": [_ROUTER_FOLDERS["query"]],
                          "document": [_ROUTER_FOLDERS["mlm"], _ROUTER_FOLDERS["pooling"]]},
            "parameters": {"default_route": "document", "allow_empty_key": True, "route_mappings": {}}})
    else:
        _write_json(directory / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": _ST_MLM},
            {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": _ST_POOLING}])
    _write_json(directory / "config_sentence_transformers.json",
                {"model_type": "SparseEncoder", "prompts": dict(model.prompts), "default_prompt_name": None,
                 "similarity_fn_name": "dot", "__version__": {"embedjax": version}})
    _write_json(directory / SPARSE_ENCODER_RECORD,
                {"max_length": model.max_length, "top_k": model.top_k, "embedjax_version": version})
    return directory


def with_static_queries(model: SparseEncoder, weights=None) -> SparseEncoder:
    """``model`` made inference-free: its queries encoded by a static weight per vocabulary id
    (``params["query_static"]``), ``weights`` (V,) or ones (sentence-transformers'
    ``SparseStaticEmbedding`` default; ``embedjax.sparse.idf`` of a corpus is another start).
    Documents keep the transformer."""
    weights = np.ones(model.vocab_size, np.float32) if weights is None else np.asarray(weights, np.float32)
    if weights.shape != (model.vocab_size,):
        raise ValueError(f"static query weights must be ({model.vocab_size},), got {weights.shape}")
    return dataclasses.replace(model, params={**model.params, QUERY_STATIC: jax.device_put(weights)})


def save_trained(model: SparseEncoder, params, directory: str | os.PathLike) -> None:
    """A trained SPLADE model's export (a run's, into its workdir, local or ``gs://``): LoRA adapters
    merged into the weights, written by ``save_sparse_encoder`` (``export.save_merged``)."""
    from embedjax.export import save_merged

    save_merged(save_sparse_encoder, model, params, directory)