"""Transformer building blocks as pure functions over plain dict params.

Conventions: dense kernels are stored (in_features, out_features), i.e. the
transpose of PyTorch's ``nn.Linear.weight``; layer norms are ``{'scale', 'bias'}``.
Layer norm and softmax always run in float32, whatever the compute dtype.

Mixed precision (compute dtype bfloat16, params float32): every matmul takes bf16 operands
and accumulates in float32 -- in the forward pass *and* in the backward pass. JAX's own
transpose of ``dot(x_bf16, w_bf16, preferred_element_type=float32)`` would feed the float32
output cotangent straight into the two backward dots, i.e. mixed f32 x bf16 operands, which
XLA runs as float32 matmuls (no AMX / AVX512-BF16 on CPU, no bf16 tensor cores on GPU): the
backward, two thirds of a training step's matmul work, would never see the fast path. So the
products go through ``mixed_einsum``, whose custom VJP casts the cotangent to the compute dtype
first. In float32 the plain ``jnp.dot`` / ``jnp.einsum`` run, unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str):
    """Returns the activation function named as in Hugging Face configs."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(_ACTIVATIONS)}") from None


def _is_low_precision(dtype) -> bool:
    """bf16 / f16 compute: the products take the mixed-precision path (``mixed_einsum``)."""
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def _transposed_specs(spec: str) -> tuple[str, str]:
    """For a two-operand einsum ``"A,B->C"``: the specs of d/dA (``"C,B->A"``) and d/dB (``"A,C->B"``).

    Valid when no operand has an index that appears nowhere else (an index summed within one
    operand would need broadcasting in the transpose) and no index repeats within an operand.
    """
    ins, out = spec.replace(" ", "").split("->")
    a, b = ins.split(",")
    for s, other in ((a, b), (b, a)):
        if len(set(s)) != len(s) or not set(s) <= set(other) | set(out) or "." in s:
            raise ValueError(f"mixed_einsum does not support the einsum spec {spec!r}")
    return f"{out},{b}->{a}", f"{a},{out}->{b}"


def _smallest_split(n: int) -> int:
    """The smallest factor f of n with 1 < f < n (0 if n is prime or < 4)."""
    return next((f for f in range(2, int(n**0.5) + 1) if n % f == 0), 0)


def _relayout(x, spec: str, order: str):
    """``x`` (axes named by ``spec``) transposed to the axis order ``order``, as a real row-major copy.

    XLA:CPU runs a bf16 x bf16 -> f32 dot on its fast kernels only when both operands are
    row-major in the canonical (batch, rows, contracted) x (batch, contracted, cols) layout;
    otherwise it silently upcasts both operands to float32 (2D), or fails to run it at all
    (batched: "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32", XLA in
    jax 0.10). A plain transpose does not help: XLA folds it into the dot's dimension numbers
    or turns it into a layout change. Splitting one moved axis in two around the transpose
    makes the result a fresh row-major array. Returns None when the axes must move but none
    of them can be split (prime or tiny sizes).
    """
    perm = [spec.index(c) for c in order]
    if perm == sorted(perm):
        return x
    moved = [i for pos, i in enumerate(perm) if i != pos]
    for axis in moved:  # split an axis that moves: a split of one that stays could be folded again
        f = _smallest_split(x.shape[axis])
        if f:
            break
    else:
        return None
    split = (*x.shape[:axis], x.shape[axis] // f, f, *x.shape[axis + 1:])
    expand = lambda i: [i] if i < axis else [i, i + 1] if i == axis else [i + 1]
    y = jnp.transpose(x.reshape(split), [j for i in perm for j in expand(i)])
    return y.reshape([x.shape[i] for i in perm])


def _backward_einsum(spec: str, a, b):
    """``einsum(spec, a, b)`` with bf16 operands and float32 accumulation, laid out as one
    canonical ``dot_general`` that XLA:CPU runs in bf16 (see ``_relayout``). The left operand
    is the one whose contracted axes are already minor-most, if either is, so that the big
    activation-sized operand rarely needs a copy. GPUs run any layout natively; there the
    copies are merely cheap memory traffic."""
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    contract = [c for c in sa if c in sb and c not in out]
    minor = lambda s: set(s[len(s) - len(contract):]) == set(contract)
    if contract and not minor(sa) and minor(sb):
        (sa, a), (sb, b) = (sb, b), (sa, a)
    if contract and minor(sa):
        contract = list(sa[len(sa) - len(contract):])
    batch = [c for c in sa if c in sb and c in out]
    free_a = [c for c in sa if c not in sb]
    free_b = [c for c in sb if c not in sa]
    lhs = _relayout(a, sa, "".join(batch + free_a + contract))
    rhs = _relayout(b, sb, "".join(batch + contract + free_b))
    if lhs is None or rhs is None:  # nothing to split (tiny/prime sizes): float32, slower but correct
        return jnp.einsum(f"{sa},{sb}->{out}", a.astype(jnp.float32), b.astype(jnp.float32))
    nb, nf, nc = len(batch), len(free_a), len(contract)
    dims = ((tuple(range(nb + nf, nb + nf + nc)), tuple(range(nb, nb + nc))), (tuple(range(nb)), tuple(range(nb))))
    y = jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)
    y_axes = batch + free_a + free_b
    return jnp.transpose(y, [y_axes.index(c) for c in out])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, a, b):
    """``einsum(spec, a, b)`` in ``a``'s (low-precision) dtype, accumulated and returned in float32.

    ``b`` is cast to ``a.dtype`` inside (so a float32 kernel is cast here and its gradient comes
    back float32, summed in float32, never rounded to bf16). The backward pass casts the
    float32 output cotangent to ``a.dtype`` and computes both operand gradients as
    bf16 x bf16 -> float32 products (the fast kernels; see the module docstring), returned in
    the primal dtypes. Cotangents are thus rounded to bf16 once before each backward matmul,
    as in PyTorch autocast / standard mixed-precision training.
    """
    return jnp.einsum(spec, a, b.astype(a.dtype), preferred_element_type=jnp.float32)


def _mixed_einsum_fwd(spec, a, b):
    return mixed_einsum(spec, a, b), (a, b)


def _mixed_einsum_bwd(spec, res, g):
    a, b = res
    spec_a, spec_b = _transposed_specs(spec)
    g = g.astype(a.dtype)
    da = _backward_einsum(spec_a, g, b.astype(a.dtype))
    db = _backward_einsum(spec_b, a, g)
    return da.astype(a.dtype), db.astype(b.dtype)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def _einsum_f32_acc(spec, a, b):
    """The float32-compute products: plain einsum (JAX's own VJP), float32 accumulation."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def dense(p, x, lora=None, key=None):
    """x @ kernel (+ bias when ``p`` has one) (+ a LoRA update when ``p`` has adapters), in the
    dtype of x; the products accumulate in float32.

    Asking for a float32 result also selects the fast bf16 kernels on CPUs with AMX
    (a bf16-out matmul takes a ~6x slower path there) and is what TPUs/GPUs do anyway.
    In bf16 the product is ``mixed_einsum`` so that the backward matmuls are bf16 too
    (the kernel stays float32 outside, its gradient comes back float32).

    LoRA (``embedjax.lora``): when ``p`` also holds ``lora_a`` (in, r) and ``lora_b`` (r, out),
    the result adds ``lora.scale * dropout(x) @ lora_a @ lora_b`` -- computed unmerged, so no
    (in, out) gradient is ever formed for the frozen kernel. ``lora`` is the config's
    ``LoraSpec`` (its ``scale`` and ``dropout``); ``key`` drives the adapter dropout.
    """
    low = _is_low_precision(x.dtype)

    def matmul(a, w):
        if low:
            return mixed_einsum("mi,io->mo", a.reshape(-1, a.shape[-1]), w).reshape(*a.shape[:-1], w.shape[-1])
        return jnp.dot(a, w.astype(a.dtype), preferred_element_type=jnp.float32)

    y = matmul(x, p["kernel"])
    if "lora_a" in p:
        if lora is None:
            raise ValueError("these params carry LoRA adapters (lora_a/lora_b) but the config has no LoRA spec "
                             "(cfg.lora): set it with embedjax.lora.attach, or merge the adapters first")
        xa = dropout(x, lora.dropout, key)
        # Both adapter products go through mixed_einsum in every dtype: its backward lays the
        # operands out for the CPU's fast kernels itself. JAX's own float32 transpose makes XLA
        # transpose the (tokens, out) cotangent for the rank-r dB product: ~1.6x slower steps.
        low_rank = lambda a, w: mixed_einsum("mi,io->mo", a.reshape(-1, a.shape[-1]), w).reshape(  # noqa: E731
            *a.shape[:-1], w.shape[-1])
        y = y + lora.scale * low_rank(low_rank(xa, p["lora_a"]).astype(x.dtype), p["lora_b"])
    if "bias" in p:
        y = y + p["bias"]
    return y.astype(x.dtype)


@jax.custom_vjp
def tied_logits(x, word_embeddings):
    """Vocabulary logits ``x @ word_embeddings.T``: (..., H), (V, H) -> (..., V), for heads tied to the
    word embeddings (an MLM head, a decoder's LM head).

    The value and gradients are the plain matmul's; the custom backward only writes the word
    matrix's gradient as one ordinary GEMM, ``(x_flat.T @ d_flat).T`` with the tokens contracted.
    XLA's own transpose of the forward contracts the tokens as the leading axes of the (..., V)
    cotangent, which on CPU runs 1.8x slower for a SPLADE head (``benchmarks/splade_head.py``)."""
    return jnp.einsum("...h,vh->...v", x, word_embeddings)


def _tied_logits_fwd(x, word_embeddings):
    return tied_logits(x, word_embeddings), (x, word_embeddings)


def _tied_logits_bwd(res, d):
    x, word_embeddings = res
    dx = jnp.einsum("...v,vh->...h", d, word_embeddings).astype(x.dtype)
    flat_x, flat_d = x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])
    d_words = (flat_x.T @ flat_d).T.astype(word_embeddings.dtype)
    return dx, d_words


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


def layer_norm(p, x, eps: float):
    """Layer norm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * p["scale"] + p["bias"]).astype(x.dtype)


def dropout(x, rate: float, key):
    """Inverted dropout; the identity when ``key`` is None or rate is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention_bias(attention_mask, dtype=jnp.float32):
    """(B, T) 0/1 mask -> (B, 1, 1, T) additive bias: 0 where attended, very negative elsewhere."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(dtype).min).astype(dtype)


def segment_attention_bias(segment_ids, dtype=jnp.float32):
    """(B, T) segment ids (0 = padding) -> (B, 1, T, T) additive bias for packed sequences:
    a token attends only to the real tokens of its own segment (its own text)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = same & (segment_ids[:, None, :] > 0)
    return jnp.where(allowed[:, None], 0.0, jnp.finfo(dtype).min).astype(dtype)


def self_attention(p, x, bias, *, num_heads: int, dropout_rate: float = 0.0, dropout_key=None, lora=None,
                   lora_keys=(None, None, None)):
    """Bidirectional multi-head self-attention (no output projection).

    x: (B, T, H); bias: (B, 1, 1, T) or (B, 1, T, T) additive. Scores and softmax run in float32.
    ``lora`` / ``lora_keys``: the LoRA spec and the adapter-dropout keys of query, key, value (see ``dense``).
    """
    b, t, h = x.shape
    head_dim = h // num_heads

    def heads(name, key):
        return dense(p[name], x, lora, key).reshape(b, t, num_heads, head_dim)

    q, k, v = (heads(name, key) for name, key in zip(("query", "key", "value"), lora_keys))
    # In bf16 both products go through mixed_einsum: the softmax backward gives a float32
    # cotangent, and JAX's plain transpose would run the four backward products as f32 x bf16.
    einsum = mixed_einsum if _is_low_precision(x.dtype) else _einsum_f32_acc
    scores = einsum("bqnd,bknd->bnqk", q, k)
    scores = scores / jnp.sqrt(jnp.float32(head_dim)) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    probs = dropout(probs, dropout_rate, dropout_key)
    ctx = einsum("bnqk,bknd->bqnd", probs, v)
    return ctx.astype(x.dtype).reshape(b, t, h)


# --------------------------------------------------------------------------- decoder-LLM pieces


def rms_norm(p, x, eps: float, *, plus_one: bool = False):
    """RMS norm over the last axis (Zhang & Sennrich, arXiv:1910.07467), computed in float32,
    returned in x's dtype. ``plus_one``: the weight is stored as an offset from 1 and the
    norm multiplies by ``1 + scale`` (Gemma's convention)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    scale = p["scale"].astype(jnp.float32)
    return (y * (1.0 + scale if plus_one else scale)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling=None, max_position_embeddings: int | None = None):
    """Rotary-embedding inverse frequencies (Su et al., arXiv:2104.09864) and the attention
    factor that scales cos / sin, for a Hugging Face ``rope_type``.

    ``scaling`` is a mapping with ``rope_type`` (``default``, ``linear``, ``dynamic``, ``llama3``
    or ``yarn``) and that type's parameters (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``attention_factor``,
    ``mscale``, ``mscale_all_dim``, ``truncate``), as in a ``config.json``'s ``rope_parameters``.
    ``dynamic`` equals ``default`` up to ``max_position_embeddings`` (the longest input allowed).
    Returns ``(inv_freq (head_dim // 2,) float32 numpy, attention_factor float)``.
    """
    import math

    import numpy as np

    scaling = dict(scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    dim = int(head_dim * scaling.get("partial_rotary_factor", 1.0))
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(theta), exponents)).astype(np.float32)
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    factor = float(scaling["factor"]) if scaling.get("factor") is not None else None
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
    old_context = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if kind == "yarn":
        if factor is None:
            factor = max_position_embeddings / old_context

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return dim * math.log(old_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = np.power(np.float32(theta), exponents)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv.astype(np.float32), float(attention_factor)
    raise ValueError(f"unsupported rope_type {kind!r}; supported: default, linear, dynamic, llama3, yarn")


def rope_cos_sin(positions, inv_freq, attention_factor: float = 1.0):
    """(B, T) integer positions -> cos, sin (B, T, D) float32 for ``rotate`` (the two halves of
    the head repeat the D / 2 frequencies, Hugging Face's ``rotate_half`` layout)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def rotate(x, cos, sin):
    """Applies rotary embeddings to x (B, T, N, D) given ``rope_cos_sin``'s (B, T, D); float32
    inside, x's dtype out. Rotates the first / second half of each head as pairs
    (``x * cos + rotate_half(x) * sin``, the Hugging Face convention)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def apply_rope(x, positions, inv_freq, attention_factor: float = 1.0):
    """Rotary embeddings on x (B, T, N, D) at (B, T) ``positions`` (see ``rope_cos_sin``, ``rotate``)."""
    return rotate(x, *rope_cos_sin(positions, inv_freq, attention_factor))


def attention(q, k, v, *, lengths=None, segment_ids=None, causal: bool = False, window=None,
              softcap: float | None = None, scale: float | None = None, dropout_rate: float = 0.0,
              dropout_key=None):
    """Multi-head self-attention over already projected heads, with grouped K / V heads (GQA).

    q: (B, T, N, D); k, v: (B, T, K, D) with N a multiple of K. Returns (B, T, N, D) in q's dtype.

    Which keys a query sees (all combined):
      lengths: (B,) number of real tokens per row (right padding): keys at or past it are masked.
      segment_ids: (B, T) packed rows (0 = padding): a query sees only keys of its own segment.
      causal: a query sees only keys at or before it.
      window: ``(left, right)``: a query at i sees keys in ``[i - left, i + right]``.
    softcap: ``c * tanh(scores / c)`` on the scaled scores before masking (Gemma 2).
    scale: multiplies the scores (default ``D ** -0.5``).

    The plain cases go through ``jax.nn.dot_product_attention`` (no additive (B, 1, T, T) bias is
    built here: padding, causality and windows are its ``key_value_seq_lengths``, ``is_causal`` and
    ``local_window_size``; only packed rows pass a boolean segment mask). Soft-capping and
    attention dropout, which it cannot do, take an explicit einsum path; scores and softmax run in
    float32 either way.
    """
    b, t, n, d = q.shape
    kv = k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    seg_mask = None
    if segment_ids is not None:
        seg_mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
        seg_mask = seg_mask[:, None]  # (B, 1, T, T)
    if lengths is not None:
        lengths = lengths.astype(jnp.int32)
    use_dropout = dropout_key is not None and dropout_rate > 0.0
    if softcap is None and not use_dropout:
        return jax.nn.dot_product_attention(
            q, k, v, mask=seg_mask, scale=scale, is_causal=causal, key_value_seq_lengths=lengths,
            local_window_size=None if window is None else tuple(int(w) for w in window),
        ).astype(q.dtype)

    g = n // kv
    einsum = mixed_einsum if _is_low_precision(q.dtype) else _einsum_f32_acc
    qg = q.reshape(b, t, kv, g, d)
    scores = einsum("btkgd,bskd->bkgts", qg, k) * jnp.float32(scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    qi = jnp.arange(t)[:, None]
    ki = jnp.arange(t)[None, :]
    allowed = jnp.ones((1, 1, t, t), bool)  # (B, 1, T, S) after broadcasting
    if lengths is not None:
        allowed = allowed & (ki < lengths[:, None, None])[:, None]
    if seg_mask is not None:
        allowed = allowed & seg_mask
    if causal:
        allowed = allowed & (ki <= qi)
    if window is not None:
        allowed = allowed & (ki >= qi - window[0]) & (ki <= qi + window[1])
    big_negative = jnp.float32(-0.7 * jnp.finfo(jnp.float32).max)
    scores = jnp.where(allowed[:, :, None], scores, big_negative)  # (B, 1, 1, T, S) over (B, K, G, T, S)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    probs = dropout(probs, dropout_rate, dropout_key)
    ctx = einsum("bkgts,bskd->btkgd", probs, v)
    return ctx.astype(q.dtype).reshape(b, t, n, d)


def first_layers(stack, total: int, num_layers: int | None):
    """``(the first k layers of a stacked layer tree, k)``: the layers above k are sliced away
    before the scan, so they are never computed. ``num_layers`` None = all ``total``. ``stack`` may
    also be a tuple of per-layer trees (``unstacked``): then its first k entries."""
    k = total if num_layers is None else int(num_layers)
    if not 1 <= k <= total:
        raise ValueError(f"num_layers must be in 1..{total}, got {num_layers}")
    if isinstance(stack, (tuple, list)):
        if len(stack) != total:
            raise ValueError(f"{len(stack)} unstacked layers for a {total}-layer config")
        return tuple(stack[:k]), k
    return (stack if k == total else jax.tree.map(lambda w: w[:k], stack)), k


def unstacked(stack, total: int) -> tuple:
    """A stacked layer tree (leaves ``(total, ...)``) as a tuple of ``total`` per-layer trees.

    Inside a compiled program, ``lax.scan`` over stacked weights slices every layer's weights out
    of the stack, and XLA:CPU copies each slice on every call (36 weight copies per MiniLM-L6 call,
    ~15% of a 64-sentence encode batch). A tuple of per-layer arrays passed as arguments needs no
    slicing. Outside jit this slicing copies the weights once (``Encoder`` makes zero-copy views
    on CPU instead: ``embedjax.model``)."""
    return tuple(jax.tree.map(lambda w: w[i], stack) for i in range(total))


def scan_layers(body, carry, stack, keys=None, *, unroll: bool | int = True, remat: bool | str = False):
    """``lax.scan(body, carry, (stack, keys), unroll=unroll)`` with ``remat``: the layer loop of a
    backbone. A tuple ``stack`` (``unstacked`` layers) runs as a Python loop over its entries
    instead: the same program as a fully unrolled scan, without slicing the weights; per-layer
    outputs (``body``'s second result, when not None) are stacked as ``scan`` stacks them."""
    body = rematerialized(body, remat)
    if not isinstance(stack, (tuple, list)):
        return jax.lax.scan(body, carry, (stack, keys), unroll=unroll)
    outs = []
    for i, p in enumerate(stack):
        carry, out = body(carry, (p, None if keys is None else keys[i]))
        outs.append(out)
    if not outs or outs[0] is None:
        return carry, None
    return carry, jax.tree.map(lambda *ys: jnp.stack(ys), *outs)


def rematerialized(body, remat: bool | str):
    """``body`` under ``jax.checkpoint`` when ``remat`` asks: True saves nothing (recomputes the
    layer in the backward pass), a ``jax.checkpoint_policies`` name (e.g.
    ``"dots_with_no_batch_dims_saveable"``) saves what it names; False returns ``body``."""
    if not remat:
        return body
    policy = None
    if remat is not True:
        policy = getattr(jax.checkpoint_policies, str(remat), None)
        if policy is None:
            raise ValueError(f"remat must be True or a jax.checkpoint_policies name, got {remat!r}")
    return jax.checkpoint(body, policy=policy)
