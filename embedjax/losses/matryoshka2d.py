"""2D Matryoshka: losses over layers x dims, from ONE encoder forward pass.

Every function here wraps an inner loss ``loss_fn(emb, ..., **kw)`` (any loss of this package,
or a ``matryoshka(...)`` of one) and returns ``loss(*args, key=None, **kwargs)`` whose
embedding arguments are LAYER STACKS: the pooled embedding of every layer, shape
``(L, B, D)`` (hard negatives ``(L, B, k, D)``); every other argument (labels, ids, options)
is passed through unchanged. Embedding arguments are found by ``matryoshka.is_embedding``
(floating, ndim >= 2, last axis = D of the first argument) and must all have L layers.

Layer numbering. ``stack[-1]`` is the last layer, the teacher. ``stack[p]`` has depth
``p + 1`` (number of transformer layers applied), or depth ``p`` when
``embedding_layer=True`` says ``stack[0]`` is the embedding-layer output (HF
``hidden_states[0]``), which then takes part as a student where the variant allows it.

KL terms. ``kl_divergence(teacher, student, t)`` is KL(softmax(T/t) || softmax(S/t)) with the
softmax over the FEATURE axis of each embedding (as angle-emb and sentence-transformers do,
``dim=-1`` on pooled embeddings), averaged over all embedding rows of the call (both texts
of a pair, negatives too: torch's ``batchmean`` over the concatenated batch). The variants:

* ``matryoshka_2d``: 2DMSE v1 (angle-emb 0.3.x), one sampled layer and one sampled dim.
* ``adaptive_layer``: sentence-transformers' AdaptiveLayerLoss with layer weightings;
  ``adaptive_layer(matryoshka(loss, dims), ...)`` is its Matryoshka2dLoss with
  ``n_dims_per_step=-1`` (see ``adaptive_layer`` for the differences; tests/test_losses_vs_st.py
  checks values and encoder gradients against sentence-transformers).
* ``espresso``: ESE (angle-emb >= 0.4), every layer every step, with PCA-style distillation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from embedjax import similarity as sim
from embedjax.losses.matryoshka import is_embedding, map_embeddings

LAYER_WEIGHTINGS = ("inverse", "uniform", "log", "linear")


# ---------------------------------------------------------------- shared pieces


def prefix_dims(size):
    """2DMSE's candidate dims: 8, 16, 32, ... strictly below ``size``."""
    dims = []
    d = 8
    while d < size:
        dims.append(d)
        d *= 2
    if not dims:
        raise ValueError(f"embedding size {size} leaves no 2DMSE dim (need > 8)")
    return tuple(dims)


def layer_depths(n_stack, embedding_layer=False):
    """Depth of each stack entry (see the module docstring)."""
    return tuple(p + (0 if embedding_layer else 1) for p in range(n_stack))


def layer_weights(depths, scheme="inverse", n_layers=None):
    """Weight of a student at each depth d (a tuple of Python floats).

    inverse: 1 / (1 + d)          (sentence-transformers AdaptiveLayerLoss)
    uniform: 1
    log:     1 / (1 + ln(1 + d))  (ESE)
    linear:  (N - d) / N          (N = ``n_layers``, the teacher's depth; 1 at depth 0)

    All but ``uniform`` give shallower (weaker) students at least the weight of deeper ones.
    """
    if scheme == "inverse":
        return tuple(1.0 / (1.0 + d) for d in depths)
    if scheme == "uniform":
        return tuple(1.0 for _ in depths)
    if scheme == "log":
        return tuple(1.0 / (1.0 + math.log(1.0 + d)) for d in depths)
    if scheme == "linear":
        if n_layers is None:
            raise ValueError("linear weighting needs n_layers")
        return tuple((n_layers - d) / n_layers for d in depths)
    raise ValueError(f"layer_weighting must be one of {LAYER_WEIGHTINGS}, got {scheme!r}")


def kl_divergence(teacher, student, temperature=1.0):
    """Mean over rows of KL(softmax(T/t) || softmax(S/t)), softmax over the last axis."""
    lt = jax.nn.log_softmax(teacher / temperature, axis=-1)
    ls = jax.nn.log_softmax(student / temperature, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1))


def _stacks(args, kwargs):
    """(size, number of layers) of the call, checking every embedding argument is a stack."""
    size, n_stack = args[0].shape[-1], args[0].shape[0]
    for x in list(args) + list(kwargs.values()):
        if is_embedding(x, size) and (x.ndim < 3 or x.shape[0] != n_stack):
            raise ValueError(
                f"embedding argument of shape {x.shape} is not a ({n_stack}, ..., {size}) layer stack"
            )
    return size, n_stack


def _rows(args, kwargs, size):
    """All embedding rows of a (per-layer) call, concatenated: (R, D)."""
    found = [x for x in list(args) + list(kwargs.values()) if is_embedding(x, size)]
    return jnp.concatenate([x.reshape(-1, size) for x in found], axis=0)


def _layer(args, kwargs, size, index):
    """The call's arguments with every layer stack replaced by layer ``index`` (may be traced)."""
    return map_embeddings(lambda x: x[index], args, kwargs, size)


def _slice(args, kwargs, size, d):
    return map_embeddings(lambda x: x[..., :d], args, kwargs, size)


def _promote(args, kwargs, size):
    return map_embeddings(sim.as_float32, args, kwargs, size)


# ---------------------------------------------------------------- 2DMSE v1


def sample_2dmse(key, n_stack, size, *, embedding_layer=False):
    """The 2DMSE v1 draw: ``(stack_index, depth, dim_index)`` as int32 scalars.

    depth l ~ Uniform{1, ..., N-1} over the transformer layers below the last (N = number of
    transformer layers; the embedding output is never drawn), ``stack_index`` its position in
    the stack, ``dim_index`` ~ Uniform over ``prefix_dims(size)``. Deterministic given key.
    """
    n_layers = n_stack - (1 if embedding_layer else 0)
    if n_layers < 2:
        raise ValueError("2DMSE needs at least 2 transformer layers")
    k_layer, k_dim = jax.random.split(key)
    depth = jax.random.randint(k_layer, (), 1, n_layers, dtype=jnp.int32)
    index = depth - 1 + (1 if embedding_layer else 0)
    dim_index = jax.random.randint(k_dim, (), 0, len(prefix_dims(size)), dtype=jnp.int32)
    return index, depth, dim_index


def matryoshka_2d(loss_fn, *, kl_temperature=1.0, detach_teacher=False, embedding_layer=False):
    """2DMSE v1 (angle-emb 0.3.x) as in docs/losses.md, "2DMSE v1".

    With T = last layer, S = the sampled layer at depth l, d the sampled dim
    (``sample_2dmse``):

        loss = L(T) + L(S)/l + t * KL(softmax(T/t) || softmax(S/t))
               + L(T[..., :d]) + L(S[..., :d])/l

    ``kl_temperature`` t = 1.0 and the KL multiplied by t (angle-emb; with t = 1 the same as
    Hinton's t^2). The teacher is NOT detached by default (as angle-emb); set
    ``detach_teacher=True`` to stop the KL gradient into T. Only the drawn dim's two losses are
    evaluated (``lax.switch``). The returned ``loss(*args, key, **kwargs)`` needs a key.
    """

    def loss(*args, key=None, **kwargs):
        if key is None:
            raise ValueError("matryoshka_2d samples a layer and a dim: pass key=")
        size, n_stack = _stacks(args, kwargs)
        args, kwargs = _promote(args, kwargs, size)
        index, depth, dim_index = sample_2dmse(key, n_stack, size, embedding_layer=embedding_layer)
        inv_l = 1.0 / depth.astype(args[0].dtype)
        t_args, t_kw = _layer(args, kwargs, size, -1)
        s_args, s_kw = _layer(args, kwargs, size, index)

        total = loss_fn(*t_args, **t_kw) + loss_fn(*s_args, **s_kw) * inv_l
        teacher = _rows(t_args, t_kw, size)
        if detach_teacher:
            teacher = jax.lax.stop_gradient(teacher)
        total = total + kl_temperature * kl_divergence(teacher, _rows(s_args, s_kw, size), kl_temperature)

        def slimmed(d):
            def branch():
                ta, tk = _slice(t_args, t_kw, size, d)
                sa, sk = _slice(s_args, s_kw, size, d)
                return loss_fn(*ta, **tk) + loss_fn(*sa, **sk) * inv_l

            return branch

        return total + jax.lax.switch(dim_index, [slimmed(d) for d in prefix_dims(size)])

    return loss


# ---------------------------------------------------------------- adaptive layers


def sample_layers(key, n_candidates, n):
    """Stack indices of ``n`` students drawn uniformly without replacement from the first
    ``n_candidates`` entries (``adaptive_layer``'s draw). Deterministic given key."""
    return jax.random.choice(key, n_candidates, (n,), replace=False)


def adaptive_layer(
    loss_fn,
    *,
    n_layers_per_step=1,
    layer_weighting="inverse",
    last_layer_weight=1.0,
    prior_layers_weight=1.0,
    kl_div_weight=1.0,
    kl_temperature=0.3,
    detach_teacher=True,
    embedding_layer=False,
):
    """sentence-transformers-style AdaptiveLayerLoss over a layer stack.

        loss = last_layer_weight * L(T)
               + sum_{p in S} [ prior_layers_weight * w(depth_p) / |S| * L(stack[p])
                                + kl_div_weight * t * KL(softmax(T/t) || softmax(stack[p]/t)) ]

    S = ``n_layers_per_step`` stack entries drawn by ``sample_layers`` (uniform, without
    replacement, with the ``key`` of the returned function) from all entries below the last
    (the embedding output included when ``embedding_layer=True``, as in sentence-transformers);
    ``None``, a number < 1 (sentence-transformers' -1; its 0 too) or a number >= the candidates
    uses all of them, and needs no key. ``w`` = ``layer_weights(..., layer_weighting)``.
    ``kl_temperature`` 0.3 (sentence-transformers' default; 0 disables the KL term); the KL term
    is not divided by |S|, as in sentence-transformers. ``detach_teacher=True`` (default, as
    sentence-transformers) stops the KL gradient into T. Wrap ``loss_fn`` in ``matryoshka(...)``
    to get Matryoshka2dLoss.

    Differences from sentence-transformers (AdaptiveLayerLoss / Matryoshka2dLoss 6.x); with
    the settings below the value and gradient are the same (tests/test_losses_vs_st.py):

    * Students. Theirs are ``hidden_states[0 .. N-1]``, the embedding-layer output included
      (their layer index 0). Ours include it only with ``embedding_layer=True`` (then stack
      index = their layer index). The training objective passes stacks without it by default
      (``embedding_layer=False``): that is sentence-transformers with the embedding output
      removed from the candidate students, nothing else.
    * Weighting names. Our "inverse" 1/(1+d) is THEIR "linear"; our "linear" is (N-d)/N (theirs
      as the callable ``lambda i: (N - i) / N``); "uniform" and "log" are the same. Our default
      is "inverse" (sentence-transformers < 6's only weighting); theirs is now "uniform".
      Callable weightings are not accepted.
    * Sampling. Layers are drawn with ``jax.random`` from ``key`` (theirs: Python's
      ``random.sample``); the same draw gives the same loss.
    * Matryoshka2dLoss samples ``n_dims_per_step=1`` dim by default, drawn anew for every
      layer's loss. ``adaptive_layer`` does not pass its key to ``loss_fn``, so the inner
      ``matryoshka`` uses every dim at every layer: their ``n_dims_per_step=-1``.
    * The KL term sees the embeddings as passed. Theirs are the model's outputs, i.e. after a
      Normalize module when the checkpoint has one (all-MiniLM-L6-v2 does): pass unit vectors
      to match. (The cosine task losses do not care; the KL term does.)
    """

    def loss(*args, key=None, **kwargs):
        size, n_stack = _stacks(args, kwargs)
        args, kwargs = _promote(args, kwargs, size)
        n_cand = n_stack - 1
        if n_cand < 1:
            raise ValueError("adaptive_layer needs at least 2 stack entries")
        depths = layer_depths(n_stack, embedding_layer)
        n_layers = depths[-1]
        table = jnp.asarray(layer_weights(depths[:-1], layer_weighting, n_layers), args[0].dtype)
        if n_layers_per_step is None or n_layers_per_step < 1 or n_layers_per_step >= n_cand:
            picks = list(range(n_cand))
        else:
            if key is None:
                raise ValueError("adaptive_layer samples layers: pass key=")
            chosen = sample_layers(key, n_cand, n_layers_per_step)
            picks = [chosen[s] for s in range(n_layers_per_step)]

        t_args, t_kw = _layer(args, kwargs, size, -1)
        total = last_layer_weight * loss_fn(*t_args, **t_kw)
        teacher = _rows(t_args, t_kw, size)
        if detach_teacher:
            teacher = jax.lax.stop_gradient(teacher)
        for p in picks:
            s_args, s_kw = _layer(args, kwargs, size, p)
            total = total + loss_fn(*s_args, **s_kw) * table[p] / len(picks) * prior_layers_weight
            if kl_temperature > 0:
                kl = kl_divergence(teacher, _rows(s_args, s_kw, size), kl_temperature)
                total = total + kl * kl_temperature * kl_div_weight
        return total

    return loss


# ---------------------------------------------------------------- ESE (Espresso)


def pca_target(m, k):
    """angle-emb's PCA-style compression target of the rows ``m`` (R, D) -> (R, k).

    A = softmax(m^T m / sqrt(D)) (row softmax of the D x D feature affinity);
    U_k, s_k = top-k singular vectors/values of A; target = m @ U_k diag(s_k).
    Made deterministic: an exact SVD (angle-emb uses the randomised ``torch.svd_lowrank``)
    and each singular vector's sign fixed so its largest-magnitude entry is positive (SVD
    signs are arbitrary, which would flip the regression target between steps). Carries no
    gradient (angle-emb computes it under ``no_grad``).
    """
    m = jax.lax.stop_gradient(m)
    a = jax.nn.softmax(m.T @ m / math.sqrt(m.shape[-1]), axis=-1)
    u, s, _ = jnp.linalg.svd(a, full_matrices=False)
    u, s = u[:, :k], s[:k]
    pivot = jnp.argmax(jnp.abs(u), axis=0)
    u = u * jnp.sign(u[pivot, jnp.arange(k)])[None, :]
    return m @ (u * s[None, :])


def distillation(slim, target, *, mse_weight=1.0, kl_temperature=1.0):
    """angle-emb's ESE distillation: mse_weight * MSE + t * KL(softmax(target/t) || softmax(slim/t))."""
    loss = mse_weight * jnp.mean((slim - target) ** 2)
    if kl_temperature > 0:
        loss = loss + kl_temperature * kl_divergence(target, slim, kl_temperature)
    return loss


def espresso(
    loss_fn,
    *,
    compression_size=128,
    kl_temperature=1.0,
    mse_weight=1.0,
    apply_pca=True,
    embedding_layer=False,
):
    """ESE / Espresso (angle-emb >= 0.4): every layer, every step; no sampling, no key.

    With k = ``compression_size``, T = last layer, and for every stack entry p below the last
    a student S_p with weight w_p = 1 / (1 + ln(1 + depth_p)):

        loss = L(T) + L(T[..., :k]) + D(T)
               + (1 / n_students) * sum_p w_p * ( L(S_p[..., :k]) + D(S_p) )

    D(X) = ``distillation(X[:, :k], pca_target(X, k))`` over all embedding rows of the call
    (both texts jointly, as angle-emb's interleaved batch), dropped if ``apply_pca=False``.
    Students get only the first-k-dims task loss, as in angle-emb. Deviations, all on
    purpose: every layer below the last is a student (angle-emb's ``range(n_layers - 1)``
    over ``hidden_states`` skips the second-to-last layer), and ``pca_target`` is
    deterministic (exact SVD, fixed signs). ``embedding_layer=True`` makes ``stack[0]`` (the
    embedding output) a student at depth 0, as in angle-emb.
    """

    def compress_terms(l_args, l_kw, size):
        k_args, k_kw = _slice(l_args, l_kw, size, compression_size)
        out = loss_fn(*k_args, **k_kw)
        if apply_pca:
            rows = _rows(l_args, l_kw, size)
            out = out + distillation(
                rows[:, :compression_size],
                pca_target(rows, compression_size),
                mse_weight=mse_weight,
                kl_temperature=kl_temperature,
            )
        return out

    def loss(*args, key=None, **kwargs):
        del key  # deterministic; accepted for a uniform signature
        size, n_stack = _stacks(args, kwargs)
        if not 0 < compression_size <= size:
            raise ValueError(f"compression_size must be in 1..{size}, got {compression_size}")
        args, kwargs = _promote(args, kwargs, size)
        t_args, t_kw = _layer(args, kwargs, size, -1)
        total = loss_fn(*t_args, **t_kw) + compress_terms(t_args, t_kw, size)
        weights = layer_weights(layer_depths(n_stack, embedding_layer)[:-1], "log")
        students = 0.0
        for p, w in enumerate(weights):
            s_args, s_kw = _layer(args, kwargs, size, p)
            students = students + w * compress_terms(s_args, s_kw, size)
        return total + students / max(len(weights), 1)

    return loss
