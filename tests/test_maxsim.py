"""Late-interaction scoring (MaxSim, ColBERT) in the similarity core against naive NumPy loops: padded
(masks), packed (flat tokens with text ids), ColBERT's / PyLate's zeroed padding, gradients, and
sharded over 8 devices == 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from embedjax import sharding, similarity

pytestmark = pytest.mark.fast_compile  # checks logic, not speed (conftest.py)


def _tokens(seed, n, t, d=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, t, d)).astype(np.float32)
    mask = (rng.random((n, t)) < 0.7).astype(np.int32)
    mask[:, 0] = 1
    return x, mask


def naive_maxsim(q, d, q_mask, d_mask, masked_as_zero=False):
    """Sum over kept query tokens of the best dot with a kept document token (0 without one);
    ``masked_as_zero``: masked document tokens score 0 (PyLate's ``colbert_scores``)."""
    out = np.zeros((len(q), len(d)))
    for i in range(len(q)):
        for j in range(len(d)):
            total = 0.0
            for a in range(q.shape[1]):
                if not q_mask[i, a]:
                    continue
                sims = [float(np.dot(q[i, a].astype(np.float64), d[j, b])) if d_mask[j, b] else
                        (0.0 if masked_as_zero else None) for b in range(d.shape[1])]
                sims = [s for s in sims if s is not None]
                total += max(sims) if sims else 0.0
            out[i, j] = total
    return out


@pytest.mark.parametrize("masked_as_zero", [False, True])
def test_maxsim_matrix_and_pairwise_equal_a_loop(masked_as_zero):
    q, q_mask = _tokens(0, 3, 5)
    d, d_mask = _tokens(1, 4, 7)
    d_mask[3] = 0  # a document with no kept token scores 0
    want = naive_maxsim(q, d, q_mask, d_mask, masked_as_zero)
    got = np.asarray(similarity.maxsim_matrix(q, d, q_mask, d_mask, masked_as_zero=masked_as_zero))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got[:, 3] == 0).all()
    pair = np.asarray(similarity.maxsim_pairwise(q, d[:3], q_mask, d_mask[:3], masked_as_zero=masked_as_zero))
    np.testing.assert_allclose(pair, np.diag(want[:, :3]), rtol=1e-5, atol=1e-5)
    # no masks: every token counts
    np.testing.assert_allclose(np.asarray(similarity.maxsim_matrix(q, d)),
                               naive_maxsim(q, d, np.ones_like(q_mask), np.ones_like(d_mask)), rtol=1e-5, atol=1e-5)


def test_pylate_zeroed_padding_differs_only_where_every_match_is_negative():
    q = np.array([[[1.0], [-1.0]]], np.float32)
    d = np.array([[[2.0], [0.5], [9.0]]], np.float32)
    d_mask = np.array([[1, 1, 0]])
    exact = float(similarity.maxsim_matrix(q, d, None, d_mask)[0, 0])
    zeroed = float(similarity.maxsim_matrix(q, d, None, d_mask, masked_as_zero=True)[0, 0])
    assert exact == pytest.approx(2.0 - 0.5) and zeroed == pytest.approx(2.0 + 0.0)


def test_packed_tokens_score_like_padded_rows():
    q, q_mask = _tokens(2, 3, 5)
    d, d_mask = _tokens(3, 4, 6)
    rng = np.random.default_rng(4)

    def flatten(x, mask, n):  # every kept token with its text's id, shuffled, plus padding slots
        ids = np.repeat(np.arange(n), x.shape[1])[mask.reshape(-1) == 1]
        tokens = x.reshape(-1, x.shape[-1])[mask.reshape(-1) == 1]
        order = rng.permutation(len(ids))
        pad = 3
        return (np.concatenate([tokens[order], rng.normal(size=(pad, x.shape[-1])).astype(np.float32)]),
                np.concatenate([ids[order], [-1, n, n + 5]]))

    qt, qi = flatten(q, q_mask, 3)
    dt, di = flatten(d, d_mask, 4)
    got = np.asarray(similarity.maxsim_segments(qt, qi, dt, di, 3, 4))
    np.testing.assert_allclose(got, naive_maxsim(q, d, q_mask, d_mask), rtol=1e-5, atol=1e-5)


def test_maxsim_gradients():
    # distinct values keep every max away from a tie: finite differences hold
    rng = np.random.default_rng(5)
    q = (rng.permutation(2 * 3 * 4).reshape(2, 3, 4) / 10.0 - 1.0).astype(np.float32)
    d = (rng.permutation(3 * 5 * 4).reshape(3, 5, 4) / 17.0 - 1.0).astype(np.float32)
    q_mask = np.array([[1, 1, 0], [1, 1, 1]])
    d_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 1]])
    check_grads(lambda a, b: similarity.maxsim_matrix(a, b, q_mask, d_mask), (q, d), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2, eps=1e-3)


def test_maxsim_matrix_sharded_over_eight_devices_equals_one():
    mesh = sharding.make_mesh(data=-1)
    q, q_mask = _tokens(6, 8, 5)
    d, d_mask = _tokens(7, 16, 6)
    rows = NamedSharding(mesh, P(mesh.axis_names))
    fn = jax.jit(similarity.maxsim_matrix)
    sharded = fn(*(jax.device_put(x, rows) for x in (q, d, q_mask, d_mask)))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(fn(q, d, q_mask, d_mask)), rtol=1e-6, atol=1e-6)
    assert len(jnp.asarray(sharded).sharding.device_set) == jax.device_count()


@pytest.mark.parametrize("n", [1, 13, 40])
def test_sharded_maxsim_search_on_eight_devices_equals_one_and_brute_force(n):
    """Exact MaxSim top-k over documents of different lengths, the corpus split over 8 devices
    (with padding rows when n is not a multiple) and on one: the same as scoring every pair."""
    from embedjax.eval import search

    rng = np.random.default_rng(n)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    queries = [unit(rng.normal(size=(4, 6))).astype(np.float32) for _ in range(5)]
    documents = [unit(rng.normal(size=(int(rng.integers(1, 9)), 6))).astype(np.float32) for _ in range(n)]
    k = min(7, n)
    s8, i8 = search.sharded_maxsim_topk(queries, documents, k, chunk_size=3, query_chunk_size=2)
    one = jax.make_mesh((1,), ("corpus",), devices=jax.devices()[:1])
    s1, i1 = search.sharded_maxsim_topk(queries, documents, k, mesh=one)
    np.testing.assert_array_equal(i8, i1)
    np.testing.assert_allclose(s8, s1, rtol=1e-6)
    brute = np.array([[np.sum(np.max(q @ d.T, axis=1)) for d in documents] for q in queries])
    want = np.argsort(-brute, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(i8, want)
    np.testing.assert_allclose(s8, np.take_along_axis(brute, want, axis=1), rtol=1e-5)
