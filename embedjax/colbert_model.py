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
    def dim(self) -> int:
        return int(self.params["projection"]["kernel"].shape[1])

    def encode_queries(self, texts: Sequence[str], *, batch_size: int = 32,
                       show_progress: bool | None = None) -> list[np.ndarray]:
        """Each query's (query_length, dim) float32 unit token vectors (without query expansion:
        its real tokens only)."""
        rows = []
        for e in self.query_tokenizer.encode(_check_texts(texts)):
            if self.do_query_expansion:
                rows.append(colbert.query_inputs(e.ids, self.query_length, marker_id=self.query_marker_id,
                                                 mask_token_id=self.mask_token_id,
                                                 attend_to_expansion=self.attend_to_expansion))
            else:
                ids, attention, _ = colbert.document_inputs(e.ids, marker_id=self.query_marker_id)
                rows.append((ids, attention, attention))
        return self._vectors(rows, batch_size, show_progress)

    def encode_documents(self, texts: Sequence[str], *, batch_size: int = 32,
                         show_progress: bool | None = None) -> list[np.ndarray]:
        """Each document's (scoring tokens, dim) float32 unit token vectors: padding and the
        skiplist's tokens removed."""
        rows = [colbert.document_inputs(e.ids, marker_id=self.document_marker_id, skiplist_ids=self.skiplist_ids)
                for e in self.document_tokenizer.encode(_check_texts(texts))]
        return self._vectors(rows, batch_size, show_progress)

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


def load_colbert(name_or_path: str | os.PathLike, *, query_length: int | None = None,
                 document_length: int | None = None,
                 buckets: Sequence[int] = tokenize.DEFAULT_BUCKETS) -> ColbertEncoder:
    """Loads a ColBERT model saved in PyLate's layout (a ``Transformer`` then PyLate's ``Dense``).
    ``query_length`` / ``document_length``: override the saved ones (tokens, markers included)."""
    from safetensors.numpy import load_file

    from embedjax.encoders import registry

    directory = hf.resolve(name_or_path)
    modules = hf.read_json(directory / "modules.json")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules or []]
    if kinds != ["Transformer", "Dense"] or modules[0].get("path", "") not in ("", "."):
        raise CheckpointError(f"{directory}: modules {kinds}; a ColBERT checkpoint in PyLate's layout is "
                              "['Transformer' (top level), 'Dense']")
    settings = hf.read_json(directory / "config_sentence_transformers.json") or {}
    if settings.get("model_type") not in (None, "ColBERT"):
        raise CheckpointError(f"{directory}: model_type {settings.get('model_type')!r}, not a ColBERT model")
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
    return directory


__all__ = ["ColbertEncoder", "load_colbert", "save_colbert"]
