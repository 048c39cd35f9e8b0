"""``embed``: the one pure function from token ids to text embeddings.

Encoding, training and evaluation all call it, so what is trained is exactly
what is evaluated and exported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from embedjax import dense_head
from embedjax import pooling as pooling_lib
from embedjax.encoders import registry


def pooler_params(params, pooling: str):
    """The pooler's params (``params["pooler"]``) when ``pooling`` has trainable ones, else None."""
    if pooling not in pooling_lib.PARAMETRIC:
        return None
    if "pooler" not in params:
        raise ValueError(f"pooling {pooling!r} needs params['pooler'] (pooling.init_latent_attention; "
                         "load_pretrained(..., pooling=...) adds it)")
    return params["pooler"]


def project(params, pooled, dense: str | None):
    """The Dense head (``params["dense"]``, activation ``dense``) over pooled embeddings; None: none."""
    if dense is None:
        return pooled
    if dense_head.KEY not in params:
        raise ValueError(f"dense={dense!r} needs params['dense'] (embedjax.dense_head; load_pretrained reads a "
                         "sentence-transformers Dense module into it)")
    return dense_head.apply(params[dense_head.KEY], pooled, dense)


def _first_last(hidden, per_layer: bool):
    """``first_last_avg``: the mean of the first layer's and the last layer's token states (the
    stack's entries 1 and -1; entry 0 is the embedding layer), as SimCSE's ``avg_first_last``."""
    if per_layer:
        raise ValueError("pooling 'first_last_avg' averages two layers; per-layer embeddings take one layer each")
    return (hidden[1] + hidden[-1]) / 2


def truncate(z, dim: int | None, normalize: bool):
    """Keeps the first ``dim`` components (Matryoshka), then L2-normalises if asked."""
    if dim is not None:
        if not 1 <= dim <= z.shape[-1]:
            raise ValueError(f"dim must be in 1..{z.shape[-1]}, got {dim}")
        z = z[..., :dim]
    if normalize:
        z32 = z.astype(jnp.float32)
        z = z32 / jnp.maximum(jnp.linalg.norm(z32, axis=-1, keepdims=True), 1e-12)
    return z


def _hidden_states(params, cfg, input_ids, attention_mask, *, per_layer: bool, **kwargs):
    """The backbone's hidden states (every layer's with ``per_layer``); ``kwargs``: ``apply``'s
    (token types, dropout key, depth, remat, unroll, and the packed layout's segments / positions)."""
    return registry.of(cfg).apply(params, cfg, input_ids, attention_mask, all_layers=per_layer, **kwargs)


def embed(
    params,
    cfg,
    input_ids,
    attention_mask,
    *,
    pooling: str = "mean",
    normalize: bool = True,
    dim: int | None = None,
    num_layers: int | None = None,
    token_type_ids=None,
    pool_mask=None,
    dropout_key=None,
    per_layer: bool = False,
    remat: bool | str = False,
    unroll: bool | int = True,
    dense: str | None = None,
    token_prepending=None,
    contrastive_prompting=None,
):
    """Token ids -> text embeddings.

    Args:
      params, cfg: encoder params and config (any backbone of ``embedjax.encoders.registry``);
        with ``latent_attention`` pooling, ``params["pooler"]`` holds the pooler's params.
      input_ids, attention_mask: (B, T) int arrays.
      pooling: one of ``pooling.MODES``.
      normalize: L2-normalise the output (after ``dim`` truncation).
      dim: keep the first ``dim`` components (Matryoshka truncation).
      num_layers: use only the first k layers (the rest are not computed).
      token_type_ids: optional (B, T) segment ids.
      pool_mask: optional (B, T) mask for pooling only (e.g. to exclude an
        instruction prefix); defaults to ``attention_mask``.
      dropout_key: PRNG key for dropout (training); None is deterministic.
      per_layer: return the pooled embedding of every hidden state,
        shape (k + 1, B, D) with index 0 the embedding-layer output, from one
        forward pass (what layer-wise / 2D Matryoshka losses need).
      remat: rematerialise layers in the backward pass (True, or a ``jax.checkpoint_policies``
        name such as ``"dots_with_no_batch_dims_saveable"`` where the backbone takes one).
      unroll: the layer scan's unroll (True: fully unrolled, fastest steps for small models;
        False: one compiled layer, fast compiles for deep LLMs).
      dense: the activation of a Dense head after pooling (``params["dense"]``,
        ``embedjax.dense_head``); None: no head.
      token_prepending, contrastive_prompting: decoder backbones' training-free options
        (``embedjax.encoders.decoder.TokenPrepending`` / ``ContrastivePrompting``; the user-facing
        API is ``embedjax.prompting``), passed to the backbone only when set. With
        ``contrastive_prompting`` the 2B rows are B prompts then their B auxiliary prompts (and
        ``pool_mask``, if given, has those 2B rows too): B embeddings come back.

    Returns:
      (B, D) float array, or (k + 1, B, D) when ``per_layer``.
    """
    layers = pooling in pooling_lib.LAYER_MODES
    options = {name: value for name, value in (("token_prepending", token_prepending),
                                               ("contrastive_prompting", contrastive_prompting)) if value is not None}
    hidden = _hidden_states(params, cfg, input_ids, attention_mask, token_type_ids=token_type_ids,
                            dropout_key=dropout_key, num_layers=num_layers, per_layer=per_layer or layers,
                            remat=remat, unroll=unroll, **options)
    if layers:
        hidden, pooling = _first_last(hidden, per_layer), "mean"
    mask = attention_mask if pool_mask is None else pool_mask
    if contrastive_prompting is not None:  # the prompts' rows (the auxiliary prompts' are not returned)
        mask = mask[: mask.shape[0] // 2]
    pooled = pooling_lib.pool(hidden, mask, pooling, params=pooler_params(params, pooling))
    return truncate(project(params, pooled, dense), dim, normalize)


def embed_packed(
    params,
    cfg,
    input_ids,
    segment_ids,
    positions,
    *,
    num_texts: int,
    token_type_ids=None,
    pool_flags=None,
    pooling: str = "mean",
    normalize: bool = True,
    dim: int | None = None,
    num_layers: int | None = None,
    dropout_key=None,
    per_layer: bool = False,
    remat: bool | str = False,
    unroll: bool | int = True,
    dense: str | None = None,
):
    """``embed`` for packed rows (``embedjax.tokenize.Tokenizer.pack``): several texts per row.

    Args:
      input_ids, segment_ids, positions: (R, T) int arrays; ``segment_ids`` is 0 on padding
        and ``i + 1`` on the tokens of text i, ``positions`` each token's index in its text.
      num_texts: how many texts the rows hold (static): the output has this many rows.
      pool_flags: optional (R, T) 0/1, the tokens pooling reads (``embed``'s ``pool_mask``
        packed: 0 on an instruction prefix excluded from pooling); default every text token.
      the rest: as ``embed``.

    Returns:
      (num_texts, D), or (k + 1, num_texts, D) when ``per_layer``: for every text what
      ``embed`` gives it alone, with far less padding to compute on.
    """
    layers = pooling in pooling_lib.LAYER_MODES
    hidden = _hidden_states(params, cfg, input_ids, segment_ids > 0, token_type_ids=token_type_ids,
                            dropout_key=dropout_key, num_layers=num_layers, per_layer=per_layer or layers,
                            remat=remat, unroll=unroll, segment_ids=segment_ids, positions=positions)
    if layers:
        hidden, pooling = _first_last(hidden, per_layer), "mean"
    pooled = pooling_lib.pool_segments(hidden, segment_ids, positions, num_texts, pooling,
                                       params=pooler_params(params, pooling), pool_flags=pool_flags)
    return truncate(project(params, pooled, dense), dim, normalize)


@functools.partial(jax.jit, static_argnames=("cfg", "pooling", "normalize", "dim", "num_layers", "dense",
                                             "token_prepending", "contrastive_prompting"))
def embed_jit(params, cfg, input_ids, attention_mask, token_type_ids, pool_mask, *, pooling, normalize, dim, num_layers,
              dense=None, token_prepending=None, contrastive_prompting=None):
    """``embed`` compiled for inference (float32 output), one program per shape and option set
    (``token_prepending`` / ``contrastive_prompting``: static, as ``embed``'s)."""
    z = embed(
        params,
        cfg,
        input_ids,
        attention_mask,
        pooling=pooling,
        normalize=normalize,
        dim=dim,
        num_layers=num_layers,
        token_type_ids=token_type_ids,
        pool_mask=pool_mask,
        dense=dense,
        token_prepending=token_prepending,
        contrastive_prompting=contrastive_prompting,
    )
    return z.astype(jnp.float32)
