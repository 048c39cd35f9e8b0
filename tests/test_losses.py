"""InfoNCE, CoSENT and AnglE against naive NumPy loops written here; gradients; sharding."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from embedjax import losses as L

pytestmark = pytest.mark.fast_compile  # checks logic against NumPy references, not speed or PyTorch parity (conftest.py)

RNG = np.random.default_rng(1)


# ---------------------------------------------------------------- naive references


def np_cos(x, y):
    nx = math.sqrt(sum(float(v) ** 2 for v in x))
    ny = math.sqrt(sum(float(v) ** 2 for v in y))
    return sum(float(x[k]) * float(y[k]) for k in range(len(x))) / (max(nx, 1e-12) * max(ny, 1e-12))


def np_lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def np_infonce(a, p, n=None, scale=20.0, symmetric=False, a_ids=None, p_ids=None, n_ids=None):
    """Candidates for anchor i: all positives, then every hard negative of the batch."""
    b = len(a)
    cands, cand_ids = [], []
    for j in range(b):
        cands.append(p[j])
        cand_ids.append(None if p_ids is None else p_ids[j])
    if n is not None:
        for i in range(b):
            for kk in range(n.shape[1]):
                cands.append(n[i, kk])
                cand_ids.append(None if n_ids is None else n_ids[i, kk])
    total = 0.0
    for i in range(b):
        own = set()
        if p_ids is not None:
            own.add(p_ids[i])
        if a_ids is not None:
            own.add(a_ids[i])
        logits = [
            scale * np_cos(a[i], c)
            for j, c in enumerate(cands)
            if j == i or cand_ids[j] is None or cand_ids[j] not in own
        ]
        total += np_lse(logits) - scale * np_cos(a[i], p[i])
    loss = total / b
    if not symmetric:
        return loss
    back = 0.0
    for i in range(b):
        own = set()
        if a_ids is not None:
            own.add(a_ids[i])
            if p_ids is not None:
                own.add(p_ids[i])
        logits = [
            scale * np_cos(p[i], a[j])
            for j in range(b)
            if j == i or a_ids is None or a_ids[j] not in own
        ]
        back += np_lse(logits) - scale * np_cos(p[i], a[i])
    return 0.5 * (loss + back / b)


def np_ranking(scores, labels):
    terms = [0.0]
    for i in range(len(scores)):
        for j in range(len(scores)):
            if labels[i] < labels[j]:
                terms.append(scores[i] - scores[j])
    return np_lse(terms)


def np_cosent(a, b, y, scale=20.0):
    return np_ranking([scale * np_cos(a[i], b[i]) for i in range(len(a))], y)


def np_cosent_angle_emb_style(a, b, y, tau=20.0):
    """angle-emb's / sentence-transformers' vectorised formula (docs/losses.md, "CoSENT"), in NumPy."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    s = np.sum(a * b, axis=1) * tau
    y_true = (y[:, None] < y[None, :]).astype(np.float64)
    d = (s[:, None] - s[None, :] - (1 - y_true) * 1e12).reshape(-1)
    d = np.concatenate([[0.0], d])
    return float(np.log(np.sum(np.exp(d - d.max()))) + d.max())


def np_angle_score(x, y):
    h = len(x) // 2
    z = [complex(x[k], x[h + k]) for k in range(h)]
    w = [complex(y[k], y[h + k]) for k in range(h)]
    nz = math.sqrt(sum(abs(c) ** 2 for c in z))
    nw = math.sqrt(sum(abs(c) ** 2 for c in w))
    tot = 0.0
    for k in range(h):
        q = z[k] * w[k].conjugate() / (nz * nw)
        tot += q.real + q.imag
    return abs(tot)


def np_angle_term(a, b, y, tau=20.0):
    return np_ranking([tau * np_angle_score(a[i], b[i]) for i in range(len(a))], y)


def np_ibn_angle_emb(a, b, y_int, tau=20.0):
    """angle-emb's in_batch_negative_loss on the zigzag layout [a0, b0, a1, b1, ...]."""
    n = len(a)
    z = np.zeros((2 * n, a.shape[1]))
    z[0::2], z[1::2] = a, b
    yt = np.repeat(np.asarray(y_int, np.int64), 2)  # labels repeated per row
    idxs = np.arange(2 * n)
    idxs_1 = idxs[None, :] * yt[None, :] + (yt[None, :] == 0) * -2
    idxs_2 = (idxs + 1 - idxs % 2 * 2)[:, None] * yt[:, None] + (yt[:, None] == 0) * -1
    target = (idxs_1 == idxs_2).astype(np.float64)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    sims = (zn @ zn.T - np.eye(2 * n) * 1e12) * tau
    logp = sims - sims.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return float(np.mean(-(logp * target).sum(1)))


def np_ibn_weighted(a, b, w, tau=20.0, a_ids=None, b_ids=None):
    """Our rule with loops: row r of [a; b] targets its partner, weight w_pair, / 2B."""
    n = len(a)
    z = [a[i] for i in range(n)] + [b[i] for i in range(n)]
    ids = None if a_ids is None else list(a_ids) + list(b_ids)
    total = 0.0
    for r in range(2 * n):
        partner = r + n if r < n else r - n
        logits = []
        for c in range(2 * n):
            if c == r:
                continue
            if ids is not None and c != partner and ids[c] in (ids[r], ids[partner]):
                continue
            logits.append(tau * np_cos(z[r], z[c]))
        total += w[r % n] * (np_lse(logits) - tau * np_cos(z[r], z[partner]))
    return total / (2 * n)


def rand(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def j(x):
    return jnp.asarray(x)


# ---------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_matches_naive(k, symmetric):
    a, p = rand(6, 16), rand(6, 16)
    n = rand(6, k, 16) if k else None
    got = L.infonce(j(a), j(p), None if n is None else j(n), symmetric=symmetric, scale=20.0)
    np.testing.assert_allclose(float(got), np_infonce(a, p, n, symmetric=symmetric), rtol=1e-5)


def test_infonce_negatives_2d_means_one_per_anchor_and_scale():
    a, p, n = rand(5, 8), rand(5, 8), rand(5, 8)
    got = L.infonce(j(a), j(p), j(n), scale=10.0)
    np.testing.assert_allclose(float(got), np_infonce(a, p, n[:, None, :], scale=10.0), rtol=1e-5)


def test_infonce_dot_similarity():
    a, p = rand(4, 8), rand(4, 8)
    got = float(L.infonce(j(a), j(p), similarity="dot", scale=1.0))
    want = 0.0
    for i in range(4):
        logits = [float(a[i] @ p[c]) for c in range(4)]
        want += np_lse(logits) - float(a[i] @ p[i])
    np.testing.assert_allclose(got, want / 4, rtol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_duplicates_masked(symmetric):
    b, k = 6, 2
    p, n = rand(b, 16), rand(b, k, 16)
    a = p + 0.1 * rand(b, 16)  # anchors close to their positives: the targets dominate
    # Text "7" is positive of rows 0 and 3 and a hard negative of row 5; anchors 1 and 4 are
    # the same text "20", which is also row 2's positive.
    p[3] = p[0]
    n[5, 1] = p[0]
    a[4] = a[1]
    p_ids = np.array([7, 11, 20, 7, 12, 13])
    a_ids = np.array([30, 20, 31, 32, 20, 33])
    n_ids = np.array([[40, 41], [42, 43], [44, 45], [46, 47], [48, 49], [50, 7]])
    got = L.infonce(
        j(a), j(p), j(n), symmetric=symmetric,
        anchor_ids=j(a_ids), positive_ids=j(p_ids), negative_ids=j(n_ids),
    )
    want = np_infonce(a, p, n, symmetric=symmetric, a_ids=a_ids, p_ids=p_ids, n_ids=n_ids)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Unmasked, the identical copies act as negatives as strong as the target: a higher loss.
    unmasked = float(L.infonce(j(a), j(p), j(n), symmetric=symmetric))
    assert unmasked > float(got) + 0.1


def test_infonce_missing_ids_never_mask():
    """Ids given for positives only: negatives count as unique, even against id 0."""
    a, p, n = rand(4, 8), rand(4, 8), rand(4, 2, 8)
    p_ids = np.array([0, 1, 2, 0])
    got = L.infonce(j(a), j(p), j(n), positive_ids=j(p_ids))
    np.testing.assert_allclose(float(got), np_infonce(a, p, n, p_ids=p_ids), rtol=1e-5)


def test_simcse_recipes():
    v1, v2, c = rand(5, 8), rand(5, 8), rand(5, 8)
    np.testing.assert_allclose(float(L.simcse_unsupervised(j(v1), j(v2))), np_infonce(v1, v2), rtol=1e-5)
    ids = np.array([1, 2, 1, 3, 4])  # text 1 twice in the batch
    np.testing.assert_allclose(
        float(L.simcse_unsupervised(j(v1), j(v2), ids=j(ids))),
        np_infonce(v1, v2, a_ids=ids, p_ids=ids),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        float(L.simcse_supervised(j(v1), j(v2), j(c))), np_infonce(v1, v2, c[:, None]), rtol=1e-5
    )


def test_infonce_gradients():
    with jax.enable_x64(True):
        a, p, n = (jnp.asarray(RNG.normal(size=s)) for s in [(4, 6), (4, 6), (4, 3, 6)])
        ids = jnp.array([1, 2, 1, 3])

        def fn(a, p, n):
            return L.infonce(a, p, n, symmetric=True, positive_ids=ids, anchor_ids=ids + 10, scale=5.0)

        check_grads(fn, (a, p, n), order=1, modes=("rev",))


# ---------------------------------------------------------------- CoSENT


def test_cosent_matches_naive_with_ties():
    a, b = rand(8, 16), rand(8, 16)
    y = np.array([0, 1, 1, 2, 0, 2, 2, 1], np.float32)  # many ties
    got = float(L.cosent(j(a), j(b), j(y)))
    np.testing.assert_allclose(got, np_cosent(a, b, y), rtol=1e-5)
    np.testing.assert_allclose(got, np_cosent_angle_emb_style(a, b, y), rtol=1e-5)
    # Only the label order matters.
    np.testing.assert_allclose(float(L.cosent(j(a), j(b), j(5 * y + 1))), got, rtol=1e-6)


def test_cosent_all_ties_is_zero_and_order_matters():
    a, b = rand(4, 8), rand(4, 8)
    assert float(L.cosent(j(a), j(b), jnp.ones(4))) == 0.0
    y = np.array([0.1, 0.5, 0.3, 0.9], np.float32)
    assert float(L.cosent(j(a), j(b), j(y))) != pytest.approx(float(L.cosent(j(a), j(b), j(-y))))


def test_cosent_gradients():
    with jax.enable_x64(True):
        a, b = jnp.asarray(RNG.normal(size=(5, 6))), jnp.asarray(RNG.normal(size=(5, 6)))
        y = jnp.array([0.0, 1.0, 1.0, 3.0, 2.0])
        check_grads(lambda a, b: L.cosent(a, b, y, scale=5.0), (a, b), order=1, modes=("rev",))


# ---------------------------------------------------------------- AnglE


def test_angle_term_matches_angle_emb_formula():
    a, b = rand(6, 16), rand(6, 16)
    y = np.array([0.2, 0.9, 0.5, 0.5, 0.0, 1.0], np.float32)
    _, parts = L.angle_loss(j(a), j(b), j(y), cosine_w=1.0, ibn_w=0.0, angle_w=1.0, return_parts=True)
    np.testing.assert_allclose(float(parts["angle"]), np_angle_term(a, b, y), rtol=1e-5)
    np.testing.assert_allclose(float(parts["cosine"]), np_cosent(a, b, y), rtol=1e-5)
    assert "ibn" not in parts  # weight 0 -> not computed


def test_ibn_equals_angle_emb_on_binary_labels():
    a, b = rand(6, 16), rand(6, 16)
    y = np.array([1, 0, 1, 1, 0, 1], np.float32)
    _, parts = L.angle_loss(j(a), j(b), j(y), return_parts=True)
    np.testing.assert_allclose(float(parts["ibn"]), np_ibn_angle_emb(a, b, y), rtol=1e-5)


def test_ibn_fractional_labels_count():
    """angle-emb's int(label) >= 1 drops 0.8; our default threshold rule keeps it."""
    a, b = rand(4, 16), rand(4, 16)
    y = np.array([0.8, 0.3, 1.0, 0.5], np.float32)
    w = np.asarray(L.ibn_pair_weights(j(y)))
    np.testing.assert_array_equal(w, [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(L.ibn_pair_weights(j(y), ibn_rule="angle_emb")), [0, 0, 1, 0])
    _, ours = L.angle_loss(j(a), j(b), j(y), return_parts=True)
    np.testing.assert_allclose(float(ours["ibn"]), np_ibn_weighted(a, b, [1, 0, 1, 1]), rtol=1e-5)
    _, compat = L.angle_loss(j(a), j(b), j(y), ibn_rule="angle_emb", return_parts=True)
    np.testing.assert_allclose(float(compat["ibn"]), np_ibn_angle_emb(a, b, np.trunc(y)), rtol=1e-5)
    assert float(ours["ibn"]) > float(compat["ibn"])  # pairs 0 (0.8) and 3 (0.5) add terms
    _, soft = L.angle_loss(j(a), j(b), j(y), ibn_rule="soft", return_parts=True)
    np.testing.assert_allclose(float(soft["ibn"]), np_ibn_weighted(a, b, y), rtol=1e-5)
    # Raw STS-B scores with their range: 4.0 / 5 = 0.8 counts, 2.0 / 5 does not.
    w5 = np.asarray(L.ibn_pair_weights(jnp.array([4.0, 2.0]), label_range=(0.0, 5.0)))
    np.testing.assert_array_equal(w5, [1.0, 0.0])


def test_ibn_duplicates_masked():
    a, b = rand(5, 16), rand(5, 16)
    b[3] = b[0]
    a[2] = b[0]  # the same text also appears as a first text
    a_ids = np.array([1, 2, 9, 4, 5])
    b_ids = np.array([9, 6, 7, 9, 8])
    y = np.ones(5, np.float32)
    got = L.in_batch_pair_loss(j(a), j(b), j(y), a_ids=j(a_ids), b_ids=j(b_ids))
    np.testing.assert_allclose(float(got), np_ibn_weighted(a, b, y, a_ids=a_ids, b_ids=b_ids), rtol=1e-5)
    assert float(L.in_batch_pair_loss(j(a), j(b), j(y))) > float(got) + 0.1


def test_angle_loss_total_v03_on_stsb_scale():
    a, b = rand(8, 16), rand(8, 16)
    y = np.array([0.0, 4.2, 3.0, 2.4, 5.0, 1.2, 3.0, 2.6], np.float32)
    got = float(L.angle_loss(j(a), j(b), j(y), label_range=(0.0, 5.0), **L.ANGLE_V03))
    w = [1.0 if v / 5 >= 0.5 else 0.0 for v in y]
    want = np_cosent(a, b, y) + np_ibn_weighted(a, b, w) + np_angle_term(a, b, y)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Default weights = angle-emb 0.6: ibn + 0.02 * angle.
    got06 = float(L.angle_loss(j(a), j(b), j(y), label_range=(0.0, 5.0)))
    np.testing.assert_allclose(got06, np_ibn_weighted(a, b, w) + 0.02 * np_angle_term(a, b, y), rtol=1e-5)


def test_angle_presets():
    assert L.ANGLE_V06 == dict(cosine_w=0.0, ibn_w=1.0, angle_w=0.02)
    assert L.ANGLE_V06_TRIPLET == dict(cosine_w=0.0, ibn_w=1.0, cln_w=1.0, angle_w=0.02)
    assert L.ANGLE_V03 == dict(cosine_w=1.0, ibn_w=1.0, angle_w=1.0)
    assert L.ANGLE_README_STSB == dict(cosine_w=1.0, ibn_w=1.0, angle_w=0.02)


def test_angle_triplet_matches_naive():
    q, p, n = rand(5, 16), rand(5, 16), rand(5, 16)
    w = dict(cosine_w=0.5, ibn_w=1.0, cln_w=2.0, angle_w=0.3)
    got = float(L.angle_triplet_loss(j(q), j(p), j(n), **w))
    pa, pb = np.concatenate([q, q]), np.concatenate([p, n])
    py = np.array([1.0] * 5 + [0.0] * 5)
    want = (1.0 * np_infonce(q, p) + 2.0 * np_infonce(q, p, n[:, None])) / 2
    want += 0.5 * np_cosent(pa, pb, py) + 0.3 * np_angle_term(pa, pb, py)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_angle_gradients():
    with jax.enable_x64(True):
        a, b = jnp.asarray(RNG.normal(size=(5, 6))), jnp.asarray(RNG.normal(size=(5, 6)))
        y = jnp.array([0.0, 0.8, 1.0, 0.3, 0.5])
        fn = lambda a, b: L.angle_loss(a, b, y, cosine_w=1.0, ibn_w=1.0, angle_w=1.0,
                                       cosine_tau=5.0, ibn_tau=5.0, angle_tau=5.0, ibn_rule="soft")
        check_grads(fn, (a, b), order=1, modes=("rev",))


# ---------------------------------------------------------------- sharding


def test_sharded_losses_equal_single_device():
    """Global batch sharded over 8 devices (AxisType.Auto): same loss and grads, k = 2."""
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    row = NamedSharding(mesh, P("data"))
    a, p, n = rand(16, 8), rand(16, 8), rand(16, 2, 8)
    y = RNG.uniform(size=16).astype(np.float32)

    def objective(a, p, n, y):
        return L.infonce(a, p, n, symmetric=True) + L.angle_loss(a, p, y, **L.ANGLE_V03)

    grad_fn = jax.value_and_grad(objective, argnums=(0, 1, 2))
    want_v, want_g = jax.jit(grad_fn)(j(a), j(p), j(n), j(y))  # one device
    args = [jax.device_put(x, row) for x in (a, p, n, y)]
    assert not args[0].sharding.is_fully_replicated
    got_v, got_g = jax.jit(grad_fn)(*args)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    # The infonce value alone, against the naive global-batch reference (label layout check).
    got = jax.jit(lambda a, p, n: L.infonce(a, p, n))(*args[:3])
    np.testing.assert_allclose(float(got), np_infonce(a, p, n), rtol=1e-5)
