"""Cross-encoder losses (embedjax/losses/rerank.py) against naive NumPy loops written here (values,
and gradients by central differences of the loops) and against sentence-transformers' CrossEncoder
losses, driven by a stand-in model whose pair scores are a table (values and gradients)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder as STCrossEncoder
from sentence_transformers.cross_encoder import losses as st_losses

from embedjax.losses import rerank

RNG = np.random.default_rng(0)
SIZES = [5, 3, 4, 2]  # candidates per group: groups padded to 5
Q, C = len(SIZES), max(SIZES)
MASK = np.arange(C)[None, :] < np.array(SIZES)[:, None]
LOGITS = RNG.normal(0, 2, (Q, C))
GRADES = RNG.integers(0, 4, (Q, C)).astype(float)  # graded relevance 0-3
BINARY = RNG.integers(0, 2, (Q, C)).astype(float)
TEACHER = RNG.normal(0, 3, (Q, C))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def log_softmax(z):
    z = np.asarray(z, float)
    return z - z.max() - np.log(np.sum(np.exp(z - z.max())))


# --------------------------------------------------------------------------- naive references


def ref_bce(s, y, w=1.0):
    terms = [-(w * y[i, j] * np.log(sigmoid(s[i, j])) + (1 - y[i, j]) * np.log(1 - sigmoid(s[i, j])))
             for i in range(Q) for j in range(SIZES[i])]
    return np.mean(terms)


def ref_mse(s, y, activation):
    act = sigmoid if activation == "sigmoid" else (lambda x: x)
    return np.mean([(act(s[i, j]) - y[i, j]) ** 2 for i in range(Q) for j in range(SIZES[i])])


def ref_mnce(s, scale, activation):
    act = sigmoid if activation == "sigmoid" else (lambda x: x)
    return np.mean([-log_softmax([scale * act(s[i, j]) for j in range(SIZES[i])])[0] for i in range(Q)])


def ref_listnet(s, y):
    out = []
    for i in range(Q):
        n = SIZES[i]
        target = np.exp(log_softmax(y[i, :n]))
        out.append(-np.sum(target * log_softmax(s[i, :n])))
    return np.mean(out)


def ref_lambda(s, y, weighting, k=None, sigma=1.0, mu=10.0):
    total, count = 0.0, 0
    for i in range(Q):
        n = SIZES[i]
        order = sorted(range(n), key=lambda j: -s[i, j])  # rank r = 1.. by score
        ys = [max(y[i, j], 0.0) for j in order]
        ss = [s[i, j] for j in order]
        kk = C if k is None else min(k, C)
        disc = lambda r: math.log2(1 + r)  # noqa: E731  (r from 1)
        max_dcg = max(sum((2 ** g - 1) / disc(r + 1) for r, g in enumerate(sorted(ys, reverse=True)[:kk])), 1e-10)
        gain = [(2 ** g - 1) / max_dcg for g in ys]
        for a, b in itertools.product(range(n), range(n)):
            if not (a < kk or b < kk):
                continue
            if weighting != "ndcg_loss1" and not ys[a] > ys[b]:
                continue
            lambdarank = abs(1 / disc(a + 1) - 1 / disc(b + 1)) * abs(gain[a] - gain[b])
            d = abs(a - b)
            loss2 = (abs(1 / disc(d) - 1 / disc(d + 1)) if d else 0.0) * abs(gain[a] - gain[b])
            w = {"none": 1.0, "ndcg_loss1": gain[a] / disc(a + 1), "ndcg_loss2": loss2, "lambdarank": lambdarank,
                 "ndcg_loss2pp": mu * loss2 + lambdarank}[weighting]
            total += -w * math.log2(sigmoid(sigma * (ss[a] - ss[b])))
            count += 1
    return total / max(count, 1)


def ref_margin_mse(s, t):
    return np.mean([((s[i, 0] - s[i, j]) - (t[i, 0] - t[i, j])) ** 2 for i in range(Q) for j in range(1, SIZES[i])])


def ref_listwise_kl(s, t, scale, temperature):
    out = []
    for i in range(Q):
        n = SIZES[i]
        log_p = log_softmax(t[i, :n] / temperature)
        out.append(np.sum(np.exp(log_p) * (log_p - log_softmax(scale * s[i, :n]))))
    return np.mean(out)


def numeric_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        g[idx] = (f(up) - f(down)) / (2 * eps)
    return g


CASES = {
    "bce": (lambda s: rerank.binary_cross_entropy(s, BINARY, mask=MASK), lambda s: ref_bce(s, BINARY)),
    "bce_pos_weight": (lambda s: rerank.binary_cross_entropy(s, BINARY, mask=MASK, pos_weight=3.0),
                       lambda s: ref_bce(s, BINARY, 3.0)),
    "mse": (lambda s: rerank.score_mse(s, GRADES, mask=MASK), lambda s: ref_mse(s, GRADES, "identity")),
    "mse_sigmoid": (lambda s: rerank.score_mse(s, BINARY, mask=MASK, activation="sigmoid"),
                    lambda s: ref_mse(s, BINARY, "sigmoid")),
    "mnce": (lambda s: rerank.multiple_negatives_ce(s, mask=MASK), lambda s: ref_mnce(s, 1.0, "identity")),
    "mnce_st": (lambda s: rerank.multiple_negatives_ce(s, mask=MASK, scale=10.0, activation="sigmoid"),
                lambda s: ref_mnce(s, 10.0, "sigmoid")),
    "listnet": (lambda s: rerank.listnet(s, GRADES, mask=MASK), lambda s: ref_listnet(s, GRADES)),
    **{f"lambda_{w}": (lambda s, w=w: rerank.lambda_loss(s, GRADES, mask=MASK, weighting=w),
                       lambda s, w=w: ref_lambda(s, GRADES, w)) for w in rerank.LAMBDA_WEIGHTINGS},
    "lambda_k2_sigma2": (lambda s: rerank.lambda_loss(s, GRADES, mask=MASK, k=2, sigma=2.0),
                         lambda s: ref_lambda(s, GRADES, "ndcg_loss2pp", k=2, sigma=2.0)),
    "margin_mse": (lambda s: rerank.margin_mse(s, TEACHER, mask=MASK), lambda s: ref_margin_mse(s, TEACHER)),
    "listwise_kl": (lambda s: rerank.listwise_kl(s, TEACHER, mask=MASK, scale=2.0, teacher_temperature=3.0),
                    lambda s: ref_listwise_kl(s, TEACHER, 2.0, 3.0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradient_match_the_naive_loop(name):
    ours, reference = CASES[name]
    logits = LOGITS.copy()
    logits[~MASK] = 1e3  # padding must not matter, however large
    value, grad = jax.value_and_grad(lambda s: ours(s))(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(float(value), reference(LOGITS), rtol=1e-5, atol=1e-6)
    expected = numeric_grad(reference, LOGITS)
    np.testing.assert_allclose(np.asarray(grad)[MASK], expected[MASK], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[~MASK], 0.0)
    assert np.abs(expected).max() > 1e-3  # the check has something to check


# --------------------------------------------------------------------------- sentence-transformers


class ScoreTable(STCrossEncoder):
    """A stand-in CrossEncoder: the score of pair ("q<i>", "d<i>_<j>") is logits[i, j], a parameter
    (a subclass, because some losses check the model's type; none of CrossEncoder's own setup runs)."""

    num_labels = 1
    device = torch.device("cpu")

    def __init__(self, logits):
        torch.nn.Module.__init__(self)
        self.logits = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def preprocess(self, pairs, prompt=None, task=None):
        rows = [(int(q[1:]), int(d.split("_")[1])) for q, d in pairs]
        return {"row": torch.tensor([r for r, _ in rows]), "col": torch.tensor([c for _, c in rows])}

    def forward(self, tokens):
        return {"scores": self.logits[tokens["row"], tokens["col"]][:, None]}


def st_value_and_grad(loss_cls, inputs, labels, **kw):
    model = ScoreTable(LOGITS)
    loss = loss_cls(model, **kw)(inputs, labels)
    loss.backward()
    return float(loss.detach()), model.logits.grad.numpy()


QUERIES = [f"q{i}" for i in range(Q)]
DOCS = [[f"d{i}_{j}" for j in range(n)] for i, n in enumerate(SIZES)]


@pytest.mark.parametrize("weighting, scheme", [("none", "NoWeightingScheme"), ("ndcg_loss1", "NDCGLoss1Scheme"),
                                               ("ndcg_loss2", "NDCGLoss2Scheme"), ("lambdarank", "LambdaRankScheme"),
                                               ("ndcg_loss2pp", "NDCGLoss2PPScheme")])
def test_lambda_loss_and_listnet_are_sentence_transformers(weighting, scheme):
    labels = [torch.tensor(GRADES[i, :n]) for i, n in enumerate(SIZES)]
    for k in (None, 2):
        value, grad = st_value_and_grad(st_losses.LambdaLoss, [QUERIES, DOCS], labels, k=k,
                                        weighting_scheme=getattr(st_losses, scheme)())
        ours, our_grad = jax.value_and_grad(
            lambda s: rerank.lambda_loss(s, GRADES, mask=MASK, weighting=weighting, k=k))(jnp.asarray(LOGITS))
        np.testing.assert_allclose(float(ours), value, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(our_grad)[MASK], grad[MASK], rtol=1e-4, atol=1e-6)
    value, grad = st_value_and_grad(st_losses.ListNetLoss, [QUERIES, DOCS], labels)
    ours, our_grad = jax.value_and_grad(lambda s: rerank.listnet(s, GRADES, mask=MASK))(jnp.asarray(LOGITS))
    np.testing.assert_allclose(float(ours), value, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(our_grad)[MASK], grad[MASK], rtol=1e-4, atol=1e-6)


def test_pointwise_and_margin_losses_are_sentence_transformers():
    pairs_q = [f"q{i}" for i in range(Q)]
    pairs_d = [f"d{i}_0" for i in range(Q)]
    first = np.zeros_like(MASK)
    first[:, 0] = True
    y = torch.tensor(BINARY[:, 0])
    for cls, ours in [(st_losses.BinaryCrossEntropyLoss, lambda s: rerank.binary_cross_entropy(s[:, 0], BINARY[:, 0])),
                      (st_losses.MSELoss, lambda s: rerank.score_mse(s[:, 0], BINARY[:, 0]))]:
        value, grad = st_value_and_grad(cls, [pairs_q, pairs_d], y)
        mine, my_grad = jax.value_and_grad(ours)(jnp.asarray(LOGITS))
        np.testing.assert_allclose(float(mine), value, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(my_grad)[first], grad[first], rtol=1e-4, atol=1e-7)
    # MarginMSE over full groups (sentence-transformers takes a fixed number of negatives)
    full = np.ones_like(MASK)
    columns = [pairs_q] + [[f"d{i}_{j}" for i in range(Q)] for j in range(C)]
    value, grad = st_value_and_grad(st_losses.MarginMSELoss, columns, torch.tensor(TEACHER))
    mine, my_grad = jax.value_and_grad(lambda s: rerank.margin_mse(s, TEACHER, mask=full))(jnp.asarray(LOGITS))
    np.testing.assert_allclose(float(mine), value, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(my_grad), grad, rtol=1e-4, atol=1e-7)


def test_bad_shapes_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        rerank.listnet(LOGITS, GRADES[:, :2])
    with pytest.raises(ValueError, match="weighting"):
        rerank.lambda_loss(LOGITS, GRADES, weighting="ndcg3")
    with pytest.raises(ValueError, match="activation"):
        rerank.score_mse(LOGITS, GRADES, activation="tanh")
    with pytest.raises(ValueError, match="at least one negative"):
        rerank.margin_mse(LOGITS[:, :1], TEACHER[:, :1])
