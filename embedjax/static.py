"""Static embeddings (model2vec-style): a token table distilled from any encoder, texts encoded by
the mean of their tokens' vectors, with no transformer at all.

``distill(encoder, dim=256)`` follows model2vec's recipe (``model2vec.distill``, tested equal to it):

1. the vocabulary: every token of the encoder's tokenizer but its added tokens (the [CLS] / [SEP] /
   [MASK] kind; the unknown and padding tokens stay) and those matching ``token_remove_pattern``
   (BERT's ``[unused*]``), optionally trimmed to ``keep_tokens``; ids renumbered in their order;
2. each token embedded alone by the encoder's own jitted ``embed``: the token between the special
   tokens the tokenizer adds to any text (``[CLS] token [SEP]``), mean of the last layer's states
   over all of them;
3. PCA to ``dim`` components (centred; each component's sign set so that its largest-magnitude
   score is positive);
4. SIF weighting by Zipf's law (the token of rank r, counted from 1 in vocabulary order, gets
   ``sif / (sif + p_r)`` with ``p_r`` proportional to ``1 / (r + 1)``), which shrinks frequent
   tokens' vectors.

The result is an ``Encoder`` over the static backbone (``embedjax.encoders.static``): it encodes,
evaluates, trains in the same loop (a config's ``model`` a saved static directory) and exports
with ``save_pretrained`` to a directory that ``model2vec.StaticModel.from_pretrained`` and
``SentenceTransformer`` load with the same embeddings. ``static_embed(table, ids, mask)`` is the
encode as one jittable pure function.

    encoder = embedjax.load_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    small = static.distill(encoder, dim=256)          # seconds to a minute on a CPU
    small.encode(["A man is playing a flute."])        # (1, 256), unit norm, no transformer
    embedjax.save_pretrained(small, "minilm-static")   # model2vec / sentence-transformers layout
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Collection, Sequence

import jax
import numpy as np

from embedjax import hf, tokenize
from embedjax.embed import embed_jit, truncate
from embedjax.encoders import registry
from embedjax.encoders import static as static_backbone
from embedjax.pooling import pool

DEFAULT_REMOVE_PATTERN = r"\[unused\d+\]"  # model2vec's default: BERT's unused slots


def static_embed(table, ids, mask, *, normalize: bool = True):
    """(B, T) token ids and their 0/1 mask -> (B, H): the mean of ``table``'s rows over each text's
    tokens, L2-normalised when ``normalize`` (a text without tokens gives zeros). Pure and jittable;
    ``Encoder.encode`` of a static model computes exactly this (``embed`` over the static backbone)."""
    return truncate(pool(table[ids], mask, "mean"), None, normalize)


def zipf_weights(n: int, sif_coefficient: float | None) -> np.ndarray:
    """(n,) SIF weights ``a / (a + p_r)`` of the tokens of rank r = 1..n, ``p_r`` Zipf's law
    (proportional to ``1 / (r + 1)``, normalised over the n tokens); ones when ``sif_coefficient`` is
    None: the weighting of SIF (Arora et al., ICLR 2017) with model2vec's frequency estimate."""
    if sif_coefficient is None:
        return np.ones(n)
    if not 0 < sif_coefficient < 1:
        raise ValueError(f"sif_coefficient must be in (0, 1) or None, got {sif_coefficient}")
    inverse_rank = 1 / np.arange(2, n + 2)
    return sif_coefficient / (sif_coefficient + inverse_rank / inverse_rank.sum())


def pca(x, dim: int) -> np.ndarray:
    """(N, D) -> (N, dim): centred scores on the ``dim`` leading principal components (eigenvectors
    of the covariance, largest variance first), each component's sign set so that its
    largest-magnitude score is positive (model2vec's convention, so a distillation is deterministic)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"pca takes an (N, D) matrix, got shape {x.shape}")
    if not 1 <= dim <= min(x.shape[1], x.shape[0] - 1):
        raise ValueError(f"dim must be in 1..{min(x.shape[1], x.shape[0] - 1)} for {x.shape[0]} vectors of width "
                         f"{x.shape[1]}, got {dim}")
    centred = x - x.mean(axis=0)
    _, eigenvectors = np.linalg.eigh(centred.T @ centred / (len(x) - 1))
    scores = centred @ eigenvectors[:, ::-1][:, :dim]
    signs = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(dim)])
    return scores * np.where(signs == 0, 1, signs)


# --------------------------------------------------------------------------- the vocabulary


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """What a distillation keeps of a tokenizer: ``tokens`` (in order: the table's rows), their ids in
    the encoder's tokenizer (``source_ids``), the static tokenizer (``tokenizer_json``: the same
    normalisation and splitting over the kept tokens renumbered 0..V-1, no post-processor), the
    special ids the encoder's tokenizer wraps every text in (``prefix``, ``suffix``: [CLS] / [SEP]) and
    the padding token's new id (None without one)."""

    tokens: tuple[str, ...]
    source_ids: tuple[int, ...]
    tokenizer_json: str
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad_id: int | None


def special_ids(backend) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids a ``tokenizers`` backend puts before and after any text (its post-processor's
    [CLS] ... [SEP], <s> ...), read off a probe text encoded with and without them."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return tuple(full[:start]), tuple(full[start + len(plain):])
    raise ValueError(f"cannot find the text's tokens {plain} among {full}: an unusual post-processor")


def named_specials(directory: Path | None, tokenizer_json: dict) -> tuple[str | None, str | None]:
    """(unknown token, padding token) as transformers names them: ``tokenizer_config.json`` /
    ``special_tokens_map.json`` of the encoder's directory, else ``tokenizer.json`` itself."""
    names: dict = {}
    if directory is not None:
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            names.update({k: v for k, v in (hf.read_json(directory / name) or {}).items()
                          if k in ("unk_token", "pad_token") and v is not None})
    content = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
    model = tokenizer_json["model"]
    unk = content(names.get("unk_token")) or model.get("unk_token")
    if unk is None and model.get("type") == "Unigram" and model.get("unk_id") is not None:
        unk = model["vocab"][model["unk_id"]][0]
    pad = content(names.get("pad_token")) or (tokenizer_json.get("padding") or {}).get("pad_token")
    return unk, pad


def _model_vocab(model: dict) -> dict[str, int]:
    if model["type"] == "Unigram":
        return {piece: i for i, (piece, _) in enumerate(model["vocab"])}
    if model["type"] in ("WordPiece", "BPE", "WordLevel"):
        return dict(model["vocab"])
    raise ValueError(f"tokenizer model {model['type']!r} is not supported (WordPiece, BPE, Unigram, WordLevel)")


def _keep_only(model: dict, kept: Sequence[str]) -> dict:
    """The tokenizer model over ``kept`` tokens renumbered 0..V-1 in their order (BPE: the merges of
    removed tokens go too; Unigram: the unknown id follows its token)."""
    model = dict(model)
    if model["type"] == "Unigram":
        scores = dict((piece, score) for piece, score in model["vocab"])
        unk = model["vocab"][model["unk_id"]][0] if model.get("unk_id") is not None else None
        model["vocab"] = [[t, scores[t]] for t in kept]
        model["unk_id"] = kept.index(unk) if unk in kept else None
        return model
    model["vocab"] = {t: i for i, t in enumerate(kept)}
    if model["type"] == "BPE":
        keep = set(kept)
        pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
        model["merges"] = [pair for pair in pairs if pair[0] in keep and pair[1] in keep and pair[0] + pair[1] in keep]
    return model


def _with_prefix_space(pre_tokenizer: dict | None) -> dict | None:
    """A byte-level pre-tokenizer that adds a prefix space (model2vec's, so a text's first word is the
    same token as anywhere else); any other pre-tokenizer unchanged."""
    if pre_tokenizer is None:
        return None
    if pre_tokenizer.get("type") == "ByteLevel":
        return {**pre_tokenizer, "add_prefix_space": True}
    if pre_tokenizer.get("type") == "Sequence":
        return {**pre_tokenizer, "pretokenizers": [_with_prefix_space(p) for p in pre_tokenizer["pretokenizers"]]}
    return pre_tokenizer


def static_vocabulary(backend, directory: Path | None = None, *,
                      token_remove_pattern: str | None = DEFAULT_REMOVE_PATTERN,
                      keep_tokens: Collection[str] | None = None) -> Vocabulary:
    """The vocabulary a distillation keeps of a ``tokenizers`` backend (see ``Vocabulary``), as model2vec
    keeps it: every token but the added ones other than the unknown and padding tokens, and those
    matching ``token_remove_pattern`` (``re.match``); with ``keep_tokens``, only those (the unknown and
    padding tokens always stay). ``directory``: the encoder's, for its named special tokens."""
    source = json.loads(backend.to_str())
    try:
        remove = re.compile(token_remove_pattern) if token_remove_pattern is not None else None
    except re.error as err:
        raise ValueError(f"token_remove_pattern {token_remove_pattern!r} is not a regular expression: {err}") from None
    unk, pad = named_specials(directory, source)
    vocab = _model_vocab(source["model"])
    added = {t["content"] for t in source.get("added_tokens", [])} - {unk, pad}
    keep = None if keep_tokens is None else set(keep_tokens) | {unk, pad}
    kept = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])
            if t not in added and not (remove and remove.match(t)) and (keep is None or t in keep)]
    if not kept:
        raise ValueError("the vocabulary is empty after removing the added tokens, token_remove_pattern "
                         f"{token_remove_pattern!r} and keep_tokens")
    new_ids = {t: i for i, t in enumerate(kept)}
    out = {**source, "truncation": None, "padding": None, "post_processor": None,
           "pre_tokenizer": _with_prefix_space(source.get("pre_tokenizer")),
           "added_tokens": [{**t, "id": new_ids[t["content"]]} for t in source.get("added_tokens", [])
                            if t["content"] in new_ids],
           "model": _keep_only(source["model"], kept)}
    prefix, suffix = special_ids(backend)
    return Vocabulary(tuple(kept), tuple(vocab[t] for t in kept), json.dumps(out), prefix, suffix,
                      new_ids.get(pad))


def used_tokens(encoder, texts: Sequence[str], *,
                token_remove_pattern: str | None = DEFAULT_REMOVE_PATTERN) -> set[str]:
    """The tokens the static tokenizer distilled from ``encoder`` cuts ``texts`` into: ``keep_tokens``
    for a vocabulary trimmed to a corpus (each text then tokenizes as before: WordPiece picks the
    longest piece, and every piece it picked stays)."""
    from tokenizers import Tokenizer as Backend

    vocabulary = static_vocabulary(encoder.tokenizer.backend, encoder.path, token_remove_pattern=token_remove_pattern)
    backend = Backend.from_str(vocabulary.tokenizer_json)
    return {token for e in backend.encode_batch(list(texts), add_special_tokens=False) for token in e.tokens}


# --------------------------------------------------------------------------- distillation


def token_embeddings(encoder, vocabulary: Vocabulary, *, batch_size: int = 1024,
                     show_progress: bool | None = None) -> np.ndarray:
    """(V, H) float32: each kept token between the encoder's special tokens (``prefix``, ``suffix``)
    through the encoder's backbone, the mean of the last layer's states over all of them (the
    encoder's own pooling, Dense head and normalisation are not applied: model2vec's recipe). One
    compiled shape: every batch has ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = np.asarray([[*vocabulary.prefix, i, *vocabulary.suffix] for i in vocabulary.source_ids], np.int32)
    n, length = ids.shape
    rows = min(batch_size, n)
    mask = np.ones((rows, length), np.int32)
    types = np.zeros((rows, length), np.int32)
    starts = range(0, n, rows)
    if show_progress or (show_progress is None and n > 16 * rows):
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="distil: embedding tokens", unit="batch",
                      disable=None if show_progress is None else False)
    out = np.empty((n, encoder.cfg.hidden_size), np.float32)
    for start in starts:
        chunk = ids[start:start + rows]
        batch = np.pad(chunk, ((0, rows - len(chunk)), (0, 0)), constant_values=chunk[0, 0])
        z = embed_jit(encoder.params, encoder.cfg, batch, mask, types, mask, pooling="mean", normalize=False,
                      dim=None, num_layers=None)
        out[start:start + len(chunk)] = np.asarray(z)[: len(chunk)]
    return np.nan_to_num(out)


def distill(encoder, *, dim: int | None = 256, sif_coefficient: float | None = 1e-4,
            token_remove_pattern: str | None = DEFAULT_REMOVE_PATTERN, keep_tokens: Collection[str] | None = None,
            max_length: int = static_backbone.DEFAULT_MAX_LENGTH, batch_size: int = 1024,
            show_progress: bool | None = None):
    """A static ``Encoder`` distilled from ``encoder`` (an ``embedjax.load_pretrained`` transformer):
    model2vec's recipe (the module docstring), equal to ``model2vec.distill.distill`` of the same model
    with the same settings (up to each PCA component's sign where two scores tie).

    Args:
      encoder: the teacher; its backbone, not its pooling or Dense head, embeds each token.
      dim: PCA components kept (<= the encoder's width and < the vocabulary size); None: no PCA, the
        encoder's width.
      sif_coefficient: SIF weighting's ``a`` in (0, 1); None: no weighting.
      token_remove_pattern: tokens matching this regex (``re.match``) are dropped (model2vec's
        default: BERT's ``[unused*]``); None keeps them.
      keep_tokens: trim the vocabulary to these tokens (e.g. ``used_tokens(encoder, corpus)``; the unknown
        and padding tokens always stay); None: the whole vocabulary. Exact for WordPiece (the corpus
        tokenizes as before); a BPE tokenizer also loses the merges through the removed tokens.
      max_length: tokens per text when encoding (model2vec's 512).
      batch_size: tokens per forward pass.
      show_progress: a tqdm bar over the batches (None: for long runs on a terminal).

    Returns an ``Encoder``: ``params["embeddings"]`` the (V, dim) float32 table, mean pooling, unit-norm
    output, its tokenizer the static vocabulary's (no special tokens; the unknown token dropped).
    """
    from embedjax.model import Encoder

    if registry.of(encoder.cfg) is static_backbone.BACKBONE:
        raise ValueError("the encoder is already a static table; distil from a transformer")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer))
                            or not 1 <= dim <= encoder.cfg.hidden_size):
        raise ValueError(f"dim must be in 1..{encoder.cfg.hidden_size} (the encoder's width) or None, got {dim!r}")
    zipf_weights(1, sif_coefficient)  # checks the coefficient before the long part
    if not 1 <= max_length:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    vocabulary = static_vocabulary(encoder.tokenizer.backend, encoder.path, token_remove_pattern=token_remove_pattern,
                                   keep_tokens=keep_tokens)
    if dim is not None and dim >= len(vocabulary.tokens):
        raise ValueError(f"dim {dim} must be smaller than the vocabulary ({len(vocabulary.tokens)} tokens)")
    vectors = token_embeddings(encoder, vocabulary, batch_size=batch_size, show_progress=show_progress)
    if dim is not None:
        vectors = pca(vectors, dim)
    table = (vectors * zipf_weights(len(vectors), sif_coefficient)[:, None]).astype(np.float32)
    cfg = static_backbone.StaticConfig(
        vocab_size=len(table), hidden_size=table.shape[1], pad_token_id=vocabulary.pad_id or 0, max_length=max_length,
        apply_pca=dim, sif_coefficient=sif_coefficient, base_model=str(encoder.path or "") or None)
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(vocabulary.tokenizer_json)
    tokenizer = tokenize.Tokenizer(backend, max_length, cfg.pad_token_id,
                                   **static_backbone.tokenizer_options(cfg, backend))
    return Encoder(params=jax.device_put({"embeddings": table}), cfg=cfg, tokenizer=tokenizer, pooling="mean",
                   max_length=max_length, normalize=True)
