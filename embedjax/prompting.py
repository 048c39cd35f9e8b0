"""Training-free sentence embeddings from decoder LLMs: a prompt template whose last token's state
is the embedding, and two inference-time edits of the decoder. For an ``Encoder`` of a decoder
checkpoint (``embedjax.load_pretrained(path, pooling="last_token")``):

* PromptEOL (arXiv:2307.16645): ``encode_with_template(enc, texts)``, the template ``PROMPTEOL``;
* MetaEOL (arXiv:2402.18458): ``encode_averaged(enc, texts)``, the mean over the ``METAEOL`` templates;
* Token Prepending (arXiv:2412.11556): ``encode_token_prepending(add_placeholder(enc), texts)``;
* Contrastive Prompting (arXiv:2505.12831): ``encode_contrastive(enc, texts, layer=, coeff=)``.

Each reads the last token of the filled template: whatever the encoder's pooling, these functions
encode with ``last_token`` pooling and without the EOS that ``load_pretrained`` appends for
last-token pooling (the templates end on their own last token, the opening quote of the answer).
Texts are first cleaned as the official evaluation scripts do (``clean_text``; ``clean=False``
keeps them as given). The edits themselves are options of the decoder backbone
(``embedjax.encoders.decoder.TokenPrepending`` / ``ContrastivePrompting``, reached through
``embed`` and ``Encoder.encode``). The official scripts read an intermediate layer for some
models (``--output_layer``): pass ``num_layers=k`` for their ``output_layer=k`` (the output of
layer k, no final norm; ``output_layer=-2`` is ``num_layers=L - 1``), None for ``-1``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax import tokenize
from embedjax.encoders import decoder
from embedjax.model import Encoder

TEXT = "{text}"
PLACEHOLDER = "<PST>"

# kongds/scaling_sentemb, README.md (the evaluation command's
# TEMPLATE='This_sentence_:_"*sent_0*"_means_in_one_word:"'; evaluation.py reads "_" as " ").
PROMPTEOL = 'This sentence : "{text}" means in one word:"'

# Yibin-Lei/MetaEOL, evaluation.py (prompt_method "metaeol"): the eight meta-task templates, in order.
METAEOL = (
    "In this task, you're presented with a text excerpt. Your task is to categorize the excerpt into a broad "
    "category such as 'Education', 'Technology', 'Health', 'Business', 'Environment', 'Politics', or 'Culture'. "
    "These categories help in organizing content for better accessibility and targeting. For this task, this "
    'sentence : "{text}" should be classified under one general category in one word:"',
    "In this task, you're given a statement and you need to determine whether it's presenting an 'Opinion' or a "
    "'Fact'. This distinction is vital for information verification, educational purposes, and content analysis. "
    'For this task, this sentence : "{text}" discriminates between opinion and fact in one word:"',
    "In this task, you're given a review from an online platform. Your task is to generate a rating for the "
    "product based on the review on a scale of 1-5, where 1 means 'extremely negative' and 5 means 'extremely "
    'positive\'. For this task, this sentence : "{text}" reflects the sentiment in one word:"',
    "In this task, you're reading a personal diary entry. Your task is to identify the predominant emotion "
    "expressed, such as joy, sadness, anger, fear, or love. For this task, this sentence : \"{text}\" conveys the "
    'emotion in one word:"',
    "In this task, you're presented with two sentences. Your task is to assess whether the sentences convey the "
    "same meaning. Use 'identical', 'similar', 'different', or 'unrelated' to describe the relationship. To "
    'enhance the performance of this task, this sentence : "{text}" means in one word:"',
    "In this task, you're given a sentence and a phrase. Your task is to determine if the phrase can be a "
    "contextual synonym within the given sentence. Options include 'yes', 'no', or 'partially'. To enhance the "
    'performance of this task, this sentence : "{text}" means in one word:"',
    "In this task, you're examining a news article. Your task is to extract the most critical fact from the "
    'article. For this task, this sentence : "{text}" encapsulates the key fact in one word:"',
    "In this task, you're reviewing a scientific abstract. Your task is to identify the main entities (e.g., "
    "proteins, diseases) and their relations (e.g., causes, treats). For this task, this sentence : \"{text}\" "
    'highlights the primary entity or relation in one word:"',
)

# fuyuchenIfyw/token_prepending, evaluate.py (prompt_method "prompteol", plan "tp"): the placeholder
# before the quoted sentence.
PROMPTEOL_TP = 'This sentence : <PST> "{text}" means in one word:"'

# zifengcheng/CP, evaluate_intervention.py: the auxiliary ("negative") prompt.
CP_AUXILIARY = 'The irrelevant information of this sentence : "{text}" means in one word:"'


def clean_text(text: str) -> str:
    """A sentence as the official scripts put it in a template (the batchers of all four papers'
    evaluation scripts): a final "." added unless it ends in . ? " ', double quotes turned into
    single ones, a final "?" turned into "."."""
    if text and text[-1] not in ".?\"'":
        text += "."
    text = text.replace('"', "'")
    if text and text[-1] == "?":
        text = text[:-1] + "."
    return text


def check_template(template: str) -> str:
    """``template`` if it holds ``{text}`` (where each text goes), else ValueError."""
    if not isinstance(template, str) or TEXT not in template:
        raise ValueError(f"a template must contain {TEXT!r} where the text goes, got {template!r}")
    return template


def fill(template: str, texts: Sequence[str], *, clean: bool = True) -> list[str]:
    """Every text put in ``template`` (``clean_text`` first unless ``clean=False``), stripped as the
    official scripts strip the filled prompt."""
    check_template(template)
    return [template.replace(TEXT, clean_text(t) if clean else t).strip() for t in texts]


def prepend_placeholder(template: str, token: str = PLACEHOLDER) -> str:
    """A template for Token Prepending: ``token`` and a space before the quoted ``"{text}"``, as the
    official repository writes its templates (``PROMPTEOL_TP`` from ``PROMPTEOL``; MetaEOL's too)."""
    quoted = f'"{TEXT}"'
    if quoted not in check_template(template):
        raise ValueError(f"prepend_placeholder: no {quoted!r} in {template!r}")
    return template.replace(quoted, f"{token} {quoted}")


def _copy_backend(backend):
    """An independent copy of a ``tokenizers.Tokenizer`` (truncation and added tokens are its state)."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(backend.to_str())


def _decoder(encoder: Encoder) -> Encoder:
    if not isinstance(encoder.cfg, decoder.DecoderConfig):
        raise ValueError(f"these prompting methods read a decoder LLM's last token; {encoder.cfg.model_type!r} is "
                         f"not a decoder (supported: {decoder.SUPPORTED_MODEL_TYPES})")
    return encoder


def last_token_encoder(encoder: Encoder) -> Encoder:
    """``encoder`` with ``last_token`` pooling and no appended EOS (its tokenizer copied when it
    appends one): the embedding is the state of the template's own last token (arXiv:2307.16645)."""
    tok = encoder.tokenizer
    if tok.appends_eos:
        tok = tokenize.Tokenizer(_copy_backend(tok.backend), tok.max_length, tok.pad_token_id, buckets=tok.buckets)
    return dataclasses.replace(_decoder(encoder), pooling="last_token", tokenizer=tok)


def encode_with_template(encoder: Encoder, texts: str | Sequence[str], template: str = PROMPTEOL, *,
                         clean: bool = True, **encode_kwargs) -> np.ndarray:
    """PromptEOL (arXiv:2307.16645): each text put in ``template``, the embedding the last token's
    final hidden state. ``encode_kwargs``: ``Encoder.encode``'s (``normalize``, ``num_layers``,
    ``batch_size``, ...). Returns (N, D) float32, or (D,) for one string."""
    single = isinstance(texts, str)
    prompts = fill(template, [texts] if single else texts, clean=clean)
    out = last_token_encoder(encoder).encode(prompts, **encode_kwargs)
    return out[0] if single else out


def encode_averaged(encoder: Encoder, texts: str | Sequence[str], templates: Sequence[str] = METAEOL, *,
                    clean: bool = True, **encode_kwargs) -> np.ndarray:
    """MetaEOL (arXiv:2402.18458): the mean of the texts' ``encode_with_template`` embeddings over
    ``templates`` (default: the paper's eight meta-task templates, ``METAEOL``), as the official
    code averages the raw last-token states (normalise afterwards if you need unit vectors)."""
    templates = [check_template(t) for t in ([templates] if isinstance(templates, str) else templates)]
    if not templates:
        raise ValueError("encode_averaged needs at least one template")
    enc = last_token_encoder(encoder)
    return np.mean([encode_with_template(enc, texts, t, clean=clean, **encode_kwargs) for t in templates], axis=0)


def add_placeholder(encoder: Encoder, token: str = PLACEHOLDER, *, seed: int = 0) -> Encoder:
    """A copy of a decoder ``encoder`` whose tokenizer knows ``token`` (Token Prepending's placeholder,
    arXiv:2412.11556) and whose embedding table has a row for it, drawn from a standard normal as
    the official code draws it (``torch.randn``; here from ``jax.random.key(seed)``). An id past the
    table appends rows (the config's ``vocab_size`` follows); ``encoder`` itself is not changed."""
    _decoder(encoder)
    backend = _copy_backend(encoder.tokenizer.backend)
    if backend.token_to_id(token) is not None:
        raise ValueError(f"{token!r} is already a token of this tokenizer; choose a placeholder it does not know")
    backend.add_tokens([token])
    token_id = backend.token_to_id(token)
    tok = encoder.tokenizer
    tokenizer = tokenize.Tokenizer(backend, tok.max_length, tok.pad_token_id, buckets=tok.buckets,
                                   eos_token_id=tok.eos_token_id)
    table = encoder.params["embed"]
    rows, width = max(table.shape[0], token_id + 1), table.shape[1]
    table = jnp.concatenate([table, jnp.zeros((rows - table.shape[0], width), table.dtype)])
    table = table.at[token_id].set(jax.random.normal(jax.random.key(seed), (width,), table.dtype))
    return dataclasses.replace(encoder, params={**encoder.params, "embed": table},
                               cfg=dataclasses.replace(encoder.cfg, vocab_size=rows), tokenizer=tokenizer)


def encode_token_prepending(encoder: Encoder, texts: str | Sequence[str], template: str = PROMPTEOL_TP, *,
                            start: int = 1, stop: int | None = None, token: str = PLACEHOLDER, clean: bool = True,
                            **encode_kwargs) -> np.ndarray:
    """Token Prepending (arXiv:2412.11556): ``encode_with_template`` with the placeholder ``token`` in
    ``template`` and, before each layer ``start <= i < stop`` (0-based; None: every layer from
    ``start``), the placeholder's state replaced by the last token's
    (``embedjax.encoders.decoder.TokenPrepending``). ``encoder`` must know the placeholder
    (``add_placeholder``). The official configs pair it with an intermediate layer, e.g.
    Llama-2-7B: ``start=1, stop=7, num_layers=27``."""
    token_id = _decoder(encoder).tokenizer.backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the encoder's tokenizer has no {token!r}: encode with add_placeholder(encoder, {token!r})")
    if token not in check_template(template):
        raise ValueError(f"the template has no placeholder {token!r}: {template!r} (see prepend_placeholder)")
    spec = decoder.TokenPrepending(token_id, start, stop)
    spec.span(encoder.cfg, encoder.params["embed"].shape[0])  # a clear error before any tokenization
    return encode_with_template(encoder, texts, template, clean=clean, token_prepending=spec, **encode_kwargs)


def encode_contrastive(encoder: Encoder, texts: str | Sequence[str], template: str = PROMPTEOL,
                       auxiliary: str = CP_AUXILIARY, *, layer: int, coeff: float = 1.0, strategy: str = "scaled",
                       clean: bool = True, **encode_kwargs) -> np.ndarray:
    """Contrastive Prompting (arXiv:2505.12831): ``encode_with_template`` where, at ``layer``
    (0-based), the last token's attention output (the input of ``o_proj``) is steered away from
    the same quantity of the ``auxiliary`` prompt of the same text (``strategy`` and ``coeff``:
    ``embedjax.encoders.decoder.ContrastivePrompting``). The official script's settings:
    Llama-2-7B ``layer=4, coeff=0.5, num_layers=27``; Llama-3-8B ``layer=6, coeff=0.25`` with
    ``num_layers`` one below the model's (``output_layer=-2``)."""
    spec = decoder.ContrastivePrompting(layer, coeff, strategy)
    spec.check(encode_kwargs.get("num_layers") or _decoder(encoder).cfg.num_layers)
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    prompts, aux = fill(template, texts, clean=clean), fill(auxiliary, texts, clean=clean)
    out = last_token_encoder(encoder).encode(prompts, contrastive_prompting=spec, auxiliary_texts=aux,
                                             **encode_kwargs)
    return out[0] if single else out
