"""``load_pretrained`` and ``Encoder``: the user-facing way to embed texts."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax import dense_head, hf, tokenize
from embedjax.embed import embed_jit
from embedjax.encoders import registry
from embedjax.encoders.statedict import CheckpointError
from embedjax import pooling as pooling_lib
from embedjax import tri_head as tri_head_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Encoder:
    """A loaded text encoder: params, architecture, tokenizer and how to pool.

    ``params`` is a plain pytree and ``cfg`` a static config: pass them to
    ``embedjax.embed`` (or the backbone's ``apply``) to use the pure functions directly.
    With a trainable pooling (``latent_attention``) the pooler's params are
    ``params["pooler"]``, leaves of the same tree (they train and export with the model).
    ``prompts`` / ``include_prompt``: the checkpoint's instructions ({"query": ...,
    "document": ...}) and whether pooling reads their tokens (False: the instruction's
    ``tokenizer.prompt_length`` leading tokens are skipped, as in training).
    ``normalize`` is the checkpoint's own setting (a sentence-transformers ``Normalize``
    module, or an embedjax export's record): ``encode`` L2-normalises by default exactly
    when it is True, as ``SentenceTransformer.encode`` does. ``dense``: the activation of a
    Dense head after pooling (``params["dense"]``, ``embedjax.dense_head``: a sentence-transformers
    ``Dense`` module, a fitted whitening), None without one.
    """

    params: Any
    cfg: Any  # the backbone's static config (embedjax.encoders.registry)
    tokenizer: tokenize.Tokenizer
    pooling: str = "mean"
    max_length: int = 512
    prompts: dict = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    include_prompt: bool = True
    lowercase: bool = False
    path: Path | None = None
    normalize: bool = False
    dense: str | None = None
    # params replicated on each mesh encode() was given: placed once, not on every call
    _placed: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def dim(self) -> int:
        """Embedding width (the Dense head's output width when there is one)."""
        if self.dense is not None:
            return dense_head.out_features(self.params[dense_head.KEY])
        return self.cfg.hidden_size

    def encode(
        self,
        texts: str | Sequence[str],
        *,
        batch_size: int = 64,
        normalize: bool | None = None,
        dim: int | None = None,
        num_layers: int | None = None,
        prompt: str | None = None,
        prompt_name: str | None = None,
        show_progress: bool | None = None,
        mesh: jax.sharding.Mesh | None = None,
        token_prepending=None,
        contrastive_prompting=None,
        auxiliary_texts: str | Sequence[str] | None = None,
    ) -> np.ndarray:
        """Embeds texts; returns float32 (N, D), or (D,) for a single string.

        Texts are sorted by length so batches waste little padding, padded to
        static length buckets, and the result comes back in the caller's order.

        Args:
          texts: a string or a sequence of strings (empty strings are fine).
          batch_size: texts per forward pass.
          normalize: L2-normalise (after ``dim`` truncation); None (default): the
            checkpoint's setting, ``self.normalize`` (True for a checkpoint with a
            sentence-transformers ``Normalize`` module, e.g. all-MiniLM-L6-v2).
          dim: keep the first ``dim`` components (Matryoshka truncation).
          num_layers: use only the first k transformer layers (2D Matryoshka).
          prompt: an instruction prefixed to every text, e.g. ``"query: "``.
          prompt_name: a prompt named in the checkpoint's
            ``config_sentence_transformers.json`` (its ``default_prompt_name``
            applies when neither ``prompt`` nor ``prompt_name`` is given).
          show_progress: a tqdm bar; None shows one for long encodes on a terminal.
          mesh: split every batch's rows over this mesh's devices (params replicated on
            it), e.g. ``embedjax.sharding.local_mesh()``; None: the default device.
            The embeddings are the same either way.
          token_prepending, contrastive_prompting: decoder backbones' training-free options
            (``embedjax.encoders.decoder.TokenPrepending`` / ``ContrastivePrompting``), passed to
            ``embed`` only when set; ``embedjax.prompting`` wraps them with their templates.
          auxiliary_texts: with ``contrastive_prompting`` (and only then): one auxiliary prompt
            per text, run beside it (the prompt / ``prompt_name`` prefix applies to both).
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(_check_texts(texts))
        aux = _auxiliary(auxiliary_texts, contrastive_prompting, len(texts))
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dim is not None and not 1 <= dim <= self.dim:
            raise ValueError(f"dim must be in 1..{self.dim}, got {dim}")
        if num_layers is not None and not 1 <= num_layers <= self.cfg.num_layers:
            raise ValueError(f"num_layers must be in 1..{self.cfg.num_layers}, got {num_layers}")
        width = dim or self.dim
        normalize = self.normalize if normalize is None else bool(normalize)
        if not texts:
            return np.zeros((0, width), np.float32)

        prefix = self._prompt(prompt, prompt_name)
        if prefix:
            texts = [prefix + t for t in texts]
            aux = aux and [prefix + t for t in aux]
        if self.lowercase:
            texts = [t.lower() for t in texts]
            aux = aux and [t.lower() for t in aux]
            prefix = prefix.lower()
        # Tokens of the instruction that pooling skips when the checkpoint says so (the same count
        # as the training pipeline's: Tokenizer.prompt_length).
        skip = self.tokenizer.prompt_length(prefix) if not self.include_prompt else 0

        encodings = self.tokenizer.encode(texts)
        aux_encodings = None if aux is None else self.tokenizer.encode(aux)
        lengths = [len(e.ids) for e in encodings]
        if aux_encodings is not None:  # a text and its auxiliary prompt share a row length
            lengths = [max(n, len(e.ids)) for n, e in zip(lengths, aux_encodings)]
        order = np.argsort([-n for n in lengths], kind="stable")
        starts = range(0, len(order), batch_size)
        params, place = self._inference_params(mesh), np.asarray
        if mesh is not None:
            rows_sharding = NamedSharding(mesh, P(mesh.axis_names))
            place = lambda x: jax.device_put(x, rows_sharding)  # noqa: E731
        pending = []
        for start in _progress(starts, len(texts), batch_size, show_progress):
            chunk = order[start : start + batch_size]
            rows = tokenize.rows_for(len(chunk), batch_size)
            if mesh is not None:  # every device gets the same number of rows
                rows = -(-rows // mesh.size) * mesh.size
            if aux_encodings is None:
                batch = self.tokenizer.pad([encodings[i] for i in chunk], rows)
            else:  # the texts' rows, then their auxiliary prompts' (embed returns the first half)
                batch = _pad_pairs(self.tokenizer, [encodings[i] for i in chunk], [aux_encodings[i] for i in chunk],
                                   rows)
            pool_mask = batch.attention_mask.copy()
            pool_mask[:, :skip] = 0
            z = embed_jit(
                params,
                self.cfg,
                place(batch.input_ids),
                place(batch.attention_mask),
                place(batch.token_type_ids),
                place(pool_mask),
                pooling=self.pooling,
                normalize=normalize,
                dim=dim,
                num_layers=num_layers,
                dense=self.dense,
                token_prepending=token_prepending,
                contrastive_prompting=contrastive_prompting,
            )
            pending.append((chunk, z))  # dispatch is async: tokenization overlaps compute
        out = np.empty((len(texts), width), np.float32)
        for chunk, z in pending:
            out[chunk] = np.asarray(z)[: len(chunk)]
        return out[0] if single else out

    def _inference_params(self, mesh: jax.sharding.Mesh | None):
        """The params ``encode`` runs on, cached until the params change: replicated on ``mesh`` (when
        given, placed once rather than on every call), and on CPU with the layer stack as a tuple of
        per-layer zero-copy views (``_layer_views``), so that no compiled call copies weights out of
        the stack. The same values either way."""
        leaves = jax.tree.leaves(self.params)
        # a new params tree, or any leaf replaced in place (enc.params["dense"] = ...), is prepared anew
        key = (mesh, jax.tree.structure(self.params), tuple(map(id, leaves)))
        if key not in self._placed:
            self._placed.clear()  # one copy at a time
            params = self.params if mesh is None else jax.device_put(self.params, NamedSharding(mesh, P()))
            if registry.of(self.cfg).unstacked_layers and isinstance(params, Mapping) and "layers" in params:
                views = _layer_views(params["layers"], self.cfg.num_layers)
                if views is not None:
                    params = {**params, "layers": views}
            # the source leaves are kept with the prepared tree, so their ids cannot be reused meanwhile
            self._placed[key] = (leaves, params)
        return self._placed[key][1]

    def _prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        if prompt is not None and prompt_name is not None:
            raise ValueError("pass prompt or prompt_name, not both")
        if prompt is not None:
            return prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise KeyError(f"prompt_name {name!r} not in this checkpoint's prompts {sorted(self.prompts)}")
        return self.prompts[name]


_MAX_LAYER_COPY = 1 << 20  # bytes: a per-layer slice this small may be copied (an unaligned view)


def _layer_views(stack, total: int):
    """A stacked layer tree on CPU (leaves ``(total, ...)``, each on one device or replicated) as a
    tuple of ``total`` per-layer trees whose arrays share the stack's memory (numpy views of the CPU
    buffers, placed zero-copy on the same devices); None when that is not possible without copying
    real weights (another platform, split arrays, a big slice that would be copied)."""
    leaves, treedef = jax.tree.flatten(stack)
    per_layer = [[] for _ in range(total)]
    for x in leaves:
        if (not isinstance(x, jax.Array) or x.ndim < 1 or x.shape[0] != total or not x.is_fully_replicated
                or any(d.platform != "cpu" for d in x.sharding.device_set)):
            return None
        shards = x.addressable_shards
        hosts = [np.asarray(s.data) for s in shards]  # CPU buffers as numpy: no copy
        small = x.nbytes // total <= _MAX_LAYER_COPY
        for i in range(total):
            arrays = []
            for host, shard in zip(hosts, shards):
                view = host[i]
                a = jax.device_put(view, shard.device)
                if not small and a.unsafe_buffer_pointer() != view.ctypes.data:
                    return None  # copied: keep the stack
                arrays.append(a)
            if len(arrays) == 1 and not x.committed:
                per_layer[i].append(arrays[0])
            else:
                per_layer[i].append(jax.make_array_from_single_device_arrays(x.shape[1:], x.sharding, arrays))
    return tuple(jax.tree.unflatten(treedef, layer) for layer in per_layer)


def _check_texts(texts) -> list[str]:
    if not isinstance(texts, Sequence) and not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__} ({t!r:.60}), expected str")
    return texts


def _auxiliary(auxiliary_texts, contrastive_prompting, n: int) -> list[str] | None:
    """``encode``'s auxiliary prompts: one per text with Contrastive Prompting, else none."""
    if contrastive_prompting is None:
        if auxiliary_texts is not None:
            raise ValueError("auxiliary_texts are read only with contrastive_prompting")
        return None
    if auxiliary_texts is None:
        raise ValueError("contrastive_prompting needs auxiliary_texts: one auxiliary prompt per text")
    aux = [auxiliary_texts] if isinstance(auxiliary_texts, str) else _check_texts(auxiliary_texts)
    if len(aux) != n:
        raise ValueError(f"auxiliary_texts: {len(aux)} for {n} texts; one auxiliary prompt per text")
    return aux


def _pad_pairs(tokenizer: tokenize.Tokenizer, first, second, rows: int) -> tokenize.Batch:
    """Two lists of encodings padded to one length: ``rows`` rows of ``first``, then ``rows`` of ``second``."""
    length = max(len(e.ids) for e in [*first, *second])
    a, b = tokenizer.pad(first, rows, min_length=length), tokenizer.pad(second, rows, min_length=length)
    return tokenize.Batch(*(np.concatenate([x, y]) for x, y in ((a.input_ids, b.input_ids),
                                                                 (a.attention_mask, b.attention_mask),
                                                                 (a.token_type_ids, b.token_type_ids))), a.size)


def _progress(starts, n_texts: int, batch_size: int, show: bool | None):
    if show is False or (show is None and n_texts <= 16 * batch_size):
        return starts
    from tqdm.auto import tqdm

    return tqdm(starts, desc="encode", unit="batch", disable=None if show is None else False)


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    pooling: str | None = None,
    max_length: int | None = None,
    dtype: str | None = None,
    buckets: Sequence[int] = tokenize.DEFAULT_BUCKETS,
    append_eos: bool | None = None,
    pooler_init: Mapping[str, Any] | None = None,
    attention: str | None = None,
    tri_head: str | None = None,
    seed: int = 0,
) -> Encoder:
    """Loads a Hugging Face / sentence-transformers checkpoint as an ``Encoder``.

    Args:
      name_or_path: a local checkpoint directory or a hub id (e.g.
        ``"sentence-transformers/all-MiniLM-L6-v2"``, downloaded when online).
      pooling: one of ``pooling.MODES``; default: the pooling recorded by an
        embedjax export (``embedjax_config.json``), else the checkpoint's
        sentence-transformers pooling, else ``"mean"``.
      max_length: truncation length in tokens; default: the checkpoint's
        ``max_seq_length``, else the model's position limit.
      dtype: compute dtype (``"float32"`` or ``"bfloat16"``); params stay float32.
      buckets: candidate padded lengths (capped at ``max_length``).
      append_eos: end every encoding with the model's EOS id (``Tokenizer(eos_token_id=)``; a
        no-op when the tokenizer already does). None (default): what an embedjax export
        recorded, else on exactly when pooling is ``last_token`` and the checkpoint's tokenizer
        does not add the EOS itself (decoders pool the EOS state). The id: ``config.json``'s
        ``eos_token_id`` (the first of a list), else ``tokenizer_config.json``'s ``eos_token``.
      attention: decoder LLMs: ``"causal"`` (as pretrained) or ``"bidirectional"``; default: the
        mode an embedjax export recorded, else the checkpoint's own.
      pooler_init: with ``latent_attention`` pooling and no exported pooler in the checkpoint,
        ``pooling.init_latent_attention``'s keyword arguments for a fresh one (default: 512
        latents, 8 heads), initialised from ``seed``; an export's pooler is loaded instead.
      tri_head: a C-STS tri-encoder's head (``embedjax.tri_head.KINDS``) as ``params["tri_head"]``:
        the export's (``tri_head.safetensors``, loaded whenever the export has one), else a fresh
        one seeded by ``seed``.

    ``Encoder.normalize`` (what ``encode`` does by default) and ``include_prompt``
    come from the same places: the embedjax record, else the sentence-transformers
    modules (``normalize`` is True when there is a ``Normalize`` module), else False / True.
    """
    overrides = {"dtype": jnp.dtype(dtype).name} if dtype else {}
    params, cfg, directory = hf.load_checkpoint(name_or_path, **overrides)
    st = hf.read_sentence_transformers(directory)
    record = hf.read_embedjax_config(directory)
    attention = attention or record.get("attention")
    if attention:
        if not hasattr(cfg, "attention"):
            raise ValueError(f"attention={attention!r}: the {cfg.model_type} backbone has no attention mode to choose")
        cfg = dataclasses.replace(cfg, attention=attention)
    pooling = pooling or record.get("pooling") or st.pooling or "mean"
    if pooling not in pooling_lib.MODES:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {pooling_lib.MODES}")
    max_length = int(max_length or st.max_seq_length or cfg.max_length)
    if not 1 <= max_length <= cfg.max_length:
        raise ValueError(f"max_length must be in 1..{cfg.max_length} for this model, got {max_length}")
    tokenizer = tokenize.Tokenizer.from_directory(hf.tokenizer_directory(directory), max_length, cfg.pad_token_id,
                                                  buckets=buckets)
    options = registry.of(cfg).tokenizer_options  # how the family reads texts (a static table: no special tokens)
    if options is not None:
        tokenizer = tokenizer.replace(**options(cfg, tokenizer.backend))
    eos = _eos_to_append(directory, tokenizer, record, pooling, append_eos)
    if eos is not None:
        tokenizer = tokenizer.replace(eos_token_id=eos)
    if pooling in pooling_lib.PARAMETRIC:
        params = {**params, "pooler": _pooler(directory, record, pooling, cfg.hidden_size, pooler_init, seed)}
    head = _tri_head(directory, record, tri_head, cfg.hidden_size, seed)
    if head is not None:
        params = {**params, tri_head_lib.KEY: head}
    dense = None
    dense_dir = directory / record["dense"]["path"] if record.get("dense") else st.dense_dir
    if dense_dir is not None:
        projection, dense = dense_head.read_sentence_transformers(dense_dir)
        if projection["kernel"].shape[0] != cfg.hidden_size:
            raise CheckpointError(f"{dense_dir}: a Dense module of in_features {projection['kernel'].shape[0]} "
                                  f"after pooling {pooling!r} of width {cfg.hidden_size}")
        params = {**params, dense_head.KEY: projection}
    return Encoder(
        params=jax.device_put(params),
        cfg=cfg,
        tokenizer=tokenizer,
        pooling=pooling,
        max_length=max_length,
        prompts=st.prompts,
        default_prompt_name=st.default_prompt_name,
        include_prompt=record.get("include_prompt", st.include_prompt),
        lowercase=st.do_lower_case,
        path=directory,
        normalize=record.get("normalize", st.normalize),
        dense=dense,
    )


def eos_token_id(directory: Path, backend=None) -> int | None:
    """The checkpoint's EOS id: ``config.json``'s ``eos_token_id`` (the first of a list), else
    ``tokenizer_config.json``'s ``eos_token`` looked up in ``backend`` (a ``tokenizers`` object)."""
    config = hf.read_json(Path(directory) / "config.json") or {}
    eos = config.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if isinstance(eos, int) and not isinstance(eos, bool):
        return eos
    token = (hf.read_json(Path(directory) / "tokenizer_config.json") or {}).get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and backend is not None:
        return backend.token_to_id(token)
    return None


def _eos_to_append(directory: Path, tokenizer: tokenize.Tokenizer, record: dict, pooling: str,
                   append_eos: bool | None) -> int | None:
    if append_eos is None and "append_eos_token_id" in record:
        return record["append_eos_token_id"]
    if append_eos is False or (append_eos is None and pooling != "last_token"):
        return None
    eos = eos_token_id(directory, tokenizer.backend)
    if eos is None:
        if append_eos:
            raise ValueError(f"{directory}: append_eos=True but the checkpoint names no EOS token "
                             "(config.json eos_token_id, tokenizer_config.json eos_token)")
        return None
    return eos


def _tri_head(directory: Path, record: dict, kind: str | None, hidden: int, seed: int) -> dict | None:
    saved = hf.read_tri_head(directory, record)
    if saved is not None:
        if kind is not None and kind != record["tri_head"]:
            raise ValueError(f"{directory}: the export's tri-encoder head is {record['tri_head']!r}, not {kind!r}")
        return jax.tree.map(jnp.asarray, saved)
    if kind is None:
        return None
    return tri_head_lib.init(jax.random.fold_in(jax.random.key(seed), 3), hidden, kind)


def _pooler(directory: Path, record: dict, pooling: str, hidden: int, pooler_init, seed: int) -> dict:
    params = hf.read_pooler(directory, record) if record.get("pooling") == pooling else None
    if params is not None:
        if pooler_init:
            log.warning("%s: the exported %s pooler is loaded; pooler_init %s is not used", directory, pooling,
                        dict(pooler_init))
        return jax.tree.map(jnp.asarray, params)
    log.info("%s: a fresh %s pooler (seed %d, %s)", directory, pooling, seed, dict(pooler_init or {}))
    return pooling_lib.init_latent_attention(jax.random.key(seed), hidden, **dict(pooler_init or {}))
