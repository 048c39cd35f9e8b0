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
        y = y + lora.scale * matmul(matmul(xa, p["lora_a"]).astype(x.dtype), p["lora_b"])
    if "bias" in p:
        y = y + p["bias"]
    return y.astype(x.dtype)


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
