"""embedjax.similarity against naive NumPy loops written here."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax import similarity as sim

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

RNG = np.random.default_rng(0)


def _np_sim(x, y, metric):
    """One pair, by the textbook definition, float64, explicit loops."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if metric == "dot":
        return sum(x[k] * y[k] for k in range(len(x)))
    if metric == "cosine":
        nx = math.sqrt(sum(v * v for v in x))
        ny = math.sqrt(sum(v * v for v in y))
        return sum(x[k] * y[k] for k in range(len(x))) / (max(nx, 1e-12) * max(ny, 1e-12))
    if metric == "euclidean":
        return -math.sqrt(sum((x[k] - y[k]) ** 2 for k in range(len(x))))
    if metric == "manhattan":
        return -sum(abs(x[k] - y[k]) for k in range(len(x)))
    raise ValueError(metric)


def _np_angle(x, y, pooling="sum"):
    """AnglE angle score from docs/losses.md, "AnglE", with Python complex numbers."""
    d = len(x)
    h = d // 2
    z = [complex(x[k], x[h + k]) for k in range(h)]
    w = [complex(y[k], y[h + k]) for k in range(h)]
    nz = math.sqrt(sum(abs(c) ** 2 for c in z))
    nw = math.sqrt(sum(abs(c) ** 2 for c in w))
    total = 0.0
    for k in range(h):
        # z_k * conj(w_k) = (a c + b d) + i (b c - a d)
        q = z[k] * w[k].conjugate() / (nz * nw)
        total += q.real + q.imag
    if pooling == "mean":
        total /= d
    return abs(total)


@pytest.mark.parametrize("metric", sim.METRICS)
def test_pairwise_matches_numpy(metric):
    a = RNG.normal(size=(5, 12)).astype(np.float32)
    b = RNG.normal(size=(5, 12)).astype(np.float32)
    got = np.asarray(sim.pairwise(jnp.asarray(a), jnp.asarray(b), metric))
    want = np.array([_np_sim(a[i], b[i], metric) for i in range(5)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", sim.METRICS)
def test_matrix_matches_numpy(metric):
    a = RNG.normal(size=(4, 10)).astype(np.float32)
    b = RNG.normal(size=(7, 10)).astype(np.float32)
    got = np.asarray(sim.matrix(jnp.asarray(a), jnp.asarray(b), metric))
    want = np.array([[_np_sim(a[i], b[j], metric) for j in range(7)] for i in range(4)])
    assert got.shape == (4, 7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_named_functions_and_scale_invariance():
    a = jnp.asarray(RNG.normal(size=(3, 8)), jnp.float32)
    b = jnp.asarray(RNG.normal(size=(3, 8)), jnp.float32)
    np.testing.assert_allclose(sim.cosine_pairwise(a, b), sim.cosine_pairwise(3.0 * a, b), rtol=1e-5)
    np.testing.assert_allclose(sim.dot_matrix(a, b), np.asarray(a) @ np.asarray(b).T, rtol=1e-5)
    assert not np.allclose(sim.dot_pairwise(a, b), sim.dot_pairwise(3.0 * a, b))


def test_l2_normalize_like_torch_normalize():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-14, 0.0]], np.float32)
    got = np.asarray(sim.l2_normalize(jnp.asarray(x)))
    want = np.zeros_like(x)
    for i in range(3):
        n = math.sqrt(sum(float(v) ** 2 for v in x[i]))
        want[i] = x[i] / max(n, 1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Finite gradients at the zero vector and at identical points (no NaN).
    g = jax.grad(lambda v: sim.l2_normalize(v).sum())(jnp.zeros(4))
    assert np.all(np.isfinite(g))
    g = jax.grad(lambda v: sim.euclidean_pairwise(v, v))(jnp.ones(4))
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_angle_matches_complex_numpy(pooling):
    a = RNG.normal(size=(6, 16)).astype(np.float32)
    b = RNG.normal(size=(6, 16)).astype(np.float32)
    got = np.asarray(sim.angle_pairwise(jnp.asarray(a), jnp.asarray(b), pooling=pooling))
    want = np.array([_np_angle(a[i], b[i], pooling) for i in range(6)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pairwise_dispatch_angle_is_sum_pooling():
    a = RNG.normal(size=(4, 8)).astype(np.float32)
    b = RNG.normal(size=(4, 8)).astype(np.float32)
    want = np.array([_np_angle(a[i], b[i]) for i in range(4)])
    np.testing.assert_allclose(sim.pairwise(jnp.asarray(a), jnp.asarray(b), "angle"), want, rtol=1e-5)


def test_angle_identical_is_one_and_odd_size_rejected():
    a = jnp.asarray(RNG.normal(size=(2, 8)), jnp.float32)
    np.testing.assert_allclose(sim.angle_pairwise(a, a), 1.0, rtol=1e-6)
    with pytest.raises(ValueError):
        sim.angle_pairwise(jnp.ones((2, 7)), jnp.ones((2, 7)))


def test_unknown_metric_raises():
    with pytest.raises(ValueError):
        sim.matrix(jnp.ones((2, 4)), jnp.ones((2, 4)), "angle")
    with pytest.raises(ValueError):
        sim.pairwise(jnp.ones((2, 4)), jnp.ones((2, 4)), "cosin")


def _np_topk(q, c, k, metric):
    out_s, out_i = [], []
    for i in range(len(q)):
        scores = np.array([_np_sim(q[i], c[j], metric) for j in range(len(c))])
        order = np.argsort(-scores, kind="stable")[:k]
        out_s.append(scores[order])
        out_i.append(order)
    return np.array(out_s), np.array(out_i)


@pytest.mark.parametrize(
    "metric,k,chunk", [("cosine", 5, 16), ("dot", 40, 16), ("euclidean", 3, 7), ("manhattan", 101, 32)]
)
def test_topk_matches_argsort(metric, k, chunk):
    # N = 101 is not a multiple of any chunk size used; k = 40 and 101 exceed the chunk size.
    q = RNG.normal(size=(6, 8)).astype(np.float32)
    c = RNG.normal(size=(101, 8)).astype(np.float32)
    fn = jax.jit(sim.topk, static_argnames=("k", "metric", "chunk_size"))
    scores, idx = fn(jnp.asarray(q), jnp.asarray(c), k=k, metric=metric, chunk_size=chunk)
    want_s, want_i = _np_topk(q, c, k, metric)
    np.testing.assert_array_equal(np.asarray(idx), want_i)
    np.testing.assert_allclose(np.asarray(scores), want_s, rtol=1e-4, atol=1e-4)
    assert np.asarray(idx).max() < 101


@pytest.mark.parametrize("block, num_valid", [(4, None), (4, 150), (8, 131), (8, 5)])
def test_two_stage_topk_matches_argsort(block, num_valid):
    """The block-maximum pre-selection (chunks of 64 rows in blocks of 4 or 8) against a plain argsort:
    exact ties (duplicated rows, and integer scores), rows past num_valid (padding, even one that
    straddles a block), a block straddling the chunk boundary."""
    k, chunk = 5, 64
    c = RNG.normal(size=(200, 8)).astype(np.float32)
    c[150:] = 0.0  # padding: dot 0 would outscore every negative real score
    c[[33, 70, 71, 120]] = c[3]  # exact ties across blocks and chunks: the lower index wins
    q = RNG.normal(size=(9, 8)).astype(np.float32)
    q[4] = -np.abs(q[4]) - 0.1  # a query whose every real score is negative
    c[:150] = np.abs(c[:150]) if num_valid else c[:150]
    rounded = np.round(c * 2)  # integer-valued: many ties
    for corpus in (c, rounded.astype(np.float32)):
        valid = 200 if num_valid is None else num_valid
        fn = jax.jit(lambda q, c: sim.chunked_topk(lambda x: sim.matrix(q, x, "dot"), c, q.shape[0], k,
                                                    chunk_size=chunk, block=block, num_valid=valid))
        scores, idx = fn(jnp.asarray(q), jnp.asarray(corpus))
        full = q.astype(np.float64) @ corpus[:valid].astype(np.float64).T
        want = np.argsort(-full, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(np.asarray(idx), want)
        np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(full, want, 1), rtol=1e-5, atol=1e-5)
    assert sim.block_size(4000, 100) == 8 and sim.block_size(20000, 100) == 16 and sim.block_size(300, 100) == 1


def test_topk_rejects_k_above_corpus():
    with pytest.raises(ValueError):
        sim.topk(jnp.ones((2, 4)), jnp.ones((3, 4)), 4)


def _all_avals(jaxpr):
    """Every output aval in a jaxpr, recursing into sub-jaxprs (scan bodies, pjit, ...)."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for s in subs:
                inner = getattr(s, "jaxpr", s)
                if hasattr(inner, "eqns"):
                    yield from _all_avals(inner)


def test_topk_never_builds_query_by_corpus_matrix():
    qn, n, d, chunk, k = 64, 1000, 16, 128, 20
    q = jnp.ones((qn, d))
    c = jnp.ones((n, d))
    closed = jax.make_jaxpr(lambda q, c: sim.topk(q, c, k, chunk_size=chunk))(q, c)
    sizes = [math.prod(getattr(a, "shape", ())) for a in _all_avals(closed.jaxpr)]
    assert max(sizes) < qn * n / 2, max(sizes)
    # The check can fail: the plain matrix product does build a (Q, N) value.
    closed = jax.make_jaxpr(lambda q, c: jax.lax.top_k(sim.matrix(q, c), k))(q, c)
    assert max(math.prod(getattr(a, "shape", ())) for a in _all_avals(closed.jaxpr)) >= qn * n


def test_matrix_sharded_equals_single_device():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    a = RNG.normal(size=(16, 8)).astype(np.float32)
    b = RNG.normal(size=(24, 8)).astype(np.float32)
    shard = NamedSharding(mesh, P("data"))
    a_s, b_s = jax.device_put(a, shard), jax.device_put(b, shard)
    for metric in sim.METRICS:
        got = jax.jit(sim.matrix, static_argnames="metric")(a_s, b_s, metric=metric)
        want = sim.matrix(jnp.asarray(a), jnp.asarray(b), metric)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
