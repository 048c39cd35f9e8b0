"""``load_cross_encoder`` and ``CrossEncoder``: score and rerank text pairs with a cross-encoder.

A checkpoint in the Hugging Face ``*ForSequenceClassification`` layout (what
sentence-transformers' ``CrossEncoder`` saves and loads) loads with its head; a plain backbone
(e.g. all-MiniLM-L6-v2) loads with a fresh head to train. ``save_cross_encoder`` writes the same
layout back, which ``sentence_transformers.CrossEncoder`` and transformers'
``AutoModelForSequenceClassification`` load.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax import cross_encoder as ce
from embedjax import hf, tokenize
from embedjax.export import TOKENIZER_FILES, _write_json
from embedjax.model import _progress

ACTIVATIONS = ("sigmoid", "identity")
_ST_ACTIVATION = {"sigmoid": "torch.nn.modules.activation.Sigmoid", "identity": "torch.nn.modules.linear.Identity"}
CROSS_ENCODER_RECORD = "embedjax_cross_encoder.json"


@dataclasses.dataclass
class CrossEncoder:
    """A loaded cross-encoder: params (the backbone's tree plus ``params["head"]``), the backbone's
    static config, the head, the pair tokenizer and the activation ``predict`` applies.

    ``template``: decoders read a pair as one text, ``template.format(first=a, second=b)``;
    None: the tokenizer's own pair encoding (``[CLS] a [SEP] b [SEP]`` with token types for BERT).
    ``activation``: ``"sigmoid"`` (the default for one logit, as sentence-transformers) or
    ``"identity"``.
    """

    params: Any
    cfg: Any
    head: ce.HeadSpec
    tokenizer: tokenize.Tokenizer
    max_length: int = 512
    activation: str = "sigmoid"
    template: str | None = None
    path: Path | None = None
    # params replicated on the mesh predict() was last given: placed once, not on every call
    _placed: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_labels(self) -> int:
        return self.head.num_labels

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list:
        """Token encodings of the pairs (truncated longest-first to ``max_length``, unpadded)."""
        pairs = _check_pairs(pairs)
        if self.template is not None:
            return self.tokenizer.encode([self.template.format(first=a, second=b) for a, b in pairs])
        return self.tokenizer.encode(pairs)

    def predict(self, pairs: Sequence[tuple[str, str]], *, batch_size: int = 32, activation: bool = True,
                show_progress: bool | None = None, mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
        """Scores pairs: float32 (N,) with one label, else (N, num_labels).

        Pairs are sorted by length, padded to static buckets, and returned in the caller's order.
        ``activation``: apply ``self.activation`` to the logits (False: raw logits).
        ``mesh``: split each batch's rows over its devices (params replicated); same scores.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        encodings = self.encode_pairs(pairs)
        out = np.empty((len(encodings), self.num_labels), np.float32)
        params, place = self.params, np.asarray
        if mesh is not None:
            key = (mesh, id(self.params))  # a new params tree (model.params = ...) is placed anew
            if key not in self._placed:
                self._placed.clear()  # one copy at a time; the source tree is kept so its id stays unique
                self._placed[key] = (self.params, jax.device_put(self.params, NamedSharding(mesh, P())))
            params = self._placed[key][1]
            rows_sharding = NamedSharding(mesh, P(mesh.axis_names))
            place = lambda x: jax.device_put(x, rows_sharding)  # noqa: E731
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        starts = _progress(range(0, len(order), batch_size), len(order), batch_size, show_progress)
        pending = []
        for start in starts:
            chunk = order[start:start + batch_size]
            rows = tokenize.rows_for(len(chunk), batch_size)
            if mesh is not None:
                rows = -(-rows // mesh.size) * mesh.size
            batch = self.tokenizer.pad([encodings[i] for i in chunk], rows)
            logits = ce.score_jit(params, self.cfg, self.head, place(batch.input_ids), place(batch.attention_mask),
                                  place(batch.token_type_ids))
            pending.append((chunk, logits))  # async dispatch: tokenization of the next batch overlaps
        for chunk, logits in pending:
            out[chunk] = np.asarray(logits)[: len(chunk)]
        if activation and self.activation == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-out))
        return out[:, 0] if self.num_labels == 1 else out

    def rank(self, query: str, documents: Sequence[str], *, top_k: int | None = None, batch_size: int = 32,
             return_documents: bool = False) -> list[dict]:
        """The documents sorted by their score with ``query``, best first: ``{"corpus_id", "score"}``
        (and ``"text"`` with ``return_documents``), as ``sentence_transformers.CrossEncoder.rank``."""
        if self.num_labels != 1:
            raise ValueError(f"rank needs a one-logit cross-encoder, this one has {self.num_labels} labels")
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        documents = list(documents)
        scores = self.predict([(query, d) for d in documents], batch_size=batch_size)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [{"corpus_id": int(i), "score": float(scores[i]), **({"text": documents[i]} if return_documents else {})}
                for i in order]


def _check_pairs(pairs) -> list[tuple[str, str]]:
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise TypeError(f"pairs must be a sequence of (str, str) pairs, got {type(pairs).__name__}")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or len(pair) != 2 or not all(isinstance(t, str) for t in pair):
            raise TypeError(f"pairs[{i}] is {pair!r:.80}, expected a (str, str) pair")
        out.append((pair[0], pair[1]))
    return out


def _activation_of(config: dict, num_labels: int) -> str:
    """sentence-transformers' rule: the saved ``activation_fn``, else sigmoid for one label."""
    saved = (config.get("sentence_transformers") or {}).get("activation_fn") \
        or config.get("sbert_ce_default_activation_function")
    if saved:
        for name, path in _ST_ACTIVATION.items():
            if saved.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]:
                return name
        raise ValueError(f"activation_fn {saved!r} is not supported; embedjax applies {ACTIVATIONS}")
    return "sigmoid" if num_labels == 1 else "identity"


def load_cross_encoder(name_or_path: str | os.PathLike, *, num_labels: int | None = None, max_length: int | None = None,
                       dtype: str | None = None, template: str | None = None, activation: str | None = None,
                       buckets: Sequence[int] = tokenize.DEFAULT_BUCKETS, seed: int = 0) -> CrossEncoder:
    """Loads a cross-encoder from a checkpoint directory or hub id.

    Args:
      name_or_path: a ``*ForSequenceClassification`` checkpoint (its head is loaded) or a plain
        backbone (a fresh head from ``seed``; a BERT checkpoint's pooler is kept, as transformers does).
      num_labels: logits per pair; default: the checkpoint's head, else 1. A head of another width
        in the checkpoint is an error.
      max_length: truncation of the pair in tokens; default: the recorded one, else min(512, the
        model's limit).
      dtype: compute dtype (``"float32"`` or ``"bfloat16"``); params stay float32.
      template: decoders: ``"...{first}...{second}..."`` formats a pair into one text (default:
        the recorded one, else the tokenizer's pair encoding).
      activation: ``"sigmoid"`` or ``"identity"``; default: the checkpoint's
        sentence-transformers ``activation_fn``, else sigmoid for one label, identity otherwise.
    """
    overrides = {"dtype": jnp.dtype(dtype).name} if dtype else {}
    directory = hf.resolve(name_or_path)
    config = hf.read_json(directory / "config.json")
    if config is None:
        raise hf.CheckpointError(f"{directory}: no config.json")
    from embedjax.encoders import registry

    cfg = registry.config_from_hf(config, **overrides)
    state = hf.load_state_dict(directory)
    params = hf.params_from_state_dict(state, cfg)
    head_params = ce.head_from_state_dict(state, cfg)
    record = hf.read_json(directory / CROSS_ENCODER_RECORD) or {}
    kind = ce.head_kind_for(cfg)
    has_out = head_params is not None and "out" in head_params
    saved_labels = ce.num_labels_of(head_params) if has_out else None
    if num_labels is not None and saved_labels is not None and num_labels != saved_labels:
        raise ValueError(f"{directory}: its head gives {saved_labels} labels, num_labels={num_labels} was asked")
    labels = num_labels or saved_labels or 1
    head = ce.HeadSpec(kind, labels)
    if not has_out:
        fresh = ce.init_head(cfg, head, jax.random.key(seed))
        head_params = {**fresh, **(head_params or {})} if kind == "first_token" else fresh
    max_length = int(max_length or record.get("max_length") or min(512, cfg.max_length))
    if not 1 <= max_length <= cfg.max_length:
        raise ValueError(f"max_length must be in 1..{cfg.max_length} for this model, got {max_length}")
    activation = activation or _activation_of(config, labels)
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    template = template if template is not None else record.get("template")
    if template is not None:
        try:
            template.format(first="", second="")
        except (KeyError, IndexError) as e:
            raise ValueError(f"template {template!r} may only use the fields {{first}} and {{second}}") from e
    tokenizer = tokenize.Tokenizer.from_directory(directory, max_length, cfg.pad_token_id, buckets=buckets)
    return CrossEncoder(params=jax.device_put({**params, "head": head_params}), cfg=cfg, head=head,
                        tokenizer=tokenizer, max_length=max_length, activation=activation, template=template,
                        path=directory)


def save_cross_encoder(model: CrossEncoder, directory: str | os.PathLike, *, params=None) -> Path:
    """Writes ``model`` (or these ``params``) as a ``*ForSequenceClassification`` checkpoint.

    The directory holds ``config.json`` (with the activation recorded where
    sentence-transformers' ``CrossEncoder`` reads it), ``model.safetensors``, the tokenizer files
    and ``embedjax_cross_encoder.json`` (max_length, template). Returns the directory.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.device_get(model.params if params is None else params)
    cfg = model.cfg
    backbone = {k: v for k, v in params.items() if k != "head"}
    prefix = ce.model_prefix(cfg)
    state = {prefix + k: v for k, v in hf.state_dict_from_params(backbone, cfg).items()}
    state.update(ce.head_state_dict(params["head"], cfg))
    tmp = directory / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")  # atomic: never a half-written model file
    labels = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
    version = __import__("embedjax").__version__
    config = {**cfg.to_hf(), "architectures": [ce.architecture(cfg)], "id2label": labels,
              "label2id": {v: int(k) for k, v in labels.items()}, "torch_dtype": "float32",
              "sentence_transformers": {"activation_fn": _ST_ACTIVATION[model.activation],
                                        "version": f"embedjax {version}"}}
    _write_json(directory / "config.json", config)
    if model.path is not None and Path(model.path).resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            if (Path(model.path) / name).is_file():
                shutil.copyfile(Path(model.path) / name, directory / name)
    _write_json(directory / CROSS_ENCODER_RECORD,
                {"max_length": model.max_length, "template": model.template, "head": model.head.kind,
                 "embedjax_version": version})
    return directory



def save_trained(model: CrossEncoder, params, directory: str | os.PathLike) -> None:
    """A trained cross-encoder's export (a run's, into its workdir, local or ``gs://``): LoRA adapters
    merged into the weights, written by ``save_cross_encoder`` (``export.save_merged``)."""
    from embedjax.export import save_merged

    save_merged(save_cross_encoder, model, params, directory)