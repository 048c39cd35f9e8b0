"""Matryoshka, 2DMSE, adaptive layers and ESE against NumPy re-implementations written here."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from embedjax import losses as L
from test_losses import np_cosent, np_infonce  # the naive NumPy references

pytestmark = pytest.mark.fast_compile  # checks logic against NumPy references, not speed or PyTorch parity (conftest.py)

RNG = np.random.default_rng(2)


# ---------------------------------------------------------------- naive references


def np_softmax(v):
    e = [math.exp(x - max(v)) for x in v]
    return [x / sum(e) for x in e]


def np_kl(teacher_rows, student_rows, t):
    """Mean over rows of KL(softmax(T/t) || softmax(S/t)) over the feature axis."""
    tot = 0.0
    for tr, sr in zip(teacher_rows, student_rows):
        pt = np_softmax([x / t for x in tr])
        ps = np_softmax([x / t for x in sr])
        tot += sum(pt[f] * (math.log(pt[f]) - math.log(ps[f])) for f in range(len(pt)))
    return tot / len(teacher_rows)


def np_pca_target(m, k):
    d = m.shape[1]
    g = m.T @ m / math.sqrt(d)
    a = np.exp(g - g.max(axis=1, keepdims=True))
    a = a / a.sum(axis=1, keepdims=True)
    u, s, _ = np.linalg.svd(a)
    u, s = u[:, :k].copy(), s[:k]
    for c in range(k):
        pivot = int(np.argmax(np.abs(u[:, c])))
        if u[pivot, c] < 0:
            u[:, c] = -u[:, c]
    return m @ (u * s[None, :])


def np_distill(slim, target, mse_weight=1.0, t=1.0):
    mse = sum((slim[r, f] - target[r, f]) ** 2 for r in range(len(slim)) for f in range(slim.shape[1]))
    return mse_weight * mse / slim.size + t * np_kl(target, slim, t)


def rand(*shape):
    return RNG.normal(size=shape).astype(np.float64)


def f32(*shape):
    return jnp.asarray(rand(*shape), jnp.float32)


# ---------------------------------------------------------------- Matryoshka


def test_matryoshka_equals_weighted_sum_of_slices():
    a, p, n = rand(5, 32), rand(5, 32), rand(5, 3, 32)
    dims, weights = (32, 16, 8), (1.0, 0.5, 0.25)
    loss = L.matryoshka(L.infonce, dims, weights)
    want = sum(w * np_infonce(a[:, :d], p[:, :d], n[..., :d]) for d, w in zip(dims, weights))
    args = [jnp.asarray(x, jnp.float32) for x in (a, p, n)]
    np.testing.assert_allclose(float(jax.jit(loss)(*args)), want, rtol=1e-5)
    # Embeddings passed by keyword are sliced too.
    np.testing.assert_allclose(float(loss(args[0], args[1], negatives=args[2])), want, rtol=1e-5)


def test_matryoshka_passes_labels_through_and_composes():
    a, b = rand(6, 32), rand(6, 32)
    y = np.array([0.0, 1.0, 2.0, 2.0, 0.5, 3.0])
    loss = L.matryoshka(functools.partial(L.cosent, scale=10.0), (32, 8))
    want = sum(np_cosent(a[:, :d], b[:, :d], y, 10.0) for d in (32, 8))
    got = loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Composes with AnglE (whose angle term splits each prefix into halves).
    aj, bj, yj = f32(6, 32), f32(6, 32), jnp.asarray(y / 3, jnp.float32)
    m = L.matryoshka(L.angle_loss, (32, 16), (1.0, 2.0))(aj, bj, yj)
    parts = L.angle_loss(aj, bj, yj) + 2.0 * L.angle_loss(aj[:, :16], bj[:, :16], yj)
    np.testing.assert_allclose(float(m), float(parts), rtol=1e-6)
    with pytest.raises(ValueError):
        L.matryoshka(L.cosent, (64,))(aj, bj, yj)


def test_sample_dims_deterministic_distinct_and_covering():
    seen = set()
    for s in range(60):
        picks = np.asarray(L.sample_dims(jax.random.key(s), 5, 2))
        assert len(set(picks.tolist())) == 2 and picks.min() >= 0 and picks.max() < 5
        np.testing.assert_array_equal(picks, np.asarray(L.sample_dims(jax.random.key(s), 5, 2)))
        seen.update(picks.tolist())
    assert seen == {0, 1, 2, 3, 4}


def test_matryoshka_sampled_dims():
    a, b = rand(6, 32), rand(6, 32)
    y = np.array([0.0, 1.0, 2.0, 2.0, 0.5, 3.0])
    dims, weights = (32, 24, 16, 8), (1.0, 0.7, 0.5, 0.3)
    loss = jax.jit(L.matryoshka(L.cosent, dims, weights, n_dims_per_step=2))
    args = [jnp.asarray(x, jnp.float32) for x in (a, b, y)]
    values = set()
    for s in range(4):
        key = jax.random.key(s)
        picks = np.asarray(L.sample_dims(key, len(dims), 2))
        want = sum(weights[i] * np_cosent(a[:, : dims[i]], b[:, : dims[i]], y) for i in picks)
        got = float(loss(*args, key=key))
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert got == float(loss(*args, key=key))
        values.add(round(got, 4))
    assert len(values) > 1
    with pytest.raises(ValueError):
        loss(*args)  # no key


def test_matryoshka_gradients():
    with jax.enable_x64(True):
        a, p, n = jnp.asarray(rand(4, 16)), jnp.asarray(rand(4, 16)), jnp.asarray(rand(4, 2, 16))
        loss = L.matryoshka(functools.partial(L.infonce, scale=5.0), (16, 8, 4), (1.0, 0.5, 2.0))
        check_grads(loss, (a, p, n), order=1, modes=("rev",))


# ---------------------------------------------------------------- 2DMSE v1


@pytest.mark.parametrize("embedding_layer", [False, True])
def test_sample_2dmse(embedding_layer):
    n_stack, size = 6, 100  # dims 8, 16, 32, 64
    n_layers = n_stack - embedding_layer
    depths, dims = set(), set()
    for s in range(120):
        draw = L.sample_2dmse(jax.random.key(s), n_stack, size, embedding_layer=embedding_layer)
        index, depth, dim_index = (int(v) for v in draw)
        assert 1 <= depth <= n_layers - 1
        assert index == depth - 1 + embedding_layer
        depths.add(depth)
        dims.add(dim_index)
        again = L.sample_2dmse(jax.random.key(s), n_stack, size, embedding_layer=embedding_layer)
        assert (index, depth, dim_index) == tuple(int(v) for v in again)
    assert depths == set(range(1, n_layers))
    assert dims == {0, 1, 2, 3}
    assert L.prefix_dims(100) == (8, 16, 32, 64) and L.prefix_dims(64) == (8, 16, 32)


def np_2dmse(inner, stacks, extra, index, depth, d, t=1.0):
    teacher = [s[-1] for s in stacks]
    student = [s[index] for s in stacks]
    rows = lambda xs: np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
    loss = inner(*teacher, *extra) + inner(*student, *extra) / depth
    loss += t * np_kl(rows(teacher), rows(student), t)
    loss += inner(*[x[..., :d] for x in teacher], *extra)
    loss += inner(*[x[..., :d] for x in student], *extra) / depth
    return loss


@pytest.mark.parametrize("embedding_layer", [False, True])
def test_matryoshka_2d_cosent_matches_numpy(embedding_layer):
    la, lb = rand(4, 5, 32), rand(4, 5, 32)
    y = np.array([0.0, 1.0, 0.5, 1.0, 0.2])
    loss = jax.jit(L.matryoshka_2d(L.cosent, embedding_layer=embedding_layer))
    args = [jnp.asarray(x, jnp.float32) for x in (la, lb, y)]
    for s in range(3):
        key = jax.random.key(s)
        draw = L.sample_2dmse(key, 4, 32, embedding_layer=embedding_layer)
        index, depth, dim_index = (int(v) for v in draw)
        want = np_2dmse(np_cosent, [la, lb], [y], index, depth, L.prefix_dims(32)[dim_index])
        np.testing.assert_allclose(float(loss(*args, key=key)), want, rtol=1e-5)


def test_matryoshka_2d_infonce_with_negative_stacks():
    la, lp, ln = rand(3, 4, 16), rand(3, 4, 16), rand(3, 4, 2, 16)
    key = jax.random.key(7)
    index, depth, dim_index = (int(v) for v in L.sample_2dmse(key, 3, 16))
    want = np_2dmse(np_infonce, [la, lp, ln], [], index, depth, L.prefix_dims(16)[dim_index], t=2.0)
    loss = L.matryoshka_2d(L.infonce, kl_temperature=2.0)
    got = loss(*[jnp.asarray(x, jnp.float32) for x in (la, lp, ln)], key=key)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    with pytest.raises(ValueError):  # a non-stack embedding argument is refused
        loss(jnp.asarray(la, jnp.float32), jnp.asarray(lp[0], jnp.float32), key=key)


def test_matryoshka_2d_gradients_and_detach():
    with jax.enable_x64(True):
        la, lb = jnp.asarray(rand(3, 4, 16)), jnp.asarray(rand(3, 4, 16))
        y = jnp.array([0.0, 1.0, 0.5, 0.7])
        key = jax.random.key(3)
        inner = functools.partial(L.cosent, scale=5.0)
        loss = L.matryoshka_2d(inner)
        check_grads(lambda a, b: loss(a, b, y, key=key), (la, lb), order=1, modes=("rev",))
        detached = L.matryoshka_2d(inner, detach_teacher=True)
        assert float(detached(la, lb, y, key=key)) == pytest.approx(float(loss(la, lb, y, key=key)))
        g = jax.grad(lambda a: loss(a, lb, y, key=key))(la)
        gd = jax.grad(lambda a: detached(a, lb, y, key=key))(la)
        assert not np.allclose(g[-1], gd[-1])  # only the teacher's gradient changes
        np.testing.assert_allclose(g[:-1], gd[:-1], rtol=1e-12)


# ---------------------------------------------------------------- adaptive layers


def np_weights(depths, scheme, n):
    out = []
    for d in depths:
        formulas = {"inverse": 1 / (1 + d), "uniform": 1.0, "log": 1 / (1 + math.log(1 + d)), "linear": (n - d) / n}
        out.append(formulas[scheme])
    return out


def np_adaptive(inner, stacks, extra, picks, weights, t, last_w=1.0, prior_w=1.0, kl_w=1.0):
    rows = lambda xs: np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])
    teacher = [s[-1] for s in stacks]
    loss = last_w * inner(*teacher, *extra)
    for p in picks:
        student = [s[p] for s in stacks]
        loss += inner(*student, *extra) * weights[p] / len(picks) * prior_w
        if t > 0:
            loss += np_kl(rows(teacher), rows(student), t) * t * kl_w
    return loss


@pytest.mark.parametrize("scheme", ["inverse", "uniform", "log", "linear"])
@pytest.mark.parametrize("embedding_layer", [False, True])
def test_adaptive_layer_all_layers(scheme, embedding_layer):
    la, lb = rand(4, 5, 16), rand(4, 5, 16)
    y = np.array([0.0, 1.0, 0.5, 1.0, 0.2])
    depths = [p + (0 if embedding_layer else 1) for p in range(4)]
    w = np_weights(depths[:-1], scheme, depths[-1])
    want = np_adaptive(np_cosent, [la, lb], [y], [0, 1, 2], w, 0.3, last_w=2.0, prior_w=0.5, kl_w=3.0)
    loss = L.adaptive_layer(
        L.cosent, n_layers_per_step=-1, layer_weighting=scheme, last_layer_weight=2.0,
        prior_layers_weight=0.5, kl_div_weight=3.0, embedding_layer=embedding_layer,
    )
    got = loss(*[jnp.asarray(x, jnp.float32) for x in (la, lb, y)])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(L.layer_weights(depths[:-1], scheme, depths[-1]), w, rtol=1e-12)


def test_adaptive_layer_sampled_and_matryoshka_2d_composition():
    la, lb = rand(5, 4, 16), rand(5, 4, 16)
    y = np.array([0.0, 1.0, 0.5, 0.7])
    inner = L.matryoshka(L.cosent, (16, 8))
    loss = jax.jit(L.adaptive_layer(inner, n_layers_per_step=2, kl_temperature=1.0))
    np_inner = lambda a, b, y: np_cosent(a, b, y) + np_cosent(a[:, :8], b[:, :8], y)
    w = [1 / (1 + d) for d in range(1, 5)]
    for s in range(3):
        key = jax.random.key(s)
        picks = [int(v) for v in L.sample_layers(key, 4, 2)]
        assert len(set(picks)) == 2 and max(picks) < 4
        want = np_adaptive(np_inner, [la, lb], [y], picks, w, 1.0)
        got = loss(*[jnp.asarray(x, jnp.float32) for x in (la, lb, y)], key=key)
        np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_adaptive_layer_detach_teacher():
    with jax.enable_x64(True):
        la, lb = jnp.asarray(rand(3, 4, 16)), jnp.asarray(rand(3, 4, 16))
        y = jnp.array([0.0, 1.0, 0.5, 0.7])
        inner = functools.partial(L.cosent, scale=5.0)
        kw = dict(n_layers_per_step=None, kl_temperature=0.5)
        live = L.adaptive_layer(inner, detach_teacher=False, **kw)
        check_grads(lambda a, b: live(a, b, y), (la, lb), order=1, modes=("rev",))
        g = jax.grad(lambda a: L.adaptive_layer(inner, detach_teacher=True, **kw)(a, lb, y))(la)
        g_teacher_task = jax.grad(lambda t: inner(t, lb[-1], y))(la[-1])
        np.testing.assert_allclose(g[-1], g_teacher_task, rtol=1e-10)  # KL sends nothing to T
        g_live = jax.grad(lambda a: L.adaptive_layer(inner, detach_teacher=False, **kw)(a, lb, y))(la)
        assert not np.allclose(g_live[-1], g_teacher_task)


# ---------------------------------------------------------------- ESE


def test_pca_target_matches_numpy_and_is_deterministic():
    m = rand(10, 12)
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(L.pca_target, static_argnums=1)(jnp.asarray(m), 4))
    assert got.shape == (10, 4)
    np.testing.assert_allclose(got, np_pca_target(m, 4), rtol=1e-8, atol=1e-10)
    # float32 agrees too (same signs: the sign convention, not the SVD routine, decides them).
    got32 = np.asarray(L.pca_target(jnp.asarray(m, jnp.float32), 4))
    np.testing.assert_allclose(got32, np_pca_target(m, 4), rtol=1e-3, atol=1e-4)


def np_espresso(inner, stacks, extra, k, embedding_layer=False, apply_pca=True, t=1.0, mse_w=1.0):
    rows = lambda xs: np.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])

    def compress(layer):
        out = inner(*[x[..., :k] for x in layer], *extra)
        if apply_pca:
            r = rows(layer)
            out += np_distill(r[:, :k], np_pca_target(r, k), mse_w, t)
        return out

    n_stack = stacks[0].shape[0]
    teacher = [s[-1] for s in stacks]
    loss = inner(*teacher, *extra) + compress(teacher)
    students = 0.0
    for p in range(n_stack - 1):
        depth = p + (0 if embedding_layer else 1)
        students += compress([s[p] for s in stacks]) / (1 + math.log(1 + depth))
    return loss + students / (n_stack - 1)


@pytest.mark.parametrize("embedding_layer,apply_pca", [(False, True), (True, True), (False, False)])
def test_espresso_matches_numpy(embedding_layer, apply_pca):
    with jax.enable_x64(True):  # float64: the SVD-based target is compared tightly
        la, lb = rand(4, 5, 16), rand(4, 5, 16)
        y = np.array([0.0, 1.0, 0.5, 1.0, 0.2])
        loss = jax.jit(L.espresso(L.cosent, compression_size=6, kl_temperature=0.5, mse_weight=2.0,
                                  apply_pca=apply_pca, embedding_layer=embedding_layer))
        got = float(loss(jnp.asarray(la), jnp.asarray(lb), jnp.asarray(y)))
    want = np_espresso(np_cosent, [la, lb], [y], 6, embedding_layer, apply_pca, t=0.5, mse_w=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-7)


def test_espresso_gradients():
    with jax.enable_x64(True):
        la, lb = jnp.asarray(rand(3, 4, 16)), jnp.asarray(rand(3, 4, 16))
        y = jnp.array([0.0, 1.0, 0.5, 0.7])
        inner = functools.partial(L.cosent, scale=5.0)
        plain = L.espresso(inner, compression_size=8, apply_pca=False)
        check_grads(lambda a, b: plain(a, b, y), (la, lb), order=1, modes=("rev",))
        # With the PCA target (no gradient through it, by design) gradients stay finite.
        g = jax.grad(lambda a: L.espresso(inner, compression_size=8)(a, lb, y))(la)
        assert np.all(np.isfinite(g)) and np.any(g != 0)
