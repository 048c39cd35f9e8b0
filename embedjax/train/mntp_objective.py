"""LLM2Vec's masked next-token prediction as a training objective (``objective.loss = "mntp"``,
arXiv:2404.05961): a decoder run with bidirectional attention predicts masked tokens of its
training texts through its own LM head, the state at position i - 1 predicting the token at i
(``embedjax.mntp``). The first training stage of LLM2Vec's recipe (``configs/llm2vec_mntp.py``);
the second is unsupervised SimCSE on its export (``configs/llm2vec_simcse.py``).

* Data: single texts (``data.kind`` sentences, stsb_sentences or beir_corpus), padded
  (``data.pack_length = 0``) or packed (each text attends only within itself and never predicts
  another's first token: ``segment_ids``), never pairs.
* Masking happens on the device, inside the loss (``mntp.mask_tokens``: transformers'
  ``DataCollatorForLanguageModeling`` rule), from the step's PRNG key (``fold_in(state.rng,
  step)``, split into a masking key and a dropout key): the same masks for a given seed and step,
  so a resumed run continues exactly. ``objective.loss_kwargs``: ``probability`` (the chance a
  token is chosen; 0.2, LLM2Vec's Llama-3 setting), ``replace`` / ``random`` (of the chosen, the
  share replaced by the mask token / by a uniformly drawn token; 0.8 / 0.1, the rest kept;
  ``replace=1.0, random=0.0`` is ``run_mntp.py``'s ``data_collator_type="all_mask"``),
  ``mask_token`` (``"blank"``: the tokenizer's own mask token, else ``"_"``; ``"eos"``: else its
  EOS) and ``chunk_size`` (positions per chunk of the (B, T, V) logits, None = all at once).
* The tokens: ``resolve`` (at build time, from the encoder's tokenizer and the checkpoint
  directory's ``tokenizer_config.json``) fixes the mask token id, the ids masking never chooses
  (the tokenizer's special added tokens: BOS / EOS / padding, what ``run_mntp.py``'s
  ``special_tokens_mask`` marks; padding is never chosen either way) and the vocabulary the
  random replacements are drawn from (``len(tokenizer)``), and the LM head's tying and Gemma 2
  soft-capping from ``config.json``. They live in the (hashable, static) ``Objective.mntp``.
* Params: an untied LM head (``lm_head.weight``) is read from the checkpoint after the backbone
  (``add_lm_head``) into ``params["lm_head"]`` (``{"weight": (V, H)}``); a tied one is the
  embedding and adds nothing. Under LoRA it is frozen (LLM2Vec trains only the adapters);
  without LoRA it trains with the rest. FSDP rules shard it like the embedding
  (``embedjax.sharding.rules_for``). ``without_lm_head`` drops it before evaluation and export:
  the exported model is the bidirectional encoder (its ``embedjax_config.json`` records
  ``attention: bidirectional``, so the SimCSE stage and users load it that way).
* Attention: the run must set ``attention = "bidirectional"`` (``resolve`` refuses otherwise), so
  that what trains, what is evaluated and what is exported see every token alike.
* Logged: ``mntp_accuracy`` (argmax accuracy over the predicted tokens, ``run_mntp.py``'s
  metric) and ``mntp_predictions`` (their number) beside the loss.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

import jax

from embedjax import hf, mntp
from embedjax.data.batch import Batch

log = logging.getLogger(__name__)

LM_HEAD = "lm_head"  # params[LM_HEAD]: an untied LM head, {"weight": (V, H)}
LOSS_KWARGS = frozenset({"probability", "replace", "random", "mask_token", "chunk_size"})
DEFAULTS = {"probability": 0.2, "replace": 0.8, "random": 0.1, "mask_token": "blank", "chunk_size": None}


@dataclasses.dataclass(frozen=True)
class MntpSettings:
    """What an MNTP objective resolves at build time (hashable: part of the static ``Objective``)."""

    probability: float = 0.2
    replace: float = 0.8
    random: float = 0.1
    mask_token_id: int = 0
    special_ids: tuple = ()          # ids masking never chooses
    vocab_size: int = 0              # random replacements are drawn from [0, vocab_size)
    chunk_size: int | None = None
    tied: bool = False               # the LM head is the embedding (no params[LM_HEAD])
    softcap: float | None = None     # Gemma 2's final logit soft-capping


def uses_mntp(sources: Mapping) -> bool:
    """Whether any of a run's sources (``TrainConfig.sources``) trains with MNTP."""
    return any(spec.objective["loss"] == "mntp" for spec in sources.values())


def options(loss_kwargs) -> dict[str, Any]:
    """``objective.loss_kwargs`` (a mapping or sorted items) with the defaults filled in, checked."""
    given = dict(loss_kwargs)
    unknown = sorted(set(given) - LOSS_KWARGS)
    if unknown:
        raise ValueError(f"unknown objective.loss_kwargs {unknown} for mntp; it takes {sorted(LOSS_KWARGS)}")
    out = {**DEFAULTS, **given}
    for name in ("probability", "replace", "random"):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"objective.loss_kwargs.{name} is a probability in [0, 1], got {value!r}")
        out[name] = float(value)
    if out["replace"] + out["random"] > 1.0 + 1e-12:
        raise ValueError(f"objective.loss_kwargs: replace + random must not exceed 1 (the rest of the chosen tokens "
                         f"stay themselves), got {out['replace']} + {out['random']}")
    if out["mask_token"] not in mntp.MASK_TOKEN_TYPES:
        raise ValueError(f"objective.loss_kwargs.mask_token must be one of {mntp.MASK_TOKEN_TYPES}, got "
                         f"{out['mask_token']!r} (a new '<mask>' token would need a resized embedding)")
    chunk = out["chunk_size"]
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"objective.loss_kwargs.chunk_size is a positive number of positions or None, got {chunk!r}")
    return out


def check_options(fields: Mapping) -> None:
    """An MNTP objective's section (``Objective.check_section``'s fields): its loss options, and no
    wrapper of embedding losses (Matryoshka, layers, GradCache, auxiliary losses, distillation, guide)."""
    from embedjax.train.objective import dense_only_options

    changed = dense_only_options(fields)
    if changed:
        raise ValueError(f"objective {changed} wrap losses of embeddings; objective.loss='mntp' predicts masked "
                         "tokens and reads objective.{loss_kwargs, remat, unroll, dropout}")
    options(fields["loss_kwargs"])


def _is_decoder(cfg) -> bool:
    from embedjax.encoders import decoder

    return isinstance(cfg, decoder.DecoderConfig)


def _require_decoder(encoder) -> None:
    if not _is_decoder(encoder.cfg):
        raise ValueError(f"objective.loss='mntp' predicts tokens with a decoder LLM's own LM head (LLM2Vec); "
                         f"{encoder.cfg.model_type!r} is not a decoder backbone (llama, mistral, qwen2, qwen3, "
                         "gemma2, gemma3_text)")


def _checkpoint_config(encoder) -> dict:
    if encoder.path is None:
        raise ValueError("objective.loss='mntp' reads the LM head from the checkpoint directory; the encoder has none")
    return hf.read_json(Path(encoder.path) / "config.json") or {}


def add_lm_head(encoder):
    """``encoder`` with its checkpoint's LM head in its params (``params["lm_head"]``: the
    ``lm_head.weight`` matrix, float32 (V, H)), read after the backbone (``mntp.load_lm_head``);
    unchanged when the head is tied to the embedding. A ``CheckpointError`` when the checkpoint is
    untied and has no head (a base-model save, e.g. an embedjax export: start MNTP from the
    ``*ForCausalLM`` checkpoint)."""
    _require_decoder(encoder)
    if LM_HEAD in encoder.params:
        return encoder
    if mntp.tie_word_embeddings(_checkpoint_config(encoder)):
        return encoder
    head, _ = mntp.load_lm_head(encoder.path, encoder.cfg)
    return dataclasses.replace(encoder, params={**encoder.params, LM_HEAD: head})


def without_lm_head(params):
    """The params without the LM head: the encoder that is evaluated and exported."""
    return {k: v for k, v in params.items() if k != LM_HEAD} if isinstance(params, Mapping) else params


def _token_content(value) -> str | None:
    """A ``tokenizer_config.json`` token entry: a string or ``{"content": ...}`` (None when unset)."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value or None


def token_ids(encoder, mask_token: str = "blank") -> tuple[int, tuple[int, ...], int]:
    """``(mask_token_id, special_ids, vocab_size)`` as LLM2Vec's ``run_mntp.py`` picks them, from
    the encoder's tokenizer and its directory's ``tokenizer_config.json`` (offline, no
    transformers tokenizer): the tokenizer's own ``mask_token`` when it has one, else ``"_"``
    (``mask_token="blank"``) or its EOS (``"eos"``: ``eos_token``, else ``config.json``'s
    ``eos_token_id``); the special added tokens (never chosen); ``len(tokenizer)``."""
    backend = encoder.tokenizer.backend
    record = {} if encoder.path is None else hf.read_json(Path(encoder.path) / "tokenizer_config.json") or {}
    own = _token_content(record.get("mask_token"))
    if own is not None:
        mask_id = backend.token_to_id(own)
        if mask_id is None:
            raise ValueError(f"tokenizer_config.json's mask_token {own!r} is not in the tokenizer's vocabulary")
    elif mask_token == "eos":
        eos = _token_content(record.get("eos_token"))
        mask_id = backend.token_to_id(eos) if eos is not None else None
        if mask_id is None:
            config_eos = encoder.cfg.eos_token_id
            mask_id = config_eos[0] if isinstance(config_eos, (tuple, list)) else config_eos
        if mask_id is None:
            raise ValueError("objective.loss_kwargs.mask_token='eos': the checkpoint names no EOS token")
    else:
        mask_id = mntp.mask_token_id(backend, "blank")
    special = sorted(int(i) for i, tok in backend.get_added_tokens_decoder().items() if getattr(tok, "special", False))
    vocab_size = min(int(backend.get_vocab_size(with_added_tokens=True)), int(encoder.cfg.vocab_size))
    return int(mask_id), tuple(special), vocab_size


def resolve(objective, encoder):
    """``objective`` (loss "mntp") with its ``MntpSettings`` resolved against the run's encoder: a
    decoder running bidirectionally (ValueError otherwise, naming the setting), the mask token,
    special ids and vocabulary of its tokenizer, its LM head's tying and soft-capping."""
    _require_decoder(encoder)
    if encoder.cfg.attention != "bidirectional":
        raise ValueError("objective.loss='mntp' trains the decoder with bidirectional attention (LLM2Vec): set "
                         "attention='bidirectional' (--config.attention=bidirectional), which the export then "
                         f"records for the next stage; the run has attention={encoder.cfg.attention!r}")
    kw = options(objective.loss_kwargs)
    mask_id, special, vocab_size = token_ids(encoder, kw["mask_token"])
    hf_config = _checkpoint_config(encoder)
    settings = MntpSettings(probability=kw["probability"], replace=kw["replace"], random=kw["random"],
                            mask_token_id=mask_id, special_ids=special, vocab_size=vocab_size,
                            chunk_size=kw["chunk_size"], tied=mntp.tie_word_embeddings(hf_config),
                            softcap=mntp.final_logit_softcap(hf_config))
    log.info("MNTP: mask token id %d, %d special ids never masked, random replacements from %d ids, %s LM head",
             mask_id, len(special), vocab_size, "tied" if settings.tied else "untied")
    return dataclasses.replace(objective, mntp=settings)


def _inputs(batch: Batch):
    """``(ids, mask, segment_ids, positions)`` of a batch of single texts, padded or packed."""
    if batch.b is not None or batch.n is not None:
        raise ValueError("objective.loss='mntp' masks single texts; the batch has a second side (pairs): train on "
                         "data.kind sentences, stsb_sentences or beir_corpus")
    if batch.packed is not None:
        rows = batch.packed
        return rows.ids, (rows.segments > 0).astype(rows.ids.dtype), rows.segments, rows.positions
    return batch.a.ids, batch.a.mask, None, None


def masked_inputs(settings: MntpSettings, ids, mask, key):
    """``(input_ids, labels)``: ``mntp.mask_tokens`` of (B, T) ids with the settings' rates and tokens."""
    return mntp.mask_tokens(key, ids, mask, probability=settings.probability, mask_token_id=settings.mask_token_id,
                            vocab_size=settings.vocab_size, special_ids=settings.special_ids,
                            replace=settings.replace, random=settings.random)


def split_key(key):
    """The step key's ``(masking key, dropout key)``."""
    k_mask, k_drop = jax.random.split(key)
    return k_mask, k_drop


def mntp_batch_loss(params, enc_cfg, objective, batch: Batch, key, teacher=None, *, return_metrics: bool = False):
    """The MNTP loss of a batch of single texts (``objective``: an ``Objective`` with loss "mntp" and
    its resolved ``mntp`` settings): the texts masked from ``key``'s masking half, the decoder run
    bidirectionally (dropout from its other half when ``objective.dropout``), the mean cross-entropy
    over every masked token of the batch. ``return_metrics``: also ``{"mntp_accuracy",
    "mntp_predictions"}`` (what the train step logs)."""
    del teacher
    settings = objective.mntp
    if settings is None:
        raise ValueError("objective.loss='mntp' needs its tokens resolved against the encoder "
                         "(embedjax.train.mntp_objective.resolve)")
    if not settings.tied and LM_HEAD not in params:
        raise ValueError(f"objective.loss='mntp' on an untied checkpoint needs its LM head (params[{LM_HEAD!r}]: "
                         "embedjax.train.mntp_objective.add_lm_head)")
    ids, mask, segments, positions = _inputs(batch)
    k_mask, k_drop = split_key(key)
    inputs, labels = masked_inputs(settings, ids, mask, k_mask)
    out = mntp.mntp_loss(without_lm_head(params), enc_cfg, params.get(LM_HEAD), inputs, mask, labels,
                         softcap=settings.softcap, chunk_size=settings.chunk_size, segment_ids=segments,
                         positions=positions, dropout_key=k_drop if objective.dropout else None,
                         remat=objective.remat, unroll=objective.unroll, return_metrics=return_metrics)
    if not return_metrics:
        return out
    loss, metrics = out
    return loss, {"mntp_accuracy": metrics["accuracy"], "mntp_predictions": metrics["predictions"]}


__all__ = ["DEFAULTS", "LM_HEAD", "LOSS_KWARGS", "MntpSettings", "add_lm_head", "check_options", "masked_inputs",
           "mntp_batch_loss", "options", "resolve", "split_key", "token_ids", "uses_mntp", "without_lm_head"]
