"""Export an encoder as a Hugging Face / sentence-transformers directory.

The directory holds ``config.json`` + ``model.safetensors`` (loadable by transformers'
``AutoModel``), the tokenizer files, embedjax's record of how the encoder embeds
(``embedjax_config.json``: pooling, normalize, include_prompt, the EOS the tokenizer appends,
a trainable pooler's shape, with its params in ``pooler.safetensors``; a C-STS tri-encoder's head
kind, with its params in ``tri_head.safetensors``) and the
sentence-transformers modules (Transformer, Pooling, [Dense], Normalize), so
``SentenceTransformer(dir)`` and ``embedjax.load_pretrained(dir)`` both give the
encoder's embeddings, with no pooling argument needed on either side. A static table
(``embedjax.encoders.static``) is written in model2vec's layout instead (``config.json`` with its
``normalize``, the ``embeddings`` tensor, ``tokenizer.json``; modules StaticEmbedding, [Normalize]),
which ``model2vec.StaticModel.from_pretrained`` loads too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import jax
from etils import epath
from safetensors.numpy import save_file

from embedjax import dense_head, hf, paths, tri_head
from embedjax import pooling as pooling_lib
from embedjax.encoders import registry

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "added_tokens.json")
# embedjax pooling -> sentence-transformers Pooling mode names (concatenated in this order).
# cls_avg is Pooling(cls, mean) followed by a Dense module averaging the two halves.
ST_POOLING = {
    "cls": ("cls",),
    "mean": ("mean",),
    "max": ("max",),
    "mean_sqrt_len": ("mean_sqrt_len_tokens",),
    "weighted_mean": ("weightedmean",),
    "last_token": ("lasttoken",),
    "cls_avg": ("cls", "mean"),
}
_LEGACY_FLAG = {name: flag for flag, name in hf._ST_LEGACY_FLAGS.items()}
_ST_MODULES = "sentence_transformers.models."
# Files an earlier export to the same directory may have left that describe another model.
STALE_FILES = (*hf.EMBEDJAX_FILES, "modules.json")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def encoder_problem(encoder) -> str | None:
    """``sentence_transformers_problem`` of an ``Encoder`` as it is: its pooling, prompt rule, appended
    EOS, backbone module and attention."""
    return sentence_transformers_problem(
        encoder.pooling, encoder.include_prompt, getattr(encoder.tokenizer, "appends_eos", False),
        registry.of(encoder.cfg).sentence_transformers_module,
        bidirectional_decoder=getattr(encoder.cfg, "attention", None) == "bidirectional")


def sentence_transformers_problem(pooling: str, include_prompt: bool = True, appends_eos: bool = False,
                                  module: str = "Transformer", *, bidirectional_decoder: bool = False) -> str | None:
    """Why ``SentenceTransformer`` cannot reproduce this pooling, or None when it can.

    Every mode of ``pooling.MODES`` is expressible (``cls_avg`` as Pooling(cls, mean) +
    an averaging Dense) except ``weighted_mean`` with ``include_prompt=False``:
    sentence-transformers keeps a text token's position weight counted from the start
    of the prompt, embedjax's pooling sees only the pooled tokens and counts from 1;
    and ``latent_attention`` (NV-Embed's trainable cross-attention + MLP before the mean,
    arXiv:2405.17428), which no sentence-transformers module computes. ``appends_eos``
    (``Tokenizer.appends_eos``: embedjax appends an EOS the exported tokenizer files do not
    add) is a problem too: SentenceTransformer would tokenize without it. ``module``: the backbone's
    sentence-transformers module (``Backbone.sentence_transformers_module``); a ``StaticEmbedding``
    pools by mean and by nothing else. ``bidirectional_decoder``: a decoder LLM run with bidirectional
    attention (LLM2Vec, ``attention="bidirectional"``), which transformers' ``AutoModel`` runs causally.
    """
    if bidirectional_decoder:
        return ("the decoder runs with bidirectional attention (embedjax_config.json: attention), which "
                "SentenceTransformer / AutoModel would run causally")
    if module == "StaticEmbedding" and pooling != "mean":
        return f"a static table's StaticEmbedding module pools by mean, not {pooling!r}"
    if appends_eos:
        return ("the tokenizer appends an EOS that the checkpoint's tokenizer files do not add "
                "(append_eos_token_id in embedjax_config.json); SentenceTransformer would tokenize without it")
    if pooling == "latent_attention":
        return ("latent_attention pooling (a trainable latent cross-attention and MLP before the mean) has no "
                "sentence-transformers module; its params are in pooler.safetensors, read by embedjax only")
    if pooling not in ST_POOLING:
        return f"pooling {pooling!r} has no sentence-transformers equivalent"
    if pooling == "weighted_mean" and not include_prompt:
        return ("weighted_mean with include_prompt=False: sentence-transformers weights text tokens by their "
                "position counted from the start of the prompt, embedjax from the first pooled token")
    return None


def save_pretrained(encoder, directory: str | os.PathLike, *, params=None, normalize: bool | None = None,
                    sentence_transformers: bool = True) -> Path | epath.Path:
    """Writes ``encoder`` (with ``params`` if given, e.g. trained ones) to ``directory``.

    ``embedjax.load_pretrained(directory)`` (no arguments) then gives the encoder's
    embeddings: the pooling, ``normalize``, ``include_prompt``, the EOS id the tokenizer
    appends (``append_eos_token_id``, null when none) and a trainable pooler's shape
    (``pooler``, with its params in ``pooler.safetensors``) are recorded in
    ``embedjax_config.json``, which it reads before any sentence-transformers file.

    Args:
      encoder: an ``Encoder`` (its pooling, prompts, max_length and tokenizer files are exported).
      directory: created if needed; files are written next to whatever else is there
        (a training workdir keeps its checkpoints and metrics beside the export). A remote
        one (``gs://bucket/model``) is written to a local temporary directory first, then
        copied there with ``etils.epath``.
      params: parameters to write instead of ``encoder.params``.
      normalize: whether embeddings are L2-normalised by default (a sentence-transformers
        ``Normalize`` module, and ``Encoder.normalize`` on reload); None: ``encoder.normalize``.
      sentence_transformers: write the sentence-transformers modules (``modules.json``,
        ``1_Pooling``, ``2_Dense`` for ``cls_avg``, ``Normalize``) so that
        ``SentenceTransformer(directory)`` reproduces the embeddings. When the encoder's
        pooling cannot be expressed there (see ``sentence_transformers_problem``), this
        raises ``ValueError`` instead of writing a model that PyTorch users would load
        with different embeddings. ``False`` writes only the Hugging Face and embedjax
        files, removes a ``modules.json`` left by an earlier export (it would describe
        another model) and logs a warning: ``SentenceTransformer(directory)`` then has no
        modules to read and falls back to its own default (mean pooling, with its own
        warning), so such a directory is for embedjax (and ``AutoModel``) only.

    Why raise rather than write something approximate: an export is usually the last
    step of a training run, read later by someone who did not see the run; a directory
    that loads fine in sentence-transformers but embeds differently is the one failure
    nobody notices. Every mode except one corner (``weighted_mean`` with
    ``include_prompt=False``) is exact in sentence-transformers, so the raise only asks
    for a decision where there is really nothing faithful to write.

    Returns the directory (an ``epath.Path`` when remote).
    """
    if paths.is_remote(directory):
        kwargs = dict(params=params, normalize=normalize, sentence_transformers=sentence_transformers)
        with paths.staged(directory) as local:
            save_pretrained(encoder, local, **kwargs)
            stale = [name for name in STALE_FILES if not (local / name).exists()]
        target = epath.Path(directory)
        for name in stale:  # as a local export removes them
            (target / name).unlink(missing_ok=True)
        return target
    directory = Path(directory)
    normalize = bool(encoder.normalize if normalize is None else normalize)
    module = registry.of(encoder.cfg).sentence_transformers_module
    problem = encoder_problem(encoder)
    if sentence_transformers and problem:
        raise ValueError(f"cannot export for sentence-transformers: {problem}. SentenceTransformer would load "
                         "different embeddings; pass sentence_transformers=False to write only the Hugging Face "
                         "and embedjax files (embedjax.load_pretrained reproduces them), or choose another pooling")
    directory.mkdir(parents=True, exist_ok=True)
    params = encoder.params if params is None else params
    cfg = encoder.cfg
    tmp = directory / "model.safetensors.tmp"
    pooler = params.get("pooler") if encoder.pooling in pooling_lib.PARAMETRIC else None
    tri = params.get(tri_head.KEY)
    backbone = {k: v for k, v in params.items() if k not in ("pooler", tri_head.KEY, dense_head.KEY)}
    state = {**hf.unused_tensors(cfg, encoder.path), **hf.state_dict_from_params(backbone, cfg)}
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")  # atomic: never a half-written model file
    pooler_record = {}
    if pooler is not None:
        tmp = directory / (hf.POOLER_FILE + ".tmp")
        save_file(hf.flatten_params(jax.device_get(pooler)), str(tmp), metadata={"format": "embedjax"})
        tmp.replace(directory / hf.POOLER_FILE)
        pooler_record = {"pooler": pooling_lib.latent_attention_shape(pooler)}
    elif (directory / hf.POOLER_FILE).is_file():
        (directory / hf.POOLER_FILE).unlink()  # left by an earlier export of another pooling
    tri_record = {}
    if tri is not None:  # read by embedjax only: sentence-transformers loads the backbone, as a bi-encoder
        tmp = directory / (hf.TRI_HEAD_FILE + ".tmp")
        save_file(hf.flatten_params(jax.device_get(tri)), str(tmp), metadata={"format": "embedjax"})
        tmp.replace(directory / hf.TRI_HEAD_FILE)
        tri_record = {"tri_head": tri_head.kind_of(tri)}
    elif (directory / hf.TRI_HEAD_FILE).is_file():
        (directory / hf.TRI_HEAD_FILE).unlink()
    dense_record = {}
    if encoder.dense is not None:  # sentence-transformers' Dense module layout, whether or not modules.json names it
        path = dense_module_path(encoder.pooling)
        dense_head.write_sentence_transformers(directory / path, jax.device_get(params[dense_head.KEY]), encoder.dense)
        dense_record = {"dense": {"activation": encoder.dense, "path": path}}
    tokenizer = encoder.tokenizer
    eos = tokenizer.eos_token_id if getattr(tokenizer, "appends_eos", False) else None
    # model2vec reads its normalisation from config.json (a StaticEmbedding model's only config)
    static_record = {"normalize": normalize} if module == "StaticEmbedding" else {}
    _write_json(directory / "config.json", {**cfg.to_hf(), "torch_dtype": "float32", **static_record})
    source = hf.tokenizer_directory(Path(encoder.path)) if encoder.path is not None else None
    copied = []
    if source is not None and source.resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, directory / name)
                copied.append(name)
    if source is None or (not copied and source.resolve() != directory.resolve()):
        # no files to copy (a model made in memory, e.g. a distilled static table): the tokenizer itself
        encoder.tokenizer.backend.save(str(directory / "tokenizer.json"))

    version = __import__("embedjax").__version__
    _write_json(directory / hf.EMBEDJAX_CONFIG,
                {"pooling": encoder.pooling, "normalize": normalize, "include_prompt": encoder.include_prompt,
                 "append_eos_token_id": eos, **pooler_record, **tri_record, **dense_record,
                 **({"attention": cfg.attention} if hasattr(cfg, "attention") else {}),
                 "sentence_transformers": bool(sentence_transformers), "embedjax_version": version})
    _write_json(directory / "sentence_bert_config.json",
                {"max_seq_length": encoder.max_length, "do_lower_case": encoder.lowercase})
    _write_json(directory / "config_sentence_transformers.json",
                {"prompts": encoder.prompts, "default_prompt_name": encoder.default_prompt_name,
                 "similarity_fn_name": "cosine", "__version__": {"embedjax": version}})
    if sentence_transformers:
        _write_sentence_transformers_modules(directory, encoder, normalize)
    else:
        stale = directory / "modules.json"
        if stale.is_file():
            stale.unlink()
        log.warning("exported %s without sentence-transformers modules (pooling %r%s): SentenceTransformer(%r) "
                    "cannot load it as-is and would fall back to mean pooling; embedjax.load_pretrained "
                    "reproduces it", directory, encoder.pooling, f"; {problem}" if problem else "",
                    str(directory))
    return directory


def save_trained(encoder, params, directory: str | os.PathLike, *, sentence_transformers: bool = True,
                 peft_adapter: bool = False, base_model: str | None = None):
    """A trained encoder's export (a run's, into its workdir): LoRA adapters merged into the
    weights, so the directory is a plain Hugging Face / sentence-transformers model
    (``save_pretrained`` with ``normalize=True``: scored as training evaluated it). With LoRA and
    ``peft_adapter`` also ``directory/adapter``, a PEFT adapter directory that
    ``peft.PeftModel.from_pretrained`` loads over ``base_model``."""
    import dataclasses

    from embedjax import lora

    if encoder.cfg.lora is not None and peft_adapter:
        with paths.staged(epath.Path(directory) / "adapter") as adapter:  # gs://: written locally, then copied
            lora.save_peft(adapter, params, encoder.cfg, base_model_name_or_path=str(base_model))
    merged, cfg = lora.merge(params, encoder.cfg) if encoder.cfg.lora is not None else (params, encoder.cfg)
    return save_pretrained(dataclasses.replace(encoder, cfg=cfg), directory, params=merged, normalize=True,
                           sentence_transformers=sentence_transformers)


def dense_module_path(pooling: str) -> str:
    """Where an export keeps its Dense head: the sentence-transformers module after the pooling
    (after cls_avg's averaging Dense when there is one)."""
    return "3_Dense" if pooling == "cls_avg" else "2_Dense"


def _write_sentence_transformers_modules(directory: Path, encoder, normalize: bool) -> None:
    hidden = encoder.cfg.hidden_size
    st_modes = ST_POOLING[encoder.pooling]
    module = registry.of(encoder.cfg).sentence_transformers_module

    def add(kind: str, path: str | None = None) -> Path:
        i = len(modules)
        path = f"{i}_{kind}" if path is None else path
        modules.append({"idx": i, "name": str(i), "path": path, "type": _ST_MODULES + kind})
        return directory / path

    if module == "StaticEmbedding":  # model2vec's layout: the table pools by mean itself (no Pooling module)
        modules = [{"idx": 0, "name": "0", "path": ".", "type": _ST_MODULES + module}]
        if encoder.dense is not None:  # written by save_pretrained at dense_module_path
            add("Dense", dense_module_path(encoder.pooling))
            log.warning("%s: a static table with a Dense head: SentenceTransformer and embedjax apply it, "
                        "model2vec's StaticModel (which reads only the table) does not", directory)
        if normalize:
            add("Normalize")
        _write_json(directory / "modules.json", modules)
        return
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_MODULES + "Transformer"}]

    # Legacy flags (read by every sentence-transformers version, converted by >= 6) plus the dimension
    # under both its old and new names.
    pool = {"word_embedding_dimension": hidden, **{flag: False for flag in _LEGACY_FLAG.values()},
            **{_LEGACY_FLAG[m]: True for m in st_modes}, "include_prompt": encoder.include_prompt}
    _write_json(add("Pooling") / "config.json", pool)
    if encoder.pooling == "cls_avg":
        # [cls, mean] (2H) -> (cls + mean) / 2 (H): halves are exact in float, so the result is too.
        dense = add("Dense")
        _write_json(dense / "config.json", {"in_features": 2 * hidden, "out_features": hidden, "bias": False,
                                            "activation_function": "torch.nn.modules.linear.Identity"})
        save_file({"linear.weight": hf.cls_avg_dense_weight(hidden)}, str(dense / "model.safetensors"),
                  metadata={"format": "pt"})
    if encoder.dense is not None:  # written by save_pretrained at dense_module_path
        add("Dense")
    if normalize:
        add("Normalize")
    _write_json(directory / "modules.json", modules)


def save_merged(save, model, params, directory: str | os.PathLike) -> None:
    """A training run's export in its model kind's own layout (cross-encoder, SPLADE, ColBERT,
    three-head): LoRA adapters merged into the weights, then ``save(model, local_dir, params=...)``
    into ``directory`` (a ``gs://`` workdir is staged locally and uploaded)."""
    import dataclasses

    from embedjax import lora

    cfg = model.cfg
    if cfg.lora is not None:
        params, cfg = lora.merge(params, cfg)
    with paths.staged(directory) as local:
        save(dataclasses.replace(model, cfg=cfg), local, params=params)
