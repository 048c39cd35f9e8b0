"""Correlation (CoDiEmb) and distillation losses: naive float64 NumPy loops written here,
central finite differences, sentence-transformers' own loss modules on the same embeddings,
first-principles invariances, and composition with the Matryoshka / layer wrappers."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from sentence_transformers.sentence_transformer import losses as stl
from sentence_transformers.util import pairwise_cos_sim

from embedjax import losses as L
from embedjax.losses.correlation import average_rank_scores

RNG = np.random.default_rng(7)
# One batch shape almost everywhere: eager JAX compiles each primitive once per shape, so
# shared shapes keep this module fast.
B, D, K = 6, 8, 3


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def labels():
    """(B,) STS-like gold scores in [0, 5]."""
    return RNG.uniform(0, 5, B).astype(np.float32)


# ---------------------------------------------------------------- naive references (float64 loops)


def np_sim(x, y, similarity):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dot = sum(x[k] * y[k] for k in range(len(x)))
    if similarity == "dot":
        return dot
    nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
    return dot / (max(nx, 1e-12) * max(ny, 1e-12))


def np_softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def np_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def np_pearson_loss(a, b, y, similarity="cosine"):
    s = [np_sim(a[i], b[i], similarity) for i in range(len(a))]
    y = [float(v) for v in y]
    n = len(s)
    ms, my = sum(s) / n, sum(y) / n
    cov = sum((s[i] - ms) * (y[i] - my) for i in range(n)) / n
    vs = sum((v - ms) ** 2 for v in s) / n
    vy = sum((v - my) ** 2 for v in y) / n
    return 1.0 - cov / math.sqrt(vs * vy)


def np_rank01(y):
    """Average ranks (ties share the mean of their positions), ascending, over n - 1."""
    n = len(y)
    order = sorted(range(n), key=lambda i: y[i])
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and y[order[j + 1]] == y[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2.0
        i = j + 1
    return [r / max(n - 1, 1) for r in ranks]


def np_rank_kl(a, b, y, scale=20.0, label_temperature=0.05, norm="rank", similarity="cosine"):
    y = [float(v) for v in y]
    if norm == "rank":
        u = np_rank01(y)
    else:
        lo, hi = min(y), max(y)
        u = [(v - lo) / (hi - lo) for v in y]
    target = np_softmax([v / label_temperature for v in u])
    pred = np_softmax([scale * np_sim(a[i], b[i], similarity) for i in range(len(a))])
    return np_kl(target, pred) / len(a)


def np_cands(p, n):
    n = n[:, None, :] if n.ndim == 2 else n
    return [[p[i]] + [n[i, j] for j in range(n.shape[1])] for i in range(len(p))]


def np_margin_mse(q, p, n, teacher, similarity="dot"):
    cands = np_cands(p, n)
    errs = []
    for i in range(len(q)):
        s = [np_sim(q[i], c, similarity) for c in cands[i]]
        for j in range(1, len(cands[i])):
            errs.append(((s[0] - s[j]) - (float(teacher[i][0]) - float(teacher[i][j]))) ** 2)
    return sum(errs) / len(errs)


def np_listwise_kl(q, p, n, teacher, scale=20.0, tt=1.0, similarity="cosine"):
    cands = np_cands(p, n)
    total = 0.0
    for i in range(len(q)):
        target = np_softmax([float(t) / tt for t in teacher[i]])
        pred = np_softmax([scale * np_sim(q[i], c, similarity) for c in cands[i]])
        total += np_kl(target, pred)
    return total / len(q)


def np_similarity_mse(s, t):
    n = len(s)
    return sum((np_sim(s[i], s[j], "cosine") - np_sim(t[i], t[j], "cosine")) ** 2
               for i in range(n) for j in range(n)) / n ** 2


def value_and_grad(fn, argnums=0, **kw):
    """Jitted value-and-grad of ``fn`` with ``kw`` fixed (a jit compiles faster than eager)."""
    return jax.jit(jax.value_and_grad(functools.partial(fn, **kw), argnums=argnums))


def grad(fn, argnums=0):
    return jax.jit(jax.grad(fn, argnums=argnums))


def close(x, want, rtol=2e-5, atol=1e-6):
    np.testing.assert_allclose(float(x), want, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- values vs the loops


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_pearson_matches_naive(similarity):
    a, b, y = rand(B, D), rand(B, D), labels()
    close(L.pearson_loss(a, b, y, similarity=similarity), np_pearson_loss(a, b, y, similarity))


@pytest.mark.parametrize("norm", ["rank", "minmax"])
def test_rank_consistency_matches_naive(norm):
    a, b = rand(B, D), rand(B, D)
    y = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 3.0], np.float32)  # ties on purpose
    got = L.rank_consistency_loss(a, b, y, label_normalization=norm)
    close(got, np_rank_kl(a, b, y, norm=norm), rtol=1e-4)
    got = L.rank_consistency_loss(a, b, y, scale=7.0, label_temperature=0.3, label_normalization=norm)
    close(got, np_rank_kl(a, b, y, 7.0, 0.3, norm), rtol=1e-4)


def test_average_ranks_are_scipys():
    y = np.array([2.0, 2.0, 7.0, -1.0, 2.0, 7.0, 0.5])
    want = (scipy.stats.rankdata(y, method="average") - 1) / (len(y) - 1)
    np.testing.assert_allclose(np.asarray(average_rank_scores(jnp.asarray(y))), want, rtol=1e-6)
    np.testing.assert_allclose(np_rank01(list(y)), want)  # the loop reference agrees too


def test_rank_consistency_is_codiembs_torch_form():
    """CoDiEmb's RankKLDivergenceLoss written out in torch (descending average ranks,
    (n - 1 - rank) / (n - 1), kl_div batchmean on the 1-D list, temperature 0.05 both sides)."""
    a, b, y = rand(B, D), rand(B, D), RNG.integers(0, 4, B).astype(np.float32)
    s = F.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=-1)
    rank_desc = torch.tensor(scipy.stats.rankdata(-y, method="average") - 1.0)
    ideal = ((len(y) - 1 - rank_desc) / (len(y) - 1)).float()
    want = F.kl_div(F.log_softmax(s / 0.05, dim=0), F.softmax(ideal / 0.05, dim=0), reduction="batchmean")
    close(L.rank_consistency_loss(a, b, y), float(want), rtol=1e-4)


@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_margin_mse_matches_naive(k, similarity):
    q, p = rand(B, D), rand(B, D)
    n = rand(B, D) if k is None else rand(B, k, D)
    teacher = rand(B, 1 + (1 if k is None else k)) * 3
    close(L.margin_mse(q, p, n, teacher, similarity=similarity), np_margin_mse(q, p, n, teacher, similarity),
          rtol=1e-4)


@pytest.mark.parametrize("similarity,scale,tt", [("cosine", 20.0, 1.0), ("dot", 1.0, 2.5)])
def test_listwise_kl_matches_naive(similarity, scale, tt):
    q, p, n, teacher = rand(B, D), rand(B, D), rand(B, K, D), rand(B, 1 + K) * 4
    got = L.listwise_kl(q, p, n, teacher, scale=scale, teacher_temperature=tt, similarity=similarity)
    close(got, np_listwise_kl(q, p, n, teacher, scale, tt, similarity), rtol=1e-4)


def test_listwise_kl_excluded_candidate():
    """A -inf teacher score takes the candidate out (zero mass), without NaN in value or grad."""
    q, p, n, teacher = rand(B, D), rand(B, D), rand(B, K, D), rand(B, 1 + K)
    teacher[1, 2] = -np.inf
    value, g = value_and_grad(L.listwise_kl)(q, p, n, teacher)
    close(value, np_listwise_kl(q, p, n, teacher), rtol=1e-4)
    assert np.all(np.isfinite(np.asarray(g)))


def test_embedding_losses_match_naive():
    s, t = rand(B, K, D), rand(B, K, D)
    close(L.embedding_mse(s, t), float(np.mean((s.astype(np.float64) - t) ** 2)))
    rows_s, rows_t = s.reshape(-1, D), t.reshape(-1, D)
    want = sum(1 - np_sim(rows_s[i], rows_t[i], "cosine") for i in range(len(rows_s))) / len(rows_s)
    close(L.embedding_cosine(s, t), want)
    narrow, wide = rand(B, D), rand(B, 2 * D)
    close(L.similarity_mse(narrow, wide), np_similarity_mse(narrow, wide))


# ---------------------------------------------------------------- sentence-transformers on the same embeddings


def st_value_and_grads(loss, embs, labels):
    """ST's loss of precomputed embeddings and its torch-autograd gradient w.r.t. them."""
    ts = [torch.tensor(e, requires_grad=True) for e in embs]
    value = loss.compute_loss_from_embeddings(ts, torch.tensor(labels))
    value.backward()
    return float(value.detach()), [t.grad.numpy() for t in ts]


def grads_close(ours, theirs, rtol=2e-4):
    for g, want in zip(ours, theirs):
        np.testing.assert_allclose(np.asarray(g), want, rtol=rtol, atol=1e-6 * np.abs(want).max())


# ST's label layouts: (B, 1 + k) scores, (B, k) margins, and (B,) one margin when k = 1.
@pytest.mark.parametrize("layout,k", [("scores", 1), ("scores", 3), ("margins", 1), ("margins", 3), ("flat", 1)])
def test_margin_mse_equals_sentence_transformers(layout, k):
    q, p, negs = rand(B, D), rand(B, D), [rand(B, D) for _ in range(k)]
    scores = rand(B, 1 + k) * 5
    labels = {"scores": scores, "margins": scores[:, :1] - scores[:, 1:],
              "flat": scores[:, 0] - scores[:, 1]}[layout]
    v_st, g_st = st_value_and_grads(stl.MarginMSELoss(None), [q, p, *negs], labels)
    n = negs[0] if k == 1 else np.stack(negs, axis=1)
    v, g = value_and_grad(L.margin_mse, argnums=(0, 1, 2))(q, p, n, labels)
    close(v, v_st, rtol=1e-5)
    g_n = [g[2]] if k == 1 else [g[2][:, j] for j in range(k)]
    grads_close([g[0], g[1], *g_n], g_st)


def test_listwise_kl_equals_distill_kl_div():
    k = K
    q, p, negs, teacher = rand(B, D), rand(B, D), [rand(B, D) for _ in range(k)], rand(B, 1 + k) * 3
    n = np.stack(negs, axis=1)

    # Their defaults (dot, temperature 1) are ours with scale 1 and similarity "dot": the same number.
    v_st, g_st = st_value_and_grads(stl.DistillKLDivLoss(None), [q, p, *negs], teacher)
    v, g = value_and_grad(L.listwise_kl, (0, 1, 2), scale=1.0, similarity="dot")(q, p, n, teacher)
    close(v, v_st, rtol=1e-5)
    grads_close([g[0], g[1], *[g[2][:, j] for j in range(k)]], g_st)

    # Ours (cosine x scale, teacher_temperature) == theirs / st^2 with st = 1 / scale.
    scale, tt = 20.0, 0.7
    st_loss = stl.DistillKLDivLoss(None, similarity_fct=pairwise_cos_sim, student_temperature=1 / scale,
                                   teacher_temperature=tt)
    v_st, g_st = st_value_and_grads(st_loss, [q, p, *negs], teacher)
    v, g = value_and_grad(L.listwise_kl, (0, 1, 2), scale=scale, teacher_temperature=tt)(q, p, n, teacher)
    close(v, v_st * scale ** 2, rtol=1e-5)
    grads_close([g[0], g[1], *[g[2][:, j] for j in range(k)]], [x * scale ** 2 for x in g_st])


def test_embedding_losses_equal_sentence_transformers():
    s, t = rand(B, D), rand(B, D)
    with torch.no_grad():
        mse = stl.MSELoss(None).compute_loss_from_embeddings([torch.tensor(s)], [torch.tensor(t)])
        cos = stl.EmbedDistillLoss(None, distance_metric="cosine").compute_loss_from_embeddings(
            [torch.tensor(s)], [torch.tensor(t)])
    close(L.embedding_mse(s, t), float(mse))
    close(L.embedding_cosine(s, t), float(cos))


# ---------------------------------------------------------------- gradients vs central differences (float64)


def fd_check(fn, args, h=1e-6, rtol=1e-6):
    """jax.grad of fn w.r.t. all its embedding args vs central differences in every
    coordinate, float64. The args are packed into one vector so a loss costs two compiles:
    the gradient and one vmapped call over all 2 * size perturbed copies."""
    shapes = [np.shape(x) for x in args]
    sizes = [int(np.prod(sh)) for sh in shapes]
    x = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in args])

    def f(v):
        parts = jnp.split(v, np.cumsum(sizes)[:-1])
        return fn(*[part.reshape(sh) for part, sh in zip(parts, shapes)])

    steps = np.eye(x.size) * h
    values = np.asarray(jax.jit(jax.vmap(f))(jnp.asarray(np.concatenate([x + steps, x - steps]))))
    fd = (values[: x.size] - values[x.size:]) / (2 * h)
    grad = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(x)))
    assert np.abs(fd).max() > 1e-4, "vacuous check: the finite differences are all ~0"
    np.testing.assert_allclose(grad, fd, rtol=rtol, atol=rtol * np.abs(fd).max())


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        r = np.random.default_rng(3)
        a, b = r.standard_normal((5, 3)), r.standard_normal((5, 3))
        y = np.array([0.5, 3.0, 2.0, 2.0, 4.5])
        q, p, n = r.standard_normal((3, 3)), r.standard_normal((3, 3)), r.standard_normal((3, 2, 3))
        teacher = r.standard_normal((3, 3))
        wide = r.standard_normal((5, 4))
        fd_check(lambda a, b: L.pearson_loss(a, b, y), (a, b))
        fd_check(lambda a, b: L.rank_consistency_loss(a, b, y, scale=5.0, label_temperature=0.5), (a, b))
        fd_check(lambda a, b: L.rank_consistency_loss(a, b, y, label_normalization="minmax"), (a, b))
        fd_check(lambda q, p, n: L.margin_mse(q, p, n, teacher), (q, p, n))
        fd_check(lambda q, p, n: L.listwise_kl(q, p, n, teacher, scale=3.0), (q, p, n))
        fd_check(lambda s: L.embedding_mse(s, b), (a,))
        fd_check(lambda s: L.embedding_cosine(s, b), (a,))
        fd_check(lambda s: L.similarity_mse(s, wide), (a,))


def test_targets_carry_no_gradient():
    a, b, y = rand(B, D), rand(B, D), labels()
    assert not np.any(np.asarray(grad(L.pearson_loss, 2)(a, b, y)))
    assert not np.any(np.asarray(grad(L.rank_consistency_loss, 2)(a, b, y)))
    q, p, n, t = rand(B, D), rand(B, D), rand(B, K, D), rand(B, 1 + K)
    assert not np.any(np.asarray(grad(L.margin_mse, 3)(q, p, n, t)))
    assert not np.any(np.asarray(grad(L.listwise_kl, 3)(q, p, n, t)))
    for fn in (L.embedding_mse, L.embedding_cosine, L.similarity_mse):
        assert not np.any(np.asarray(grad(fn, 1)(a, b)))


# ---------------------------------------------------------------- invariances from first principles


def pairs_with_cosines(c):
    """(a, b), (B, D), with cos(a_i, b_i) = c_i exactly (b_i at angle arccos c_i from a_i)."""
    c = np.asarray(c, np.float64)
    a = np.zeros((len(c), D))
    a[:, 0] = 2.0
    b = np.zeros((len(c), D))
    b[:, 0], b[:, 1] = 3.0 * c, 3.0 * np.sqrt(1 - c ** 2)
    return a.astype(np.float32), b.astype(np.float32)


def test_pearson_invariances():
    y = np.array([0.0, 1.2, 2.5, 3.1, 4.0, 5.0], np.float32)
    a, b = pairs_with_cosines(0.9 * y / 5 - 0.3)           # cos = increasing affine map of y
    assert float(L.pearson_loss(a, b, y)) == pytest.approx(0.0, abs=1e-5)
    a_rev, b_rev = pairs_with_cosines(0.3 - 0.9 * y / 5)   # decreasing: perfectly anti-correlated
    assert float(L.pearson_loss(a_rev, b_rev, y)) == pytest.approx(2.0, abs=1e-5)
    a, b, y = rand(B, D), rand(B, D), labels()
    base = float(L.pearson_loss(a, b, y))
    assert 0.0 < base < 2.0
    for c, d in [(0.2, 0.0), (100.0, -7.0), (1 / 5, 0.5)]:
        assert float(L.pearson_loss(a, b, c * y + d)) == pytest.approx(base, rel=1e-5)
    assert float(L.pearson_loss(a, b, -y)) == pytest.approx(2.0 - base, rel=1e-5)


def test_pearson_constant_batch_is_finite():
    a, b = rand(B, D), rand(B, D)
    y = np.full(B, 3.0, np.float32)
    value, grads = value_and_grad(L.pearson_loss, (0, 1))(a, b, y)
    assert float(value) == pytest.approx(1.0)
    assert all(np.all(np.asarray(g) == 0) for g in grads)
    same = np.tile(rand(1, D), (B, 1))  # constant similarities (all pairs identical)
    value, g = value_and_grad(L.pearson_loss)(same, same, labels())
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g)))
    value, g = value_and_grad(L.rank_consistency_loss)(a, b, y)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(g)))


def test_rank_consistency_zero_iff_distributions_match():
    y = np.array([0.4, 2.0, 1.1, 4.8, 3.3, 2.9], np.float32)
    u = np.asarray(average_rank_scores(jnp.asarray(y)))
    # scale * cos = u / t + const  <=>  cos = u - 0.5 when scale = 1 / t = 20.
    a, b = pairs_with_cosines(u - 0.5)
    assert float(L.rank_consistency_loss(a, b, y)) == pytest.approx(0.0, abs=1e-6)
    # the right order but the wrong spread: > 0
    a2, b2 = pairs_with_cosines(0.5 * (u - 0.5))
    assert float(L.rank_consistency_loss(a2, b2, y)) > 1e-3

    def swapped(i, j):
        v = u.copy()
        v[[i, j]] = v[[j, i]]
        return float(L.rank_consistency_loss(*pairs_with_cosines(v - 0.5), y))

    # Swapping the top two pairs costs much more than the bottom two: at temperature 0.05 the
    # target puts almost all of its mass on the highest-ranked pairs.
    top, bottom = swapped(3, 4), swapped(0, 2)
    assert top > 1e-2 and 0 < bottom < top / 100


def test_rank_consistency_label_scale():
    a, b, y = rand(B, D), rand(B, D), labels()
    rank = float(L.rank_consistency_loss(a, b, y))
    assert float(L.rank_consistency_loss(a, b, np.exp(y))) == pytest.approx(rank, rel=1e-6)  # any monotone map
    mm = float(L.rank_consistency_loss(a, b, y, label_normalization="minmax"))
    assert float(L.rank_consistency_loss(a, b, 3 * y + 1, label_normalization="minmax")) == pytest.approx(mm, rel=1e-5)
    assert float(L.rank_consistency_loss(a, b, np.exp(y), label_normalization="minmax")) != pytest.approx(mm, rel=1e-3)


def test_similarity_mse_is_rotation_and_scale_invariant():
    """Only the batch geometry matters: a rotated, rescaled copy of the teacher in a wider space
    scores 0, and the student may be narrower than the teacher."""
    t = rand(B, D)
    rot, _ = np.linalg.qr(RNG.standard_normal((2 * D, 2 * D)))
    wide = (np.pad(t, ((0, 0), (0, D))) @ rot * 2.5).astype(np.float32)
    assert float(L.similarity_mse(t, wide)) == pytest.approx(0.0, abs=1e-10)
    assert float(L.similarity_mse(rand(B, D), wide)) > 1e-2


# ---------------------------------------------------------------- dtypes, jit, bad input


def test_bf16_and_jit():
    a, b, y = rand(B, D), rand(B, D), labels()
    q, p, n, t = rand(B, D), rand(B, D), rand(B, K, D), rand(B, 1 + K)
    calls = {
        "pearson": (L.pearson_loss, (a, b, y)),
        "rank": (L.rank_consistency_loss, (a, b, y)),
        "margin": (L.margin_mse, (q, p, n, t)),
        "listwise": (L.listwise_kl, (q, p, n, t)),
        "mse": (L.embedding_mse, (a, b)),
        "cos": (L.embedding_cosine, (a, b)),
        "sim": (L.similarity_mse, (a, rand(B, 2 * D))),
    }
    for name, (fn, args) in calls.items():
        ref = float(fn(*args))
        jitted = jax.jit(fn)(*args)
        assert float(jitted) == pytest.approx(ref, rel=1e-5), name
        bf = fn(*[jnp.asarray(x, jnp.bfloat16) if x.ndim >= 2 else x for x in args])
        assert bf.dtype == jnp.float32, name
        # bf16 rounding of the inputs only (~3 significant digits)
        rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) if x.ndim >= 2 else x for x in args]
        assert float(bf) == pytest.approx(float(fn(*rounded)), rel=1e-4, abs=1e-6), name


def test_bad_input_errors():
    with pytest.raises(ValueError, match="similarity_mse"):
        L.embedding_mse(rand(3, 4), rand(3, 8))
    with pytest.raises(ValueError, match="similarity_mse"):
        L.embedding_cosine(rand(3, 4), rand(3, 8))
    with pytest.raises(ValueError, match="same texts"):
        L.similarity_mse(rand(3, 4), rand(4, 8))
    with pytest.raises(ValueError, match=r"\(4, 3\) scores"):
        L.margin_mse(rand(4, 5), rand(4, 5), rand(4, 2, 5), rand(4, 5))
    with pytest.raises(ValueError, match="negatives"):
        L.margin_mse(rand(4, 5), rand(4, 5), None, rand(4, 2))
    with pytest.raises(ValueError, match=r"\(4, 3\)"):
        L.listwise_kl(rand(4, 5), rand(4, 5), rand(4, 2, 5), rand(4, 2))
    with pytest.raises(ValueError, match="labels must have shape"):
        L.pearson_loss(rand(4, 5), rand(4, 5), rand(3))
    with pytest.raises(ValueError, match="label_normalization"):
        L.rank_consistency_loss(rand(4, 5), rand(4, 5), rand(4), label_normalization="zscore")


# ---------------------------------------------------------------- composition with the wrappers


DIMS = (8, 4, 2)


def test_matryoshka_composition():
    a, b, y = rand(B, D), rand(B, D), labels()
    for fn in (L.pearson_loss, L.rank_consistency_loss):
        want = sum(float(fn(a[:, :d], b[:, :d], y)) for d in DIMS)
        assert float(L.matryoshka(fn, DIMS)(a, b, y)) == pytest.approx(want, rel=1e-5)
    q, p, n, t = rand(B, D), rand(B, D), rand(B, K, D), rand(B, 1 + K)
    want = sum(float(L.margin_mse(q[:, :d], p[:, :d], n[..., :d], t)) for d in DIMS)
    assert float(L.matryoshka(L.margin_mse, DIMS)(q, p, n, t)) == pytest.approx(want, rel=1e-5)
    # a narrower student against a wider teacher: only the student (width D) is sliced
    wide = rand(B, 2 * D)
    want = sum(float(L.similarity_mse(a[:, :d], wide)) for d in DIMS)
    assert float(L.matryoshka(L.similarity_mse, DIMS)(a, wide)) == pytest.approx(want, rel=1e-5)


def test_adaptive_layer_composition():
    """adaptive_layer with the KL term off: L(last) + sum_p w(depth_p) / n * L(layer p)."""
    n_stack = 4
    la, lb, y = rand(n_stack, B, D), rand(n_stack, B, D), labels()
    for fn in (L.pearson_loss, L.rank_consistency_loss):
        got = L.adaptive_layer(fn, n_layers_per_step=None, kl_temperature=0.0, layer_weighting="inverse")(la, lb, y)
        students = range(n_stack - 1)
        want = float(fn(la[-1], lb[-1], y)) + sum(
            float(fn(la[p], lb[p], y)) / (1 + (p + 1)) / len(students) for p in students)
        assert float(got) == pytest.approx(want, rel=1e-5)
    # and over a Matryoshka of the Pearson loss (2D Matryoshka), still the hand sum
    got = L.adaptive_layer(L.matryoshka(L.pearson_loss, DIMS[1:]), n_layers_per_step=None, kl_temperature=0.0,
                           layer_weighting="uniform")(la, lb, y)
    per_layer = [sum(float(L.pearson_loss(la[p, :, :d], lb[p, :, :d], y)) for d in DIMS[1:]) for p in range(n_stack)]
    want = per_layer[-1] + sum(per_layer[:-1]) / (n_stack - 1)
    assert float(got) == pytest.approx(want, rel=1e-5)
