"""LLM2Vec's masked next-token prediction (MNTP; BehnamGhader et al., arXiv:2404.05961) as pure
functions: the first of LLM2Vec's three steps (bidirectional attention, MNTP with LoRA, then
unsupervised SimCSE) that turn a decoder LLM into a text encoder.

MNTP is masked language modelling done the causal-LM way: tokens are masked as for BERT, the
decoder runs with *bidirectional* attention (every token sees the whole text), and the masked
token at position i is predicted from the hidden state at position i - 1 (the position whose
output head was pretrained to predict token i), through the model's own LM head.

What LLM2Vec does (``McGill-NLP/llm2vec``: ``experiments/run_mntp.py``, ``llm2vec/models/
bidirectional_{llama,mistral,qwen2,gemma}.py``), and where it is here:

* bidirectional attention: ``LlamaBiModel`` & co. set ``is_causal = False`` on every attention
  module and build a padding-only mask -> ``decoder.apply`` with ``cfg.attention =
  "bidirectional"`` (``mntp_loss`` sets it; ``tests/test_decoders.py`` checks that mode against
  transformers given a padding-only 4D mask, and ``tests/test_mntp.py`` the whole loss).
* masking: transformers' ``DataCollatorForLanguageModeling(mlm=True, mlm_probability=...)``
  (``data_collator_type="default"``): each token that is not special (the tokenizer's
  ``special_tokens_mask``, which ``run_mntp.py`` asks for with ``return_special_tokens_mask=True``,
  or else membership in ``tokenizer.all_special_ids``; padding is special either way) is chosen
  with probability ``mlm_probability``; a chosen token becomes the mask token with probability
  ``mask_replace_prob`` (0.8), a token drawn uniformly from ``range(len(tokenizer))`` with
  probability ``random_replace_prob`` (0.1), and stays itself otherwise; labels are the original
  id at chosen positions and -100 elsewhere -> ``mask_tokens`` (on device, ``jax.random``) and
  ``mask_tokens_np`` (on the host: the collator's NumPy path draw for draw, so one seeded
  ``np.random.Generator`` gives exactly ``DataCollatorForLanguageModeling(return_tensors="np",
  seed=...)``'s batch). ``run_mntp.py``'s other choice, ``DataCollatorForLanguageModelingWith
  FullMasking`` (``data_collator_type="all_mask"``: every chosen token becomes the mask token)
  is ``replace=1.0, random=0.0``.
* the mask token: the tokenizer's own when it has one, else (``mask_token_type``) ``"_"``
  (``"blank"``, the default) or the EOS (``"eos"``); a new ``<mask>`` token (``"mask"``) would
  need a resized embedding and is not supported -> ``mask_token_id``. ``run_mntp.py`` also sets
  ``pad_token = eos_token`` when there is none. Assigning ``tokenizer.mask_token`` makes that id
  one of ``all_special_ids`` (so the ``all_special_ids`` path never masks a ``_`` of the text,
  while the ``special_tokens_mask`` path, which only marks the tokens the tokenizer itself adds
  and its special added tokens, may) -> ``special_token_ids`` returns the ids the former path
  excludes.
* the loss: ``LlamaBiForMNTP`` is ``LlamaForCausalLM`` over the bidirectional model, so its
  forward's causal-LM loss applies: ``logits[:, :-1]`` against ``labels[:, 1:]``, cross-entropy
  with ``ignore_index=-100``, the mean over every label in the batch (the label at position 0 has
  no predicting position and never counts); ``run_mntp.py``'s accuracy shifts the same way ->
  ``shifted_lm_loss`` / ``mntp_loss`` (``return_metrics=True`` for the accuracy). Logits are
  computed in float32 here (transformers: the model dtype, upcast for the loss).
* the LM head: ``lm_head.weight`` (V, H), or the input embedding when ``tie_word_embeddings``
  (Gemma; tiny models); Gemma 2's ``final_logit_softcapping`` -> ``lm_head_from_state_dict``,
  ``load_lm_head``, ``lm_logits``. ``decoder.params_from_state_dict`` keeps ignoring
  ``lm_head.*``: the head is read here, beside the backbone.
* LoRA: ``run_mntp.py`` trains PEFT LoRA adapters on the base model's attention and MLP
  projections only (the LM head and embeddings frozen) -> ``embedjax.lora`` (``attach`` before,
  ``partition`` to train only the adapters; ``mntp_loss`` runs whatever ``cfg.lora`` holds).
  After MNTP the adapters are merged (``lora.merge``) and the SimCSE stage starts from that model
  with new adapters.

Memory: the logits are (B, T, V) (T = 512 and V = 32k: 64 MiB per row in float32). With
``chunk_size`` the loss is computed over ``chunk_size`` positions of every row at a time under
``jax.checkpoint`` (each row's labelled positions sorted first, so the chunks past every row's
last label are skipped: most of them at ``mlm_probability = 0.2``), holding (B, chunk_size, V)
logits at once in the forward and the backward pass; the result and gradients equal the
unchunked ones. ``mask_tokens`` / ``mntp_loss`` / ``shifted_lm_loss`` / ``lm_logits`` are pure and
jittable (``cfg``, ``softcap``, ``chunk_size`` and the token-id arguments static).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.encoders import decoder
from embedjax.encoders import layers as L
from embedjax.encoders.statedict import CheckpointError

IGNORE_INDEX = -100  # a label that is not predicted (PyTorch's CrossEntropyLoss ignore_index)
MASK_TOKEN_TYPES = ("blank", "eos")
BLANK_MASK_TOKEN = "_"
# transformers' tie_word_embeddings defaults where a config.json leaves it out.
_TIED_BY_DEFAULT = {"gemma2": True, "gemma3_text": True, "gemma3": True}
_LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")

# --------------------------------------------------------------------------- the LM head


def tie_word_embeddings(hf_config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's LM head is its input embedding: ``config.json``'s
    ``tie_word_embeddings``, else the family's transformers default (True for Gemma 2 / 3, False
    for Llama, Mistral, Qwen2, Qwen3). A multimodal Gemma 3 config is read with its text config."""
    merged = {**hf_config.get("text_config", {}), **hf_config}
    value = merged.get("tie_word_embeddings")
    if value is None:
        value = _TIED_BY_DEFAULT.get(hf_config.get("model_type"), False)
    return bool(value)


def final_logit_softcap(hf_config: Mapping[str, Any]) -> float | None:
    """The LM logits' soft-capping ``c`` (``c * tanh(logits / c)``): ``final_logit_softcapping``
    (Gemma 2: 30.0 in its configs; transformers' default for ``gemma2`` when absent), else None."""
    merged = {**hf_config.get("text_config", {}), **hf_config}
    if "final_logit_softcapping" in merged:
        value = merged["final_logit_softcapping"]
    else:
        value = 30.0 if hf_config.get("model_type") == "gemma2" else None
    return float(value) if value else None


def lm_head_from_state_dict(state: Mapping[str, np.ndarray], cfg: decoder.DecoderConfig, *, tied: bool,
                            where: str = "the checkpoint") -> dict | None:
    """The LM head of a causal-LM state dict (PyTorch names): ``{"weight": (V, H) float32}``, the
    ``lm_head.weight`` matrix as PyTorch stores it (the embedding's layout), or None when ``tied``
    (``tie_word_embeddings``: the logits use ``params["embed"]``; a stored copy is not read, as
    transformers overwrites it with the embedding). ``CheckpointError`` when an untied head is
    missing or its shape is not (``cfg.vocab_size``, ``cfg.hidden_size``)."""
    if tied:
        return None
    name = next((n for n in _LM_HEAD_NAMES if n in state), None)
    if name is None:
        raise CheckpointError(f"{where}: tie_word_embeddings is false but there is no LM head "
                              f"({' or '.join(_LM_HEAD_NAMES)}); "
                              "a base-model checkpoint (AutoModel) carries none: load the *ForCausalLM checkpoint")
    weight = np.asarray(state[name], np.float32)
    if weight.shape != (cfg.vocab_size, cfg.hidden_size):
        raise CheckpointError(f"{where}: {name} has shape {weight.shape}, expected "
                              f"{(cfg.vocab_size, cfg.hidden_size)} (vocab_size, hidden_size)")
    return {"weight": weight}


def lm_head_to_state_dict(lm_head: dict | None) -> dict[str, np.ndarray]:
    """``lm_head_from_state_dict``'s inverse: ``{"lm_head.weight": (V, H)}``, or nothing when tied."""
    if lm_head is None:
        return {}
    return {"lm_head.weight": np.ascontiguousarray(np.asarray(lm_head["weight"], np.float32))}


def load_lm_head(name_or_path: str | os.PathLike, cfg: decoder.DecoderConfig | None = None
                 ) -> tuple[dict | None, float | None]:
    """``(lm_head, softcap)`` of a causal-LM checkpoint directory or hub id, beside
    ``hf.load_checkpoint``'s backbone: ``lm_head_from_state_dict`` with ``tie_word_embeddings``
    from its ``config.json``, and ``final_logit_softcap``. ``cfg`` defaults to the one
    ``config.json`` gives."""
    from embedjax import hf
    from embedjax.encoders import registry

    directory = hf.resolve(name_or_path)
    hf_config = hf.read_json(directory / "config.json")
    if hf_config is None:
        raise CheckpointError(f"{directory}: no config.json")
    cfg = registry.config_from_hf(hf_config) if cfg is None else cfg
    tied = tie_word_embeddings(hf_config)
    head = None if tied else lm_head_from_state_dict(hf.load_state_dict(directory), cfg, tied=False,
                                                     where=str(directory))
    return head, final_logit_softcap(hf_config)


def _head_matrix(params, lm_head):
    return params["embed"] if lm_head is None else lm_head["weight"]


def lm_logits(params, lm_head: dict | None, hidden, *, softcap: float | None = None):
    """Vocabulary logits (..., V) float32 of final hidden states (..., H) (``decoder.apply``'s last,
    after the final norm): ``hidden @ W.T`` with ``W`` = ``lm_head["weight"]``, or the backbone's
    ``params["embed"]`` when ``lm_head`` is None (tied), through ``layers.tied_logits``; then
    ``softcap * tanh(logits / softcap)`` when ``softcap`` is set (Gemma 2)."""
    w = _head_matrix(params, lm_head)
    logits = L.tied_logits(hidden.astype(jnp.float32), w.astype(jnp.float32))
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


# --------------------------------------------------------------------------- the mask token


def mask_token_id(tokenizer, mask_token_type: str = "blank") -> int:
    """The mask token LLM2Vec's ``run_mntp.py`` uses: the tokenizer's own ``mask_token`` when it
    has one, else ``"_"`` (``mask_token_type="blank"``, the default there) or the EOS (``"eos"``).

    ``tokenizer``: a transformers tokenizer (what knows a ``mask_token``), an
    ``embedjax.tokenize.Tokenizer`` or a ``tokenizers.Tokenizer`` (these carry no token roles:
    treated as having no mask token; ``"eos"`` needs the former's ``eos_token_id``).
    """
    if mask_token_type not in MASK_TOKEN_TYPES:
        raise ValueError(f"mask_token_type {mask_token_type!r} is not supported; choose one of {MASK_TOKEN_TYPES} "
                         "(a new '<mask>' token would need a resized embedding)")
    if getattr(tokenizer, "mask_token", None) is not None:
        return int(tokenizer.convert_tokens_to_ids(tokenizer.mask_token))
    if mask_token_type == "eos":
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("mask_token_type='eos': the tokenizer has no EOS token id")
        return int(eos)
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        found = tokenizer.convert_tokens_to_ids(BLANK_MASK_TOKEN)
        unk = getattr(tokenizer, "unk_token_id", None)
        found = None if found is None or (unk is not None and found == unk) else found
    else:
        backend = getattr(tokenizer, "backend", tokenizer)
        found = backend.token_to_id(BLANK_MASK_TOKEN)
    if found is None:
        raise ValueError(f"the tokenizer has no mask token and no {BLANK_MASK_TOKEN!r} token; "
                         "use mask_token_type='eos'")
    return int(found)


def special_token_ids(tokenizer, mask_token_type: str = "blank") -> tuple[int, ...]:
    """The ids the collator never masks when it gets no ``special_tokens_mask``: a transformers
    tokenizer's ``all_special_ids`` after ``run_mntp.py``'s assignments (the mask token of
    ``mask_token_id``, and ``pad_token = eos_token`` when there is no pad token), sorted. An
    ``embedjax.tokenize.Tokenizer`` or ``tokenizers.Tokenizer``: its special added tokens, plus
    the mask token."""
    ids = {mask_token_id(tokenizer, mask_token_type)}
    if hasattr(tokenizer, "all_special_ids"):
        ids |= set(tokenizer.all_special_ids)
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(tokenizer.eos_token_id)
    else:
        backend = getattr(tokenizer, "backend", tokenizer)
        ids |= {int(i) for i, tok in backend.get_added_tokens_decoder().items() if getattr(tok, "special", False)}
    return tuple(sorted(int(i) for i in ids))


# --------------------------------------------------------------------------- masking


def _check_rates(probability, replace, random):
    for name, value in (("probability", probability), ("replace", replace), ("random", random)):
        if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
            raise ValueError(f"mask_tokens: {name} must be in [0, 1], got {value}")
    if isinstance(replace, (int, float)) and isinstance(random, (int, float)) and replace + random > 1.0 + 1e-12:
        raise ValueError(f"mask_tokens: replace + random must not exceed 1, got {replace} + {random}")


def maskable(ids, mask, special_ids: Sequence[int] = (), special_mask=None):
    """(B, T) bool: the positions masking may choose: real tokens (``mask`` > 0) whose id is not in
    ``special_ids`` and whose ``special_mask`` (the tokenizer's ``special_tokens_mask``) is 0."""
    ok = mask > 0
    for i in sorted({int(i) for i in special_ids}):
        ok = ok & (ids != i)
    if special_mask is not None:
        ok = ok & (special_mask == 0)
    return ok


def mask_tokens(key, ids, mask, *, probability: float, mask_token_id: int, vocab_size: int,
                special_ids: Sequence[int] = (), special_mask=None, replace: float = 0.8, random: float = 0.1):
    """MLM masking on device (``DataCollatorForLanguageModeling``'s rule, LLM2Vec's MNTP input):
    ``(input_ids, labels)``, both (B, T) int32.

    Each position ``maskable`` allows (never padding, ``special_ids``, or where ``special_mask``
    is set) is chosen with probability ``probability``; a chosen token becomes ``mask_token_id``
    with probability ``replace``, a token drawn uniformly from ``[0, vocab_size)`` with probability
    ``random`` (pass ``len(tokenizer)`` to draw as transformers does), and stays itself otherwise.
    ``labels`` is the original id where chosen and ``IGNORE_INDEX`` (-100) elsewhere; unchosen
    positions keep their id. Deterministic per ``key`` (the same distribution as transformers',
    not its draws: ``mask_tokens_np`` reproduces those)."""
    _check_rates(probability, replace, random)
    ids = jnp.asarray(ids, jnp.int32)
    k_choose, k_split, k_word = jax.random.split(key, 3)
    chosen = jax.random.bernoulli(k_choose, probability, ids.shape) & maskable(ids, mask, special_ids, special_mask)
    u = jax.random.uniform(k_split, ids.shape)
    to_mask = chosen & (u < replace)
    to_random = chosen & (u >= replace) & (u < replace + random)
    words = jax.random.randint(k_word, ids.shape, 0, vocab_size, jnp.int32)
    inputs = jnp.where(to_mask, jnp.int32(mask_token_id), jnp.where(to_random, words, ids))
    labels = jnp.where(chosen, ids, jnp.int32(IGNORE_INDEX))
    return inputs, labels


def mask_tokens_np(rng: np.random.Generator, ids, mask, *, probability: float, mask_token_id: int, vocab_size: int,
                   special_ids: Sequence[int] = (), special_mask=None, replace: float = 0.8,
                   random: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``mask_tokens`` on the host, drawing from ``rng`` exactly as transformers'
    ``DataCollatorForLanguageModeling.numpy_mask_tokens`` does (three ``binomial`` draws over the
    whole batch, then ``integers`` for the random replacements; no further draws when
    ``replace == 1`` or ``random == 0``): with ``rng = np.random.default_rng(seed)``, the collator
    built with ``return_tensors="np", seed=seed`` and the same excluded positions (its
    special-token mask, which marks padding) gives the same batch. Returns (input_ids, labels)
    int64 (B, T), as the collator."""
    _check_rates(probability, replace, random)
    inputs = np.array(ids, dtype=np.int64, copy=True)
    labels = inputs.copy()
    prob = np.full(inputs.shape, float(probability))
    special_mask = None if special_mask is None else np.asarray(special_mask)
    prob[~maskable(inputs, np.asarray(mask), special_ids, special_mask)] = 0
    chosen = rng.binomial(1, prob, size=prob.shape).astype(bool)
    labels[~chosen] = IGNORE_INDEX
    to_mask = rng.binomial(1, float(replace), size=labels.shape).astype(bool) & chosen
    inputs[to_mask] = mask_token_id
    if replace == 1 or random == 0:
        return inputs, labels
    scaled = float(random) / (1 - float(replace))  # the chance among the chosen tokens not masked
    to_random = rng.binomial(1, scaled, size=labels.shape).astype(bool) & chosen & ~to_mask
    inputs[to_random] = rng.integers(low=0, high=vocab_size, size=np.count_nonzero(to_random), dtype=np.int64)
    return inputs, labels


# --------------------------------------------------------------------------- the loss


def _ce_terms(w, h, labels, softcap):
    """Per-position (cross-entropy, correct) of hidden states h (..., H) against labels (...), 0 where
    ``IGNORE_INDEX``."""
    valid = labels != IGNORE_INDEX
    logits = L.tied_logits(h.astype(jnp.float32), w.astype(jnp.float32))
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    safe = jnp.where(valid, labels, 0)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    ce = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0)
    correct = valid & (jnp.argmax(logits, axis=-1) == safe)
    return ce, correct


def shifted_lm_loss(hidden, labels, head_matrix, *, softcap: float | None = None, chunk_size: int | None = None,
                    segment_ids=None, return_metrics: bool = False):
    """The causal-LM loss of MNTP: the state at position i - 1 predicts ``labels[:, i]``.

    Args:
      hidden: (B, T, H) final hidden states (after the final norm).
      labels: (B, T) int; ``IGNORE_INDEX`` (-100) where nothing is predicted (``labels[:, 0]``
        never is: nothing precedes it).
      head_matrix: (V, H) the LM head (``lm_head["weight"]``, or the embedding when tied).
      softcap: Gemma 2's final logit soft-capping, or None.
      chunk_size: None computes the (B, T - 1, V) logits at once; an int, ``chunk_size`` positions
        per row at a time under ``jax.checkpoint`` (see the module docstring), the same value.
      segment_ids: (B, T) packed rows: a label whose preceding position is in another text is
        not predicted (None: one text per row, or texts concatenated as LLM2Vec's chunks are).
      return_metrics: also return ``{"accuracy", "predictions"}`` (argmax accuracy over the
        predicted labels, as ``run_mntp.py``'s eval metric, and their number).

    Returns:
      the float32 mean cross-entropy over every predicted label of the batch (0 when there is
      none, where PyTorch gives NaN), and the metrics when asked.
    """
    h = hidden[:, :-1]
    target = labels[:, 1:].astype(jnp.int32)
    if segment_ids is not None:
        target = jnp.where(segment_ids[:, 1:] == segment_ids[:, :-1], target, IGNORE_INDEX)
    valid = target != IGNORE_INDEX
    if chunk_size is None:
        ce, correct = _ce_terms(head_matrix, h, target, softcap)
        total, hits = jnp.sum(ce), jnp.sum(correct)
    else:
        chunk = int(chunk_size)
        if chunk < 1:
            raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
        b, n, d = h.shape
        order = jnp.argsort(~valid, axis=1, stable=True)  # each row's labelled positions first
        h = jnp.take_along_axis(h, order[..., None], axis=1)
        target = jnp.take_along_axis(target, order, axis=1)
        steps = -(-n // chunk)
        pad = steps * chunk - n
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        target = jnp.pad(target, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
        hs = h.reshape(b, steps, chunk, d).swapaxes(0, 1)
        ts = target.reshape(b, steps, chunk).swapaxes(0, 1)

        @jax.checkpoint
        def one(hc, tc):
            ce, correct = _ce_terms(head_matrix, hc, tc, softcap)
            return jnp.sum(ce), jnp.sum(correct)

        def body(carry, xs):
            hc, tc = xs
            out = jax.lax.cond(jnp.any(tc != IGNORE_INDEX), one, lambda *_: (jnp.float32(0), jnp.int32(0)), hc, tc)
            return (carry[0] + out[0], carry[1] + out[1]), None

        (total, hits), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), (hs, ts))
    count = jnp.sum(valid)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    loss = total / denom
    if not return_metrics:
        return loss
    return loss, {"accuracy": hits.astype(jnp.float32) / denom, "predictions": count}


def mntp_loss(params, cfg: decoder.DecoderConfig, lm_head: dict | None, input_ids, attention_mask, labels, *,
              softcap: float | None = None, chunk_size: int | None = None, segment_ids=None, positions=None,
              dropout_key=None, remat: bool | str = False, unroll: bool | int = True, return_metrics: bool = False):
    """LLM2Vec's MNTP loss: the decoder (``params``, ``cfg``; LoRA when ``cfg.lora``) run with
    bidirectional attention over the masked ``input_ids`` / ``attention_mask`` (``mask_tokens``),
    its final states through the LM head (``lm_head``; None = tied to ``params["embed"]``;
    ``softcap``), and ``shifted_lm_loss`` against ``labels`` (the state at i - 1 predicts the
    label at i; -100 ignored; the mean over the batch's labels).

    ``segment_ids`` / ``positions``: packed rows (``decoder.apply``), each text attending only
    within itself and never predicting another's first token. ``dropout_key`` turns dropout on
    (hidden, attention, LoRA); ``remat`` / ``unroll`` as ``decoder.apply``; ``chunk_size`` and
    ``return_metrics`` as ``shifted_lm_loss``. Pure and jittable (``cfg``, ``softcap``,
    ``chunk_size``, ``remat``, ``unroll``, ``return_metrics`` static).
    """
    if cfg.attention != "bidirectional":
        cfg = dataclasses.replace(cfg, attention="bidirectional")
    hidden = decoder.apply(params, cfg, input_ids, attention_mask, segment_ids=segment_ids, positions=positions,
                           dropout_key=dropout_key, all_layers=False, remat=remat, unroll=unroll)
    return shifted_lm_loss(hidden, labels, _head_matrix(params, lm_head), softcap=softcap, chunk_size=chunk_size,
                           segment_ids=segment_ids, return_metrics=return_metrics)

