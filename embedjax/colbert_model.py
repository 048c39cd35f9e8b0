"""``load_colbert`` and ``ColbertEncoder``: encode queries and documents to token vectors (ColBERT).

A ColBERT checkpoint in PyLate's layout is a sentence-transformers directory: ``modules.json``
with a ``Transformer`` (the backbone, its tokenizer holding the ``[Q] `` / ``[D] `` marker tokens)
and PyLate's ``Dense`` projection (``1_Dense``: ``linear.weight``, no bias), and
``config_sentence_transformers.json`` with the ColBERT settings (``query_prefix``,
``document_prefix``, ``query_length``, ``document_length``, ``attend_to_expansion_tokens``,
``skiplist_words``, ``do_query_expansion``). ``save_colbert`` writes that layout back, which
``pylate.models.ColBERT`` loads and encodes the same.

``encode_queries`` gives each query (query_length, dim) unit vectors, mask-token expansions
included; ``encode_documents`` each document's scoring tokens (skiplist and padding removed).
``embedjax.similarity.maxsim_*`` scores them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax import colbert, hf, tokenize
from embedjax.encoders.statedict import CheckpointError
from embedjax.export import TOKENIZER_FILES, _write_json
from embedjax.model import _check_texts, _progress

_PYLATE_DENSE = "pylate.models.Dense.Dense"
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"


@dataclasses.dataclass
class ColbertEncoder:
    """A loaded ColBERT model: ``params`` (the backbone's tree plus ``params["projection"]``), the
    backbone's static config, one tokenizer per side (truncating at the side's length minus the
    marker) and the ColBERT settings, in PyLate's names where it has them."""

    params: Any
    cfg: Any
    query_tokenizer: tokenize.Tokenizer
    document_tokenizer: tokenize.Tokenizer
    query_length: int = 32
    document_length: int = 180
    query_marker_id: int | None = None
    document_marker_id: int | None = None
    mask_token_id: int = 103
    skiplist_ids: tuple = ()
    attend_to_expansion: bool = False
    do_query_expansion: bool = True
    settings: dict = dataclasses.field(default_factory=dict)  # config_sentence_transformers.json, written back
    path: Path | None = None

    @property
    def tokenizer(self) -> tokenize.Tokenizer:
        """The documents' tokenizer: what training batches are tokenized with (``batch_format``
        then cuts the queries)."""
        return self.document_tokenizer

    def batch_format(self) -> colbert.ColbertFormat:
        """The host transform that lays training batches out as this model encodes (``colbert.ColbertFormat``)."""
        return colbert.ColbertFormat(
            query_length=self.query_length, query_marker_id=self.query_marker_id,
            document_marker_id=self.document_marker_id, mask_token_id=self.mask_token_id,
            skiplist_ids=tuple(self.skiplist_ids), attend_to_expansion=self.attend_to_expansion,
            do_query_expansion=self.do_query_expansion, pad_token_id=self.cfg.pad_token_id)

    @property
    def dim(self) -> int:
        return int(self.params["projection"]["kernel"].shape[1])

    def encode_queries(self, texts: Sequence[str], *, batch_size: int = 32,
                       show_progress: bool | None = None) -> list[np.ndarray]:
        """Each query's (query_length, dim) float32 unit token vectors (without query expansion:
        its real tokens only)."""
        layout = self.batch_format()  # one definition of a query's inputs: encoding and training
        rows = [layout.query_row(e.ids) for e in self.query_tokenizer.encode(_check_texts(texts))]
        return self._vectors(rows, batch_size, show_progress)

    def encode_documents(self, texts: Sequence[str], *, batch_size: int = 32, pool_factor: int = 1,
                         show_progress: bool | None = None) -> list[np.ndarray]:
        """Each document's (scoring tokens, dim) float32 unit token vectors: padding and the
        skiplist's tokens removed; ``pool_factor`` > 1 clusters them about that many times fewer
        (``colbert.pool_tokens``, PyLate's ``pool_factor``)."""
        layout = self.batch_format()
        rows = [layout.document_row(e.ids) for e in self.document_tokenizer.encode(_check_texts(texts))]
        vectors = self._vectors(rows, batch_size, show_progress)
        return vectors if pool_factor == 1 else [colbert.pool_tokens(v, pool_factor) for v in vectors]

    def _vectors(self, rows, batch_size: int, show_progress: bool | None) -> list[np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out: list = [None] * len(rows)
        order = np.argsort([-len(r[0]) for r in rows], kind="stable")
        for start in _progress(range(0, len(order), batch_size), len(order), batch_size, show_progress):
            chunk = order[start:start + batch_size]
            longest = max(len(rows[i][0]) for i in chunk)
            width = tokenize.bucket_for(longest, tokenize.buckets_up_to(max(self.query_length, self.document_length)))
            n = tokenize.rows_for(len(chunk), batch_size)
            ids = np.zeros((n, width), np.int32)
            attention = np.zeros((n, width), np.int32)
            for r, i in enumerate(chunk):
                ids[r, : len(rows[i][0])], attention[r, : len(rows[i][1])] = rows[i][0], rows[i][1]
            vectors = np.asarray(_token_vectors_jit(self.params, self.cfg, ids, attention))
            for r, i in enumerate(chunk):
                out[i] = vectors[r, : len(rows[i][0])][rows[i][2].astype(bool)]
        return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def _token_vectors_jit(params, cfg, input_ids, attention_mask):
    backbone = {k: v for k, v in params.items() if k != "projection"}
    return colbert.token_vectors(backbone, cfg, params["projection"], input_ids, attention_mask,
                                 token_type_ids=jnp.zeros_like(input_ids))


def is_colbert_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a ColBERT model (PyLate's ``model_type``, or its ``Dense`` module)."""
    settings = hf.read_json(directory / "config_sentence_transformers.json") or {}
    modules = hf.read_json(directory / "modules.json") or []
    return settings.get("model_type") == "ColBERT" or any(m.get("type") == _PYLATE_DENSE for m in modules)


def load_colbert(name_or_path: str | os.PathLike, *, query_length: int | None = None,
                 document_length: int | None = None, dim: int | None = None, seed: int = 0,
                 buckets: Sequence[int] = tokenize.DEFAULT_BUCKETS) -> ColbertEncoder:
    """Loads a ColBERT model saved in PyLate's layout (a ``Transformer`` then PyLate's ``Dense``),
    or starts one from any other BERT-family checkpoint (``colbert_from_backbone``: what
    ``pylate.models.ColBERT`` does with a plain encoder). ``query_length`` / ``document_length``:
    override the saved ones (tokens, markers included; 32 / 180 for a fresh model); ``dim`` and
    ``seed``: a fresh projection's width (default 128) and initialisation."""
    from safetensors.numpy import load_file

    from embedjax.encoders import registry

    directory = hf.resolve(name_or_path)
    modules = hf.read_json(directory / "modules.json")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules or []]
    settings = hf.read_json(directory / "config_sentence_transformers.json") or {}
    if not is_colbert_checkpoint(directory):
        return colbert_from_backbone(directory, query_length=query_length or 32,
                                     document_length=document_length or 180, dim=dim, seed=seed, buckets=buckets)
    if kinds != ["Transformer", "Dense"] or modules[0].get("path", "") not in ("", "."):
        raise CheckpointError(f"{directory}: modules {kinds}; a ColBERT checkpoint in PyLate's layout is "
                              "['Transformer' (top level), 'Dense']")
    config = hf.read_json(directory / "config.json")
    cfg = registry.config_from_hf(config)
    params = hf.params_from_state_dict(hf.load_state_dict(directory), cfg)
    dense_dir = directory / modules[1]["path"]
    dense_files = sorted(dense_dir.glob("*.safetensors"))
    if not dense_files:
        raise CheckpointError(f"{dense_dir}: no safetensors weights for the projection")
    dense_config = hf.read_json(dense_dir / "config.json") or {}
    if dense_config.get("bias") or dense_config.get("use_residual"):
        raise CheckpointError(f"{dense_dir}: a projection with a bias or a residual is not supported")
    if "Identity" not in str(dense_config.get("activation_function", "Identity")):
        raise CheckpointError(f"{dense_dir}: activation {dense_config['activation_function']!r}; embedjax "
                              "reads identity projections")
    projection = colbert.projection_from_state_dict(load_file(str(dense_files[0])))
    if dim is not None and dim != projection["kernel"].shape[1]:
        raise CheckpointError(f"{dense_dir}: a projection to {projection['kernel'].shape[1]} dimensions, not dim={dim} "
                              "(leave dim unset for a ColBERT checkpoint)")
    query_length = int(query_length or settings.get("query_length") or 32)
    document_length = int(document_length or settings.get("document_length") or 180)
    tokenizers = {}
    for side, length, prefix in (("query", query_length, settings.get("query_prefix", "[Q] ")),
                                 ("document", document_length, settings.get("document_prefix", "[D] "))):
        tok = tokenize.Tokenizer.from_directory(directory, length - bool(prefix), cfg.pad_token_id, buckets=buckets)
        marker = tok.backend.token_to_id(prefix) if prefix else None
        if prefix and marker is None:
            raise CheckpointError(f"{directory}: the tokenizer has no {side} marker token {prefix!r}")
        tokenizers[side] = (tok, marker)
    vocab = tokenizers["document"][0].backend.get_vocab()
    mask_id = tokenizers["query"][0].backend.token_to_id("[MASK]")
    if mask_id is None:
        raise CheckpointError(f"{directory}: the tokenizer has no [MASK] token for query expansion")
    return ColbertEncoder(
        params=jax.device_put({**params, "projection": projection}), cfg=cfg,
        query_tokenizer=tokenizers["query"][0], document_tokenizer=tokenizers["document"][0],
        query_length=query_length, document_length=document_length,
        query_marker_id=tokenizers["query"][1], document_marker_id=tokenizers["document"][1], mask_token_id=mask_id,
        skiplist_ids=colbert.skiplist_ids(vocab, settings.get("skiplist_words", colbert.SKIPLIST_WORDS)),
        attend_to_expansion=bool(settings.get("attend_to_expansion_tokens", False)),
        do_query_expansion=bool(settings.get("do_query_expansion", True)), settings=settings, path=directory)


MARKERS = ("[Q] ", "[D] ")  # PyLate's query and document prefixes, added to a plain backbone's vocabulary


def colbert_from_backbone(directory: Path, *, query_length: int = 32, document_length: int = 180,
                          dim: int | None = None, seed: int = 0,
                          buckets: Sequence[int] = tokenize.DEFAULT_BUCKETS) -> ColbertEncoder:
    """A fresh ColBERT model on a plain checkpoint's backbone (a BERT-family ``transformers`` model or a
    dense SentenceTransformer's), as ``pylate.models.ColBERT`` starts one: the markers ``[Q] `` and
    ``[D] `` appended to the vocabulary (their embedding rows the mean of the existing rows, where
    PyLate's ``resize_token_embeddings`` draws them at random around that mean), a bias-free
    projection to ``dim`` (default 128) initialised as ``torch.nn.Linear`` from ``seed``, queries
    expanded with ``[MASK]`` and the punctuation skiplist."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from embedjax.model import load_pretrained

    backbone = load_pretrained(directory, buckets=buckets)
    params, cfg = backbone.params, backbone.cfg
    word = params.get("embeddings", {}).get("word") if isinstance(params, dict) else None
    if word is None or not hasattr(cfg, "vocab_size"):
        raise CheckpointError(f"{directory}: a ColBERT model starts from a BERT-family encoder "
                              "(word embeddings under params['embeddings']['word'])")
    source = backbone.tokenizer.backend.to_str()
    backends = []
    for _ in range(2):  # one backend per side: each tokenizer sets its own truncation on it
        backend = HFTokenizer.from_str(source)
        backend.add_tokens([AddedToken(marker, normalized=True) for marker in MARKERS])
        backends.append(backend)
    markers = [backends[0].token_to_id(m) for m in MARKERS]
    mask_id = backends[0].token_to_id("[MASK]")
    if mask_id is None:
        raise CheckpointError(f"{directory}: the tokenizer has no [MASK] token for query expansion")
    vocab = max(max(markers) + 1, int(word.shape[0]))
    word = np.asarray(word, np.float32)
    grown = np.concatenate([word, np.broadcast_to(word.mean(axis=0), (vocab - word.shape[0], word.shape[1]))])
    params = {**params, "embeddings": {**params["embeddings"], "word": grown}}
    cfg = dataclasses.replace(cfg, vocab_size=vocab)
    projection = colbert.init_projection(cfg.hidden_size, dim or colbert.DEFAULT_DIM, key=jax.random.key(seed))
    query_tok = tokenize.Tokenizer(backends[0], query_length - 1, cfg.pad_token_id, buckets=buckets)
    document_tok = tokenize.Tokenizer(backends[1], document_length - 1, cfg.pad_token_id, buckets=buckets)
    settings = {"query_prefix": MARKERS[0], "document_prefix": MARKERS[1],
                "skiplist_words": list(colbert.SKIPLIST_WORDS)}
    return ColbertEncoder(
        params=jax.device_put({**params, "projection": projection}), cfg=cfg, query_tokenizer=query_tok,
        document_tokenizer=document_tok, query_length=query_length, document_length=document_length,
        query_marker_id=markers[0], document_marker_id=markers[1], mask_token_id=mask_id,
        skiplist_ids=colbert.skiplist_ids(backends[1].get_vocab(), colbert.SKIPLIST_WORDS),
        settings=settings, path=directory)


def save_colbert(model: ColbertEncoder, directory: str | os.PathLike, *, params=None) -> Path:
    """Writes ``model`` (or these ``params``) in PyLate's layout; returns the directory."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    (directory / "1_Dense").mkdir(parents=True, exist_ok=True)
    params = jax.device_get(model.params if params is None else params)
    backbone = {k: v for k, v in params.items() if k != "projection"}
    save_file({k: np.asarray(v, np.float32) for k, v in hf.state_dict_from_params(backbone, model.cfg).items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    save_file(colbert.projection_to_state_dict(params["projection"]), str(directory / "1_Dense" / "model.safetensors"),
              metadata={"format": "pt"})
    hidden = int(params["projection"]["kernel"].shape[0])
    _write_json(directory / "1_Dense" / "config.json",
                {"in_features": hidden, "out_features": model.dim, "bias": False,
                 "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False})
    _write_json(directory / "config.json", {**model.cfg.to_hf(), "architectures": ["BertModel"]})
    _write_json(directory / "modules.json", [{"idx": 0, "name": "0", "path": "", "type": _ST_TRANSFORMER},
                                             {"idx": 1, "name": "1", "path": "1_Dense", "type": _PYLATE_DENSE}])
    _write_json(directory / "sentence_bert_config.json",
                {"max_seq_length": model.document_length - (model.document_marker_id is not None),
                 "do_lower_case": False})
    settings = {**model.settings, "model_type": "ColBERT", "similarity_fn_name": "MaxSim",
                "query_length": model.query_length, "document_length": model.document_length,
                "attend_to_expansion_tokens": model.attend_to_expansion, "do_query_expansion": model.do_query_expansion}
    _write_json(directory / "config_sentence_transformers.json", settings)
    if model.path is not None and Path(model.path).resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            if (Path(model.path) / name).is_file():
                shutil.copyfile(Path(model.path) / name, directory / name)
    _save_tokenizer(model.document_tokenizer.backend, directory / "tokenizer.json")  # the markers a fresh model added
    return directory


def _save_tokenizer(backend, path: Path) -> None:
    """``backend`` as a ``tokenizer.json`` without the truncation our tokenizers set on it."""
    from tokenizers import Tokenizer as HFTokenizer

    clean = HFTokenizer.from_str(backend.to_str())
    clean.no_truncation()
    clean.no_padding()
    clean.save(str(path))


def save_trained(model: ColbertEncoder, params, directory: str | os.PathLike) -> None:
    """A trained ColBERT model's export (a run's, into its workdir, local or ``gs://``): LoRA adapters
    merged into the weights, written by ``save_colbert`` (``export.save_merged``)."""
    from embedjax.export import save_merged

    save_merged(save_colbert, model, params, directory)

__all__ = ["ColbertEncoder", "colbert_from_backbone", "is_colbert_checkpoint", "load_colbert", "save_colbert", "save_trained"]
