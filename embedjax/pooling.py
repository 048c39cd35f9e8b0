"""Pooling token states (B, T, H) into one vector per text (B, H).

Every function takes the (B, T) 0/1 attention mask so that padding never leaks
into the result. Modes follow sentence-transformers' ``Pooling`` module, plus
``latent_attention`` (NV-Embed, arXiv:2405.17428), the one mode with trainable
params (``init_latent_attention``; they live in the encoder's ``params["pooler"]``), and
``first_last_avg`` (the mean of the first and last layers' token states, then mean pooling:
SimCSE's ``avg_first_last``, WhiteningBERT arXiv:2104.01767), which ``embedjax.embed`` computes
from the layer stack.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MODES = ("cls", "mean", "max", "cls_avg", "last_token", "weighted_mean", "mean_sqrt_len", "latent_attention",
         "first_last_avg")
# Modes that read two layers' token states (``embedjax.embed`` averages them, then pools by mean).
LAYER_MODES = ("first_last_avg",)
# Modes whose pooling reads trainable params (``pool(..., params=)``).
PARAMETRIC = ("latent_attention",)
# The modes with no params (sentence-transformers' Pooling modes and cls_avg).
FIXED_MODES = tuple(m for m in MODES if m not in PARAMETRIC + LAYER_MODES)


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


# --------------------------------------------------------------------------- latent attention


def init_latent_attention(key, hidden: int, num_latents: int = 512, num_heads: int = 8, mlp_dim: int | None = None,
                          *, head_dim: int | None = None, gated: bool = True) -> dict:
    """Params of NV-Embed's latent-attention pooler (arXiv:2405.17428) for ``hidden``-wide states.

    The tree (every leaf float32; paths as the sharding rules see them)::

        latents            (num_latents, hidden)        the trainable latent array (keys and values)
        norm_q, norm_kv, norm_mlp   {scale, bias} (hidden,)   LayerNorms of the queries, latents, MLP input
        q, k, v            {kernel (hidden, num_heads, head_dim)}   bias-free projections
        o                  {kernel (num_heads, head_dim, hidden)}
        mlp_in             {kernel (hidden, mlp_dim or 2 * mlp_dim), bias}
        mlp_out            {kernel (mlp_dim, hidden), bias}

    Args:
      num_latents, num_heads: the paper's r = 512 latents and 8 heads.
      mlp_dim: the MLP's inner width; default ``4 * hidden``.
      head_dim: width of one head; default ``hidden // num_heads`` (NV-Embed's released model
        uses ``head_dim = hidden``, eight times wider projections).
      gated: the MLP is GEGLU (``mlp_in`` gives ``2 * mlp_dim``: half values, half GELU gates),
        as in NV-Embed's released modeling code; False: the paper's plain GELU MLP.
        ``latent_attention`` tells the two apart by ``mlp_in``'s shape.

    Initialisation: latents standard normal (as the released model), kernels
    ``N(0, 1 / fan_in)``, LayerNorms identity, biases 0.
    """
    head_dim = head_dim or hidden // num_heads
    if head_dim < 1:
        raise ValueError(f"head_dim must be >= 1 (hidden {hidden}, num_heads {num_heads})")
    mlp_dim = int(mlp_dim or 4 * hidden)
    keys = jax.random.split(key, 7)
    dense = lambda k, n_in, *out: jax.random.normal(k, (n_in, *out), jnp.float32) / math.sqrt(n_in)  # noqa: E731
    norm = lambda: {"scale": jnp.ones((hidden,), jnp.float32), "bias": jnp.zeros((hidden,), jnp.float32)}  # noqa: E731
    mlp_in = 2 * mlp_dim if gated else mlp_dim
    return {
        "latents": jax.random.normal(keys[0], (num_latents, hidden), jnp.float32),
        "norm_q": norm(),
        "norm_kv": norm(),
        "q": {"kernel": dense(keys[1], hidden, num_heads, head_dim)},
        "k": {"kernel": dense(keys[2], hidden, num_heads, head_dim)},
        "v": {"kernel": dense(keys[3], hidden, num_heads, head_dim)},
        "o": {"kernel": dense(keys[4], num_heads * head_dim, hidden).reshape(num_heads, head_dim, hidden)},
        "norm_mlp": norm(),
        "mlp_in": {"kernel": dense(keys[5], hidden, mlp_in), "bias": jnp.zeros((mlp_in,), jnp.float32)},
        "mlp_out": {"kernel": dense(keys[6], mlp_dim, hidden), "bias": jnp.zeros((hidden,), jnp.float32)},
    }


def latent_attention_shape(params) -> dict:
    """The ``init_latent_attention`` arguments that give params of these shapes (the export's record)."""
    hidden, heads, head_dim = params["q"]["kernel"].shape
    mlp_dim = params["mlp_out"]["kernel"].shape[0]
    return {"type": "latent_attention", "hidden": int(hidden), "num_latents": int(params["latents"].shape[0]),
            "num_heads": int(heads), "head_dim": int(head_dim), "mlp_dim": int(mlp_dim),
            "gated": bool(params["mlp_in"]["kernel"].shape[1] == 2 * mlp_dim)}


def _layer_norm(x, p, eps: float = 1e-5):
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def latent_attention(params, hidden):
    """NV-Embed's latent-attention block applied token by token: (..., T, H) -> (..., T, H), float32.

    Each token state is a query of a multi-head cross-attention whose keys and values are
    the trainable latent array (r x H), then an MLP; no token sees another, so masked or
    packed tokens cannot change the others and the caller pools with a plain mask (``pool``
    averages over the pooled tokens). As NV-Embed's released modeling code (the paper,
    arXiv:2405.17428 section 3.2, describes the same blocks without the norms and residuals)::

        x = h + o(attention(q(LN_q(h)), k(LN_kv(latents)), v(LN_kv(latents))))   8 heads, scale 1/sqrt(head_dim)
        y = x + mlp_out(GEGLU(mlp_in(LN_mlp(x))))          (gated; else GELU(mlp_in(...)))

    i.e. both sub-blocks are pre-LayerNorm with a residual around each, and the embedding is
    the mean of ``y`` over the pooled tokens. The head count is the kernels' middle axis.
    """
    x = hidden.astype(jnp.float32)
    latents = _layer_norm(params["latents"].astype(jnp.float32), params["norm_kv"])
    head_dim = params["q"]["kernel"].shape[-1]
    q = jnp.einsum("...h,hnd->...nd", _layer_norm(x, params["norm_q"]), params["q"]["kernel"])
    k = jnp.einsum("rh,hnd->rnd", latents, params["k"]["kernel"])
    v = jnp.einsum("rh,hnd->rnd", latents, params["v"]["kernel"])
    scores = jnp.einsum("...nd,rnd->...nr", q, k) / math.sqrt(head_dim)
    attn = jnp.einsum("...nr,rnd->...nd", jax.nn.softmax(scores, axis=-1), v)
    x = x + jnp.einsum("...nd,ndh->...h", attn, params["o"]["kernel"])
    u = _layer_norm(x, params["norm_mlp"]) @ params["mlp_in"]["kernel"] + params["mlp_in"]["bias"]
    mlp_dim = params["mlp_out"]["kernel"].shape[0]
    if u.shape[-1] == 2 * mlp_dim:  # GEGLU: values * gelu(gates)
        u = u[..., :mlp_dim] * jax.nn.gelu(u[..., mlp_dim:], approximate=False)
    else:
        u = jax.nn.gelu(u, approximate=False)
    return x + u @ params["mlp_out"]["kernel"] + params["mlp_out"]["bias"]


def _token_transform(hidden, mode: str, params):
    """Token-wise transform before pooling (latent attention), else ``hidden`` unchanged."""
    if mode != "latent_attention":
        return hidden
    if params is None:
        raise ValueError("pooling 'latent_attention' needs its params (the encoder's params['pooler'], "
                         "pooling.init_latent_attention)")
    return latent_attention(params, hidden).astype(hidden.dtype)


_FUNCS = {
    "cls": cls,
    "mean": mean,
    "max": max_,
    "cls_avg": cls_avg,
    "last_token": last_token,
    "weighted_mean": weighted_mean,
    "mean_sqrt_len": mean_sqrt_len,
    "latent_attention": mean,  # after the token-wise latent-attention block (_token_transform)
}


def _check_mode(mode: str) -> None:
    if mode in LAYER_MODES:
        raise ValueError(f"pooling {mode!r} reads two layers' states: embedjax.embed averages them and pools by mean")
    if mode not in _FUNCS:
        raise ValueError(f"unknown pooling mode {mode!r}; choose one of {MODES}")


def pool(hidden, mask, mode: str = "mean", params=None):
    """Pools (..., B, T, H) token states with ``mode`` (one of ``MODES``) into (..., B, H).

    Leading axes (e.g. a layer axis) are handled by flattening them into the batch.
    ``params``: the pooler's params (``latent_attention``: ``init_latent_attention``'s tree;
    every leading index, e.g. every layer of a stack, goes through the same pooler).
    """
    _check_mode(mode)
    hidden = _token_transform(hidden, mode, params)
    lead = hidden.shape[:-3]
    if lead:
        b, t, h = hidden.shape[-3:]
        flat = hidden.reshape(-1, t, h)
        flat_mask = jnp.broadcast_to(mask, (*lead, b, t)).reshape(-1, t)
        return _FUNCS[mode](flat, flat_mask).reshape(*lead, b, h)
    return _FUNCS[mode](hidden, mask)


def pool_segments(hidden, segment_ids, positions, num_segments: int, mode: str = "mean", params=None,
                  pool_flags=None):
    """Pools packed token states (..., R, T, H) into one vector per segment (..., num_segments, H).

    ``segment_ids`` (R, T): 0 on padding, ``i + 1`` on the tokens of text i; ``positions``
    (R, T): each token's index within its text (not read: a text's tokens are contiguous, so
    ranks come from ``segment_ids``; kept for the callers). Every mode gives what ``pool`` gives for
    the same text in a row of its own. The linear modes are one (num_segments, R*T) weight
    matrix times the token states (a matmul: fast, and sharding-friendly when rows are split
    over devices); ``max`` is a segment max.

    ``pool_flags`` (R, T), optional: 1 on the tokens pooling reads, 0 on those it skips
    (an instruction prefix with ``include_prompt=False``), the packed form of ``pool``'s
    mask: ``cls`` / ``last_token`` take the first / last flagged token of each text and
    ``weighted_mean`` counts positions from the first flagged one, as ``pool`` does.
    ``params``: as ``pool``'s (the latent-attention block is token-wise, so packed texts
    pool as padded ones do).
    """
    _check_mode(mode)
    hidden = _token_transform(hidden, mode, params)
    *lead, r, t, h = hidden.shape
    flat = hidden.reshape(*lead, r * t, h)
    seg = segment_ids.reshape(r * t)
    flag = jnp.ones((r * t,), bool) if pool_flags is None else pool_flags.reshape(r * t) > 0
    if mode == "max":
        ids = jnp.where((seg > 0) & flag, seg - 1, num_segments)  # padding -> a dropped extra segment
        seg_max = lambda x: jax.ops.segment_max(x, ids, num_segments + 1)[:num_segments]
        for _ in lead:
            seg_max = jax.vmap(seg_max)
        return seg_max(flat)
    member = ((seg[None, :] == jnp.arange(1, num_segments + 1)[:, None]) & flag[None, :]).astype(jnp.float32)
    count = member.sum(1, keepdims=True)  # (N, 1) pooled tokens per text
    rank = jnp.cumsum(member, axis=1) * member  # 1-based index among the text's pooled tokens (a text is contiguous)
    last = member * (rank == count)
    first = member * (rank == 1)
    if mode in ("mean", "latent_attention"):
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
        w = rank
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
