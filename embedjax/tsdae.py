"""TSDAE (Wang, Reimers & Gurevych, arXiv:2104.06979) as pure functions, equal to
sentence-transformers' ``DenoisingAutoEncoderLoss``.

TSDAE trains a sentence encoder without labels: each text is damaged (here: words deleted), the
encoder embeds the damaged text, and a transformer decoder must reconstruct the *original* text
from that one vector alone (its cross-attention sees a length-1 "sequence": the sentence embedding).

What sentence-transformers does (``sentence_transformers/sentence_transformer/losses/
denoising_auto_encoder.py`` and ``.../datasets/denoising_auto_encoder.py``, v6.3), and where it is here:

* noise (``DenoisingAutoEncoderDataset.delete``): NLTK ``word_tokenize``, keep each word when
  ``np.random.rand() > del_ratio`` (0.6), keep one word at random if none survived, an empty word
  list returns the text unchanged, ``TreebankWordDetokenizer`` joins the survivors -> ``delete_tokens``.
* decoder: ``AutoModelForCausalLM.from_pretrained(name, is_decoder=True, add_cross_attention=True)``,
  for BERT a ``BertLMHeadModel``: causal self-attention, then per layer a cross-attention block
  (query / key / value / output dense + LayerNorm, newly initialised) over ``encoder_hidden_states
  = embedding[:, None]``, then the MLP; the LM head ``cls.predictions``: dense + act + LayerNorm,
  then logits against the word embeddings plus a per-token bias -> ``decoder_logits``.
* ``tie_encoder_decoder=True``: every decoder base-model parameter whose name exists in the
  encoder (embeddings, self-attention, MLP, norms: all of ``bert.*`` except ``crossattention``)
  *is* the encoder's parameter; the LM head's output matrix is tied to the word embeddings (so
  those get gradient from the encoder input, the decoder input and the output projection). The
  decoder's own parameters are the cross-attention layers and the head's transform and bias ->
  ``init_decoder`` holds exactly those; the tied ones are read from the encoder params at apply
  time, so training updates both as the shared PyTorch tensors do.
* loss: decoder input = the original text's ids (``[CLS] ... [SEP] [PAD]...``) without the last
  column, labels = the ids shifted left by one (``ids[:, 1:]``), decoder ``attention_mask=None``
  (causal only; with right padding the positions scored never see a pad), cross-attention mask =
  the source mask's first column (all ones); ``CrossEntropyLoss(ignore_index=pad_token_id)``: the
  mean over every label that is not padding in the whole batch -> ``reconstruction_loss`` /
  ``tsdae_loss``.

Everything but ``delete_tokens`` (host-side text noise) is pure and jittable (``cfg`` static).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.embed import embed as _embed
from embedjax.encoders import bert
from embedjax.encoders import layers as L

# --------------------------------------------------------------------------- noise: word deletion

# NLTK's word tokenizer (``nltk.tokenize.destructive.NLTKWordTokenizer``, nltk 3.x, Apache-2.0) and
# ``TreebankWordDetokenizer`` (``nltk/tokenize/treebank.py``), ported regex for regex: nltk is not a
# dependency here, and ``word_tokenize`` also needs the Punkt model's data files.
_CONTRACTIONS2 = [r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b",
                  r"(?i)\b(gon)(?#X)(na)\b", r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b",
                  r"(?i)\b(more)(?#X)('n)\b", r"(?i)\b(wan)(?#X)(na)(?=\s)"]
_CONTRACTIONS3 = [r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b"]

_TOK_STARTING_QUOTES = [
    (re.compile("([«“‘„]|[`]+)"), r" \1 "),
    (re.compile(r"^\""), r"``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"([ \(\[{<])(\"|\'{2})"), r"\1 `` "),
    (re.compile(r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)"), r"\1 "),
]
_TOK_ENDING_QUOTES = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"\s+"), " "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_TOK_PUNCTUATION = [
    (re.compile(r'([^\.])(\.)([\]\)}>"\'' "»”’ " r"]*)\s*$"), r"\1 \2 \3 "),
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile(r"[\u2012-\u2015]"), r" \g<0> "),
    (re.compile(r'([^\.])(\.)([\]\)}>"\']*)\s*$'), r"\1 \2\3 "),
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),
    (re.compile(r"[*]"), r" \g<0> "),
]
_TOK_PARENS = (re.compile(r"[\]\[\(\)\{\}\<\>]"), r" \g<0> ")
_TOK_DASHES = (re.compile(r"--"), r" -- ")
_TOK_CONTRACTIONS = [re.compile(p) for p in _CONTRACTIONS2 + _CONTRACTIONS3]

_DETOK_CONTRACTIONS = [re.compile(p.replace("(?#X)", r"\s")) for p in _CONTRACTIONS3 + _CONTRACTIONS2]
_DETOK_ENDING_QUOTES = [
    (re.compile(r"([^' ])\s('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1\2 "),
    (re.compile(r"([^' ])\s('[sS]|'[mM]|'[dD]|') "), r"\1\2 "),
    (re.compile(r"([^'\s])\s(\'\')"), r"\1\2"),
    (re.compile(r"([,.;:!?'])\s+(\"|\'\')"), r"\1\2"),
    (re.compile(r"(\'\')\s([.,:)\]>};%])"), r"\1\2"),
    (re.compile(r"''"), '"'),
    (re.compile(r'([,.;:!?])"(\')'), r"\1\2" '"'),
]
_DETOK_PARENS = [
    (re.compile(r"([\[\(\{\<])\s"), r"\g<1>"),
    (re.compile(r"\s([\]\)\}\>])"), r"\g<1>"),
    (re.compile(r"([\]\)\}\>])\s([:;,.])"), r"\1\2"),
]
_DETOK_PUNCTUATION = [
    (re.compile(r"([^'])\s'\s"), r"\1' "),
    (re.compile(r"\s([?!])"), r"\g<1>"),
    (re.compile(r'([^\.])\s(\.)(?!\.)([\]\)}>"\']*)'), r"\1\2\3"),
    (re.compile(r"([#$])\s"), r"\g<1>"),
    (re.compile(r"\s([;%])"), r"\g<1>"),
    (re.compile(r"\s\.\.\.\s"), r"..."),
    (re.compile(r"\s([:,])"), r"\1"),
]
_DETOK_STARTING_QUOTES = [
    (re.compile(r"([ (\[{<])\s``"), r"\1``"),
    (re.compile(r"(``)\s"), r"\1"),
    (re.compile(r"``"), r'"'),
]
# Punkt (``sent_tokenize``) is a trained model; this approximates it: a sentence ends at . ! or ?
# (closing quotes / brackets allowed) followed by white space and an upper-case letter, digit or
# opening quote / bracket. Only where a sentence ends matters here: NLTK splits the final period
# of each sentence off its word.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\.\.\.)([\"')\]]*)\s+(?=[A-Z0-9\"'(\[])")


def _sub_all(rules, text):
    for regexp, substitution in rules:
        text = regexp.sub(substitution, text)
    return text


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` by the rule above (the stand-in for NLTK's Punkt ``sent_tokenize``)."""
    parts = _SENTENCE_END.split(text)  # [sentence, closing, sentence, closing, ..., sentence]
    sentences = [s + c for s, c in zip(parts[0::2], parts[1::2] + [""])]
    return [s for s in sentences if s.strip()]


def treebank_tokenize(sentence: str) -> list[str]:
    """One sentence -> words, as NLTK's ``NLTKWordTokenizer.tokenize`` (the word tokenizer of
    ``nltk.word_tokenize``)."""
    text = _sub_all(_TOK_STARTING_QUOTES, sentence)
    text = _sub_all(_TOK_PUNCTUATION, text)
    text = _sub_all([_TOK_PARENS, _TOK_DASHES], text)
    text = _sub_all(_TOK_ENDING_QUOTES, " " + text + " ")
    for regexp in _TOK_CONTRACTIONS:
        text = regexp.sub(r" \1 \2 ", text)
    return text.split()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize``: sentences (``split_sentences``), then ``treebank_tokenize`` each."""
    return [w for sentence in split_sentences(text) for w in treebank_tokenize(sentence)]


def treebank_detokenize(words: Sequence[str]) -> str:
    """Words -> text, as NLTK's ``TreebankWordDetokenizer().detokenize``."""
    text = " " + " ".join(words) + " "
    for regexp in _DETOK_CONTRACTIONS:
        text = regexp.sub(r"\1\2", text)
    text = _sub_all(_DETOK_ENDING_QUOTES, text).strip()
    text = re.sub(r" -- ", "--", text)
    text = _sub_all(_DETOK_PARENS, text)
    text = _sub_all(_DETOK_PUNCTUATION, text)
    return _sub_all(_DETOK_STARTING_QUOTES, text).strip()


def delete_tokens(text: str, rng: np.random.Generator, ratio: float = 0.6, *,
                  tokenize: Callable[[str], list[str]] = word_tokenize,
                  detokenize: Callable[[Sequence[str]], str] = treebank_detokenize) -> str:
    """TSDAE's deletion noise, sentence-transformers' ``DenoisingAutoEncoderDataset.delete``.

    The text is split into words (``tokenize``: NLTK's rule, see ``word_tokenize``; pass
    ``nltk.word_tokenize`` itself where nltk and its Punkt data are installed); each word is kept
    when ``rng.random() > ratio`` (one draw per word, all drawn at once, as ``np.random.rand(n)``);
    when none is kept, one drawn by ``rng.choice(n)`` is; the survivors are joined in order by
    ``detokenize`` (Treebank). A text with no words comes back unchanged; a one-word text is always
    kept whole. With ``rng = np.random.Generator(bit_generator)`` over an MT19937 seeded the legacy
    way, the keep decisions equal sentence-transformers' under ``np.random.seed`` (the forced pick
    of an all-deleted text aside: ``Generator.choice`` and ``RandomState.choice`` draw differently).
    """
    words = tokenize(text)
    n = len(words)
    if n == 0:
        return text
    keep = rng.random(n) > ratio
    if not keep.any():
        keep[rng.choice(n)] = True  # at least one word remains
    return detokenize([w for w, k in zip(words, keep) if k])


# --------------------------------------------------------------------------- the decoder


def init_decoder(encoder_params, cfg: bert.BertConfig, key, *, initializer_range: float = 0.02) -> dict:
    """The decoder's own (untied) parameters, initialised as transformers initialises the ones a
    ``BertLMHeadModel(is_decoder=True, add_cross_attention=True)`` finds missing from a base
    checkpoint: normal(``initializer_range``) kernels, zero biases, unit layer norms, zero LM bias.

    Tree (kernels ``(in, out)``, ``L`` layers, stacked like the encoder's)::

        cross: query/key/value/output {kernel (L, H, H), bias (L, H)}, norm {scale, bias (L, H)}
               (``bert.encoder.layer.{i}.crossattention.{self.query,...,output.dense,output.LayerNorm}``)
        head:  transform {kernel (H, H), bias (H,)}, norm {scale, bias (H,)}, bias (V,)
               (``cls.predictions.transform.dense / .LayerNorm``, ``cls.predictions.bias``)

    Everything else the decoder uses (embeddings, self-attention, MLP, the output matrix = the word
    embeddings) is the encoder's, read from ``encoder_params`` at apply time (``tie_encoder_decoder``).
    """
    h, n = cfg.hidden_size, cfg.num_layers
    vocab = encoder_params["embeddings"]["word"].shape[0]
    keys = iter(jax.random.split(key, 5))

    def normal(*shape):
        return initializer_range * jax.random.normal(next(keys), shape, jnp.float32)

    def linear(*lead):
        return {"kernel": normal(*lead, h, h), "bias": jnp.zeros((*lead, h), jnp.float32)}

    def norm(*lead):
        return {"scale": jnp.ones((*lead, h), jnp.float32), "bias": jnp.zeros((*lead, h), jnp.float32)}

    return {
        "cross": {"query": linear(n), "key": linear(n), "value": linear(n), "output": linear(n), "norm": norm(n)},
        "head": {"transform": linear(), "norm": norm(), "bias": jnp.zeros((vocab,), jnp.float32)},
    }


def _cross_attention(p, cfg, x, memory, memory_bias, dropout_key=None):
    """Multi-head attention of x (B, T, H) over ``memory`` (B, S, H) (no output projection)."""
    b, t, h = x.shape
    s = memory.shape[1]
    head_dim = h // cfg.num_heads
    q = L.dense(p["query"], x).reshape(b, t, cfg.num_heads, head_dim)
    k = L.dense(p["key"], memory).reshape(b, s, cfg.num_heads, head_dim)
    v = L.dense(p["value"], memory).reshape(b, s, cfg.num_heads, head_dim)
    einsum = L.mixed_einsum if L._is_low_precision(x.dtype) else L._einsum_f32_acc
    scores = einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(jnp.float32(head_dim)) + memory_bias
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    probs = L.dropout(probs, cfg.attention_dropout, dropout_key)
    return einsum("bnqk,bknd->bqnd", probs, v).astype(x.dtype).reshape(b, t, h)


def _decoder_layer(p, c, cfg, x, self_bias, memory, memory_bias, key):
    """``BertLayer`` with ``is_decoder`` and cross-attention: causal self-attention block, cross-
    attention block, MLP block (each post-LN with a residual)."""
    keys = [None] * 6 if key is None else list(jax.random.split(key, 6))
    a = p["attention"]
    ctx = L.self_attention(a, x, self_bias, num_heads=cfg.num_heads, dropout_rate=cfg.attention_dropout,
                           dropout_key=keys[0])
    x = L.layer_norm(a["norm"], x + L.dropout(L.dense(a["output"], ctx), cfg.hidden_dropout, keys[1]),
                     cfg.layer_norm_eps)
    ctx = _cross_attention(c, cfg, x, memory, memory_bias, keys[2])
    x = L.layer_norm(c["norm"], x + L.dropout(L.dense(c["output"], ctx), cfg.hidden_dropout, keys[3]),
                     cfg.layer_norm_eps)
    m = p["mlp"]
    y = L.dense(m["down"], L.activation(cfg.hidden_act)(L.dense(m["up"], x)))
    return L.layer_norm(m["norm"], x + L.dropout(y, cfg.hidden_dropout, keys[4]), cfg.layer_norm_eps)


def decoder_logits(encoder_params, decoder_params, cfg: bert.BertConfig, sentence_embedding, input_ids,
                   attention_mask=None, *, memory_mask=None, dropout_key=None):
    """BERT as TSDAE's decoder (``BertLMHeadModel`` with ``is_decoder=True, add_cross_attention=True``
    and the encoder's weights tied in): vocabulary logits (B, T, V), float32.

    Args:
      encoder_params: the encoder's tree (``embedjax.encoders.bert``): embeddings, self-attention,
        MLP and the output matrix (word embeddings) of the decoder come from it.
      decoder_params: ``init_decoder``'s tree (cross-attention, LM head transform and bias).
      sentence_embedding: (B, H) -- the cross-attention memory is it as a length-1 sequence, as
        sentence-transformers passes ``reps[:, None]`` -- or an already (B, S, H) memory.
      input_ids: (B, T) decoder input ids.
      attention_mask: optional (B, T) key mask combined with the causal mask; None = causal only
        (what sentence-transformers passes).
      memory_mask: optional (B, S) mask of the memory; None = all attended.
      dropout_key: a PRNG key turns dropout on (training mode); None is deterministic.
    """
    dtype = jnp.dtype(cfg.dtype)
    memory = sentence_embedding[:, None] if sentence_embedding.ndim == 2 else sentence_embedding
    memory = memory.astype(dtype)
    b, t = input_ids.shape
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]  # (1, 1, T, T): query i sees keys <= i
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :] > 0)
    self_bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    if memory_mask is None:
        memory_mask = jnp.ones(memory.shape[:2], jnp.int32)
    memory_bias = L.attention_bias(memory_mask, jnp.float32)

    emb_key, layer_keys = None, None
    if dropout_key is not None:
        emb_key, layers_key = jax.random.split(dropout_key)
        layer_keys = jax.random.split(layers_key, cfg.num_layers)
    x = bert.embed_tokens(encoder_params, cfg, input_ids, None, emb_key)

    def body(h, xs):
        p, c, key = xs
        return _decoder_layer(p, c, cfg, h, self_bias, memory, memory_bias, key), None

    x, _ = jax.lax.scan(body, x, (encoder_params["layers"], decoder_params["cross"], layer_keys), unroll=True)
    head = decoder_params["head"]
    y = L.activation(cfg.hidden_act)(L.dense(head["transform"], x))
    y = L.layer_norm(head["norm"], y, cfg.layer_norm_eps)
    word = encoder_params["embeddings"]["word"]
    logits = L.tied_logits(y.astype(jnp.float32), word.astype(jnp.float32))  # its word-matrix gradient as one GEMM
    return logits + head["bias"]


def reconstruction_loss(encoder_params, decoder_params, cfg: bert.BertConfig, sentence_embedding, target_ids, *,
                        pad_token_id: int | None = None, dropout_key=None):
    """TSDAE's reconstruction loss of ``target_ids`` (B, T) (the original texts, tokenized by the
    encoder's tokenizer, right-padded) from the (B, H) embeddings of their damaged versions, as
    ``DenoisingAutoEncoderLoss.forward``: decoder input ``target_ids[:, :-1]``, labels
    ``target_ids[:, 1:]``, cross-entropy averaged over the labels that are not ``pad_token_id``
    (default ``cfg.pad_token_id``) in the whole batch. (A batch with no label at all gives 0 where
    PyTorch gives NaN.)"""
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    logits = decoder_logits(encoder_params, decoder_params, cfg, sentence_embedding, target_ids[:, :-1],
                            dropout_key=dropout_key)
    labels = target_ids[:, 1:]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    valid = (labels != pad).astype(jnp.float32)
    return jnp.sum((log_z - picked) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def tsdae_loss(encoder_params, decoder_params, cfg: bert.BertConfig, noisy_ids, noisy_mask, target_ids, *,
               pooling: str = "mean", normalize: bool = False, pad_token_id: int | None = None, dropout_key=None):
    """The whole TSDAE loss (arXiv:2104.06979; sentence-transformers' ``DenoisingAutoEncoderLoss``
    with ``tie_encoder_decoder=True``): embed the damaged texts ``noisy_ids`` / ``noisy_mask``
    with ``embedjax.embed`` (``pooling``; ``normalize`` as the model's own pipeline: True when it
    ends in a Normalize module, as all-MiniLM-L6-v2 does), then ``reconstruction_loss`` of the
    originals ``target_ids``. Gradients reach the shared weights through both the encoder and the
    decoder, as with PyTorch's shared tensors."""
    enc_key = dec_key = None
    if dropout_key is not None:
        enc_key, dec_key = jax.random.split(dropout_key)
    z = _embed(encoder_params, cfg, noisy_ids, noisy_mask, pooling=pooling, normalize=normalize,
                        dropout_key=enc_key)
    return reconstruction_loss(encoder_params, decoder_params, cfg, z, target_ids, pad_token_id=pad_token_id,
                               dropout_key=dec_key)
