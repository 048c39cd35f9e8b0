"""Pooling token states (B, T, H) into one vector per text (B, H).

Every function takes the (B, T) 0/1 attention mask so that padding never leaks
into the result. Modes follow sentence-transformers' ``Pooling`` module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("cls", "mean", "max", "cls_avg", "last_token", "weighted_mean", "mean_sqrt_len")


def _mask(mask, hidden):
    return mask[..., None].astype(hidden.dtype)


def cls(hidden, mask):
    """The state of the first token the mask keeps (position 0 under right padding).

    As sentence-transformers (``argmax`` of the mask): with left padding, or with an
    instruction excluded from pooling (``include_prompt=False``), it is the first
    token that is pooled, not position 0. A row whose mask is all 0 reads position 0.
    """
    idx = jnp.argmax(mask > 0, axis=1)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def mean(hidden, mask):
    """Average over real tokens (sum / max(count, 1e-9), as sentence-transformers)."""
    m = _mask(mask, hidden)
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def mean_sqrt_len(hidden, mask):
    """Sum over real tokens divided by sqrt(count)."""
    m = _mask(mask, hidden)
    return (hidden * m).sum(1) / jnp.sqrt(jnp.maximum(m.sum(1), 1e-9))


def max_(hidden, mask):
    """Element-wise max over real tokens (padding set to a very negative value first)."""
    m = mask[..., None] > 0
    return jnp.where(m, hidden, jnp.finfo(hidden.dtype).min).max(1)


def cls_avg(hidden, mask):
    """(cls + mean) / 2, AnglE's ``cls_avg``."""
    return (cls(hidden, mask) + mean(hidden, mask)) / 2


def last_token(hidden, mask):
    """State of the last real token; works for right and left padding alike.

    The index is the last position whose mask is 1, so no padding side needs to be known.
    """
    t = hidden.shape[1]
    idx = t - 1 - jnp.argmax(jnp.flip(mask, axis=1) > 0, axis=1)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]


def weighted_mean(hidden, mask):
    """Position-weighted mean: token i (1-based among real tokens) has weight i (SGPT)."""
    m = mask.astype(hidden.dtype)
    weights = jnp.cumsum(m, axis=1) * m
    return (hidden * weights[..., None]).sum(1) / jnp.maximum(weights.sum(1, keepdims=True), 1e-9)


_FUNCS = {
    "cls": cls,
    "mean": mean,
    "max": max_,
    "cls_avg": cls_avg,
    "last_token": last_token,
    "weighted_mean": weighted_mean,
    "mean_sqrt_len": mean_sqrt_len,
}


def pool(hidden, mask, mode: str = "mean"):
    """Pools (..., B, T, H) token states with ``mode`` (one of ``MODES``) into (..., B, H).

    Leading axes (e.g. a layer axis) are handled by flattening them into the batch.
    """
    if mode not in _FUNCS:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {MODES}")
    lead = hidden.shape[:-3]
    if lead:
        b, t, h = hidden.shape[-3:]
        flat = hidden.reshape(-1, t, h)
        flat_mask = jnp.broadcast_to(mask, (*lead, b, t)).reshape(-1, t)
        return _FUNCS[mode](flat, flat_mask).reshape(*lead, b, h)
    return _FUNCS[mode](hidden, mask)


def pool_segments(hidden, segment_ids, positions, num_segments: int, mode: str = "mean"):
    """Pools packed token states (..., R, T, H) into one vector per segment (..., num_segments, H).

    ``segment_ids`` (R, T): 0 on padding, ``i + 1`` on the tokens of text i; ``positions``
    (R, T): each token's index within its text. Every mode gives what ``pool`` gives for
    the same text in a row of its own. The linear modes are one (num_segments, R*T) weight
    matrix times the token states (a matmul: fast, and sharding-friendly when rows are split
    over devices); ``max`` is a segment max.
    """
    if mode not in _FUNCS:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {MODES}")
    *lead, r, t, h = hidden.shape
    flat = hidden.reshape(*lead, r * t, h)
    seg = segment_ids.reshape(r * t)
    pos = positions.reshape(r * t).astype(jnp.float32)
    if mode == "max":
        ids = jnp.where(seg > 0, seg - 1, num_segments)  # padding -> a dropped extra segment
        seg_max = lambda x: jax.ops.segment_max(x, ids, num_segments + 1)[:num_segments]
        for _ in lead:
            seg_max = jax.vmap(seg_max)
        return seg_max(flat)
    member = (seg[None, :] == jnp.arange(1, num_segments + 1)[:, None]).astype(jnp.float32)  # (N, R*T)
    count = member.sum(1, keepdims=True)
    last = member * (pos[None, :] == count - 1)
    first = member * (pos[None, :] == 0)
    if mode == "mean":
        weights = member / jnp.maximum(count, 1e-9)
    elif mode == "mean_sqrt_len":
        weights = member / jnp.sqrt(jnp.maximum(count, 1e-9))
    elif mode == "cls":
        weights = first
    elif mode == "last_token":
        weights = last
    elif mode == "cls_avg":
        weights = (first + member / jnp.maximum(count, 1e-9)) / 2
    else:  # weighted_mean: weight = 1-based position within the text
        w = member * (pos[None, :] + 1)
        weights = w / jnp.maximum(w.sum(1, keepdims=True), 1e-9)
    return jnp.einsum("nt,...th->...nh", weights, flat.astype(jnp.float32)).astype(hidden.dtype)


def from_sentence_transformers(pooling_config: dict) -> str:
    """Maps a sentence-transformers ``1_Pooling/config.json`` to one of ``MODES``."""
    aliases = {"lasttoken": "last_token", "weightedmean": "weighted_mean", "mean_sqrt_len_tokens": "mean_sqrt_len"}
    mode = pooling_config.get("pooling_mode")  # sentence-transformers >= 6: a name or a list of names
    if isinstance(mode, (list, tuple)) and len(mode) == 1:
        mode = mode[0]
    if isinstance(mode, str):
        mode = aliases.get(mode, mode)
        if mode not in MODES:
            raise ValueError(f"sentence-transformers pooling_mode {mode!r} is not supported; embedjax has {MODES}")
        return mode
    if mode is not None:
        raise ValueError(f"concatenated pooling modes {mode} are not supported; embedjax pools with one mode")
    flags = {
        "pooling_mode_cls_token": "cls",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_max_tokens": "max",
        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
        "pooling_mode_weightedmean_tokens": "weighted_mean",
        "pooling_mode_lasttoken": "last_token",
    }
    on = [mode for key, mode in flags.items() if pooling_config.get(key)]
    if len(on) != 1:
        raise ValueError(
            f"sentence-transformers pooling config enables {on or 'no mode'}; embedjax supports exactly one "
            f"(concatenated pooling modes are not implemented): {pooling_config}"
        )
    return on[0]
