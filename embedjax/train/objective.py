"""The training objective: which loss, wrapped how, applied to which batch fields.

An ``Objective`` is a frozen (hashable) description built from a config; the pure
``batch_loss(params, enc_cfg, objective, batch, key)`` embeds the batch with the
shared ``embed`` and applies the loss. Batches are dicts of arrays:

    a_ids, a_mask, a_types      first texts        (B, T)
    b_ids, b_mask, b_types      second texts       (B, T)   (absent: unsupervised SimCSE)
    n_ids, n_mask, n_types      hard negatives     (B, T) or (B, k, T)   (optional)
    labels                      gold scores        (B,)     (scored pairs)
    a_hash, b_hash, n_hash      int32 text hashes: equal texts are not each other's negatives

or, packed (``embedjax.data.Packing``: every text of the batch in shared rows, much less
padding), instead of the ``*_ids / *_mask / *_types``:

    p_ids, p_types, p_segments, p_positions     (R, L)
    a_text, b_text, n_text      index of each example's text among the packed ones (B,) / (B, k)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from embedjax import gradcache, losses
from embedjax.embed import embed, embed_packed

LOSSES = ("angle", "cosent", "infonce", "simcse_unsup")
LAYER_MODES = ("", "2dmse", "adaptive", "espresso")


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static description of the loss (hashable: a jit static argument)."""

    loss: str = "angle"
    loss_kwargs: tuple = ()          # sorted (name, value) items passed to the loss
    pooling: str = "mean"
    matryoshka_dims: tuple = ()      # () = off
    matryoshka_weights: tuple = ()
    matryoshka_n_per_step: int = 0   # 0 = every dim every step
    layers: str = ""                 # '' = last layer only; else one of LAYER_MODES
    layer_kwargs: tuple = ()
    remat: bool = False
    dropout: bool = True             # the encoder's dropout during training (SimCSE needs it)
    gradcache_chunk: int = 0         # > 0: GradCache, embedding this many rows at a time

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], pooling: str) -> "Objective":
        """From the ``objective`` section of a config (see configs/*.py)."""
        loss = cfg.get("loss", "angle")
        if loss not in LOSSES:
            raise ValueError(f"unknown objective.loss {loss!r}; choose one of {LOSSES}")
        layers = cfg.get("layers", "") or ""
        if layers not in LAYER_MODES:
            raise ValueError(f"unknown objective.layers {layers!r}; choose one of {LAYER_MODES}")
        if layers in ("2dmse", "espresso") and cfg.get("matryoshka_dims"):
            raise ValueError(f"objective.layers={layers!r} truncates dims itself; matryoshka_dims combine with "
                             "layers='' or 'adaptive' (sentence-transformers' Matryoshka2dLoss)")
        if layers and cfg.get("matryoshka_n_per_step"):
            raise ValueError("matryoshka_n_per_step cannot be combined with objective.layers (the layer "
                             "wrappers own the step's key); use every dim inside 2D losses")
        items = lambda d: tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(d or {}).items()))
        return cls(
            loss=loss,
            loss_kwargs=items(cfg.get("loss_kwargs")),
            pooling=cfg.get("pooling") or pooling,
            matryoshka_dims=tuple(cfg.get("matryoshka_dims") or ()),
            matryoshka_weights=tuple(cfg.get("matryoshka_weights") or ()),
            matryoshka_n_per_step=int(cfg.get("matryoshka_n_per_step") or 0),
            layers=layers,
            layer_kwargs=items(cfg.get("layer_kwargs")),
            remat=bool(cfg.get("remat", False)),
            dropout=bool(cfg.get("dropout", True)),
            gradcache_chunk=int(cfg.get("gradcache_chunk", 0) or 0),
        )


def _pair_loss(objective: Objective):
    """``fn(za, zb, zn, labels, *, a_hash, b_hash, n_hash)`` for the configured loss."""
    kw = dict(objective.loss_kwargs)
    if objective.loss == "angle":
        def fn(za, zb, zn=None, labels=None, *, a_hash=None, b_hash=None, n_hash=None):
            return losses.angle_loss(za, zb, labels, a_ids=a_hash, b_ids=b_hash, **kw)
    elif objective.loss == "cosent":
        def fn(za, zb, zn=None, labels=None, *, a_hash=None, b_hash=None, n_hash=None):
            return losses.cosent(za, zb, labels, **kw)
    else:  # infonce, and unsupervised SimCSE (two dropout views of the same texts)
        def fn(za, zb, zn=None, labels=None, *, a_hash=None, b_hash=None, n_hash=None):
            return losses.infonce(za, zb, zn, anchor_ids=a_hash, positive_ids=b_hash, negative_ids=n_hash, **kw)
    return fn


def loss_function(objective: Objective):
    """The configured loss, with its Matryoshka and layer wrappers, over embeddings."""
    fn = _pair_loss(objective)
    if objective.matryoshka_dims:
        fn = losses.matryoshka(fn, objective.matryoshka_dims, objective.matryoshka_weights or None,
                               n_dims_per_step=objective.matryoshka_n_per_step or None)
    layer_kw = dict(objective.layer_kwargs)
    if objective.layers == "2dmse":
        fn = losses.matryoshka_2d(fn, **layer_kw)
    elif objective.layers == "adaptive":
        fn = losses.adaptive_layer(fn, **layer_kw)
    elif objective.layers == "espresso":
        fn = losses.espresso(fn, **layer_kw)
    return fn


def _embed_side(params, enc_cfg, objective, batch, side, key):
    ids, mask = batch[f"{side}_ids"], batch[f"{side}_mask"]
    types = batch.get(f"{side}_types")
    lead = ids.shape[:-1]  # (B,) or (B, k) for several negatives per anchor
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])
    z = embed(
        params,
        enc_cfg,
        flat(ids),
        flat(mask),
        token_type_ids=flat(types),
        pooling=objective.pooling,
        normalize=False,  # the losses normalise (AnglE's angle term needs the raw vectors)
        dropout_key=key if objective.dropout else None,
        per_layer=bool(objective.layers),
        remat=objective.remat,
    )
    if objective.layers and not dict(objective.layer_kwargs).get("embedding_layer", False):
        z = z[1:]  # drop the embedding-layer output: stack entry p is layer p + 1
    return z.reshape(*z.shape[:-2], *lead, z.shape[-1])


def _embed_packed_batch(params, enc_cfg, objective: Objective, batch, key):
    index = {side: batch[f"{side}_text"] for side in "abn" if f"{side}_text" in batch}
    z = embed_packed(
        params,
        enc_cfg,
        batch["p_ids"],
        batch["p_segments"],
        batch["p_positions"],
        num_texts=sum(i.size for i in index.values()),  # static; an upper bound if texts are shared
        token_type_ids=batch.get("p_types"),
        pooling=objective.pooling,
        normalize=False,
        dropout_key=key if objective.dropout else None,
        per_layer=bool(objective.layers),
        remat=objective.remat,
    )
    if objective.layers and not dict(objective.layer_kwargs).get("embedding_layer", False):
        z = z[1:]
    take = lambda side: jnp.take(z, index[side], axis=-2) if side in index else None
    if "b" not in index:
        raise ValueError("a packed batch needs b_text; for unsupervised SimCSE pack with Packing(views=2) so "
                         "each text is embedded twice under independent dropout")
    return take("a"), take("b"), take("n")


def embed_batch(params, enc_cfg, objective: Objective, batch: Mapping[str, jax.Array], key):
    """``(za, zb, zn)``: embeddings of the batch's sides (``zn`` None without negatives)."""
    if "p_ids" in batch:
        return _embed_packed_batch(params, enc_cfg, objective, batch, key)
    k_a, k_b, k_n = jax.random.split(key, 3)
    za = _embed_side(params, enc_cfg, objective, batch, "a", k_a)
    # Unsupervised SimCSE has no side b: the positive is side a under another dropout mask.
    zb = _embed_side(params, enc_cfg, objective, batch, "b" if "b_ids" in batch else "a", k_b)
    zn = _embed_side(params, enc_cfg, objective, batch, "n", k_n) if "n_ids" in batch else None
    return za, zb, zn


def batch_loss(params, enc_cfg, objective: Objective, batch: Mapping[str, jax.Array], key):
    """Loss of one batch; ``key`` drives dropout and any sampling (dims, layers).

    With ``objective.gradcache_chunk`` the encoder runs chunk by chunk under
    ``jax.checkpoint`` (GradCache): the same loss and gradient, activation memory bounded
    by the chunk instead of the batch.
    """
    k_embed, k_loss = jax.random.split(key)
    if objective.gradcache_chunk and "p_ids" in batch:
        raise ValueError("GradCache chunks the batch by examples; it cannot take a packed batch "
                         "(set data.pack_length=0 with objective.gradcache_chunk)")
    if objective.gradcache_chunk:
        inputs = {k: v for k, v in batch.items() if k.endswith(("_ids", "_mask", "_types"))}
        embed_all = gradcache.chunked_embed(
            lambda p, chunk, k: embed_batch(p, enc_cfg, objective, chunk, k),
            objective.gradcache_chunk,
            batch_axis=1 if objective.layers else 0,  # per-layer stacks are (L, B, D)
        )
        za, zb, zn = embed_all(params, inputs, k_embed)
    else:
        za, zb, zn = embed_batch(params, enc_cfg, objective, batch, k_embed)
    fn = loss_function(objective)
    b_hash = batch.get("b_hash") if ("b_ids" in batch or "b_text" in batch) else batch.get("a_hash")
    kwargs = dict(a_hash=batch.get("a_hash"), b_hash=b_hash, n_hash=batch.get("n_hash"))
    if objective.layers in ("2dmse", "adaptive") or objective.matryoshka_n_per_step:
        kwargs["key"] = k_loss
    return fn(za, zb, zn, batch.get("labels"), **kwargs)
