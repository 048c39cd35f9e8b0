"""Matryoshka, AdaptiveLayer and Matryoshka2d against sentence-transformers itself.

Both sides run all-MiniLM-L6-v2 with the same weights (dropout off) on the same token ids of 12
STS-B train pairs. sentence-transformers computes its loss and, by ``backward``, the gradient of a
few encoder weights; embedjax computes its loss of the per-layer embedding stacks and the gradient
through its own encoder (``jax.value_and_grad`` of the loss w.r.t. the stacks, pulled back through
``embed`` by one VJP of the encoder). Layer / dim sampling is pinned: embedjax's draw for a key is
handed to sentence-transformers by replacing the ``random`` its loss module samples with.

The checkpoint ends in a Normalize module, so sentence-transformers' losses (and its KL term) see
unit vectors: embedjax is given ``embed(..., normalize=True)`` stacks to match. Stack entry 0 is
the embedding-layer output, which sentence-transformers' AdaptiveLayerLoss uses as a student
(layer index 0): ``embedding_layer=True`` on our side.
"""
import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentence_transformers.sentence_transformer.losses as stl  # the `test` extra: imported, never skipped
import torch

from embedjax import hf
from embedjax import losses as L
from embedjax.data import read_stsb
from embedjax.embed import embed

pytestmark = pytest.mark.fast_compile  # small inputs against references: compile-bound (conftest.py)

ST_MATRYOSHKA = sys.modules[stl.MatryoshkaLoss.__module__]
ST_ADAPTIVE = sys.modules[stl.AdaptiveLayerLoss.__module__]

N_PAIRS = 12
DIMS = (64, 384, 128, 256, 32)              # unsorted on purpose: ST sorts dims with their weights
WEIGHTS = (0.4, 1.0, 0.6, 0.8, 0.2)
DESC_DIMS = (384, 256, 128, 64, 32)        # ST's order: index i means the same dim on both sides
DESC_WEIGHTS = (1.0, 0.8, 0.6, 0.4, 0.2)

# torch name -> the same tensor in embedjax's gradient pytree (torch Linear weights are (out, in)).
SELECTED = {
    "encoder.layer.0.attention.self.query.weight": lambda g: g["layers"]["attention"]["query"]["kernel"][0].T,
    "encoder.layer.5.output.dense.weight": lambda g: g["layers"]["mlp"]["down"]["kernel"][5].T,
    "embeddings.LayerNorm.weight": lambda g: g["embeddings"]["norm"]["scale"],
}

VALUE_RTOL = 1e-4


class Case:
    """The shared batch, model and helpers (one per module)."""

    def __init__(self, st, enc, pairs):
        self.st = st
        self.enc = enc
        self.a = [p.text_a for p in pairs]
        self.b = [p.text_b for p in pairs]
        self.y_t = torch.tensor([p.score for p in pairs], dtype=torch.float32)
        self.y = jnp.asarray(self.y_t.numpy())
        self.fa, self.fb = st.preprocess(self.a), st.preprocess(self.b)
        self.n_hidden = enc.cfg.num_layers + 1  # hidden states: embedding output + every layer
        self.params_t = {n: p for n, p in st[0].auto_model.named_parameters() if n in SELECTED}
        assert set(self.params_t) == set(SELECTED)

        def inputs(f):
            return tuple(jnp.asarray(f[k].numpy()) for k in ("input_ids", "attention_mask", "token_type_ids"))

        ia, ib = inputs(self.fa), inputs(self.fb)

        def stacks(params):
            return tuple(
                embed(params, enc.cfg, ids, mask, token_type_ids=types_, pooling=enc.pooling,
                      normalize=True, per_layer=True)
                for ids, mask, types_ in (ia, ib)
            )

        self.stacks, vjp = jax.vjp(jax.jit(stacks), enc.params)  # one encoder forward for all tests
        self.pullback = lambda ct: vjp(ct)[0]

    # -- sentence-transformers
    def st_value(self, loss):
        with torch.no_grad():
            return float(loss([dict(self.fa), dict(self.fb)], self.y_t))

    def st_value_and_grads(self, loss):
        self.st.zero_grad(set_to_none=True)
        value = loss([dict(self.fa), dict(self.fb)], self.y_t)
        value.backward()
        grads = {n: p.grad.detach().numpy().copy() for n, p in self.params_t.items()}
        self.st.zero_grad(set_to_none=True)
        return float(value.detach()), grads

    # -- embedjax: ``fn(za_stack, zb_stack, labels, **kw)`` with (L, B, D) stacks
    def ours_value(self, fn, **kw):
        za, zb = self.stacks
        return float(fn(za, zb, self.y, **kw))

    def ours_value_and_grads(self, fn, **kw):
        value, ct = jax.value_and_grad(lambda zs: fn(zs[0], zs[1], self.y, **kw))(self.stacks)
        g = self.pullback(ct)
        return float(value), {n: np.asarray(get(g)) for n, get in SELECTED.items()}


def assert_grads_close(ours, theirs, zero=()):
    """Selected gradients agree; those named in ``zero`` are exactly zero on both sides."""
    for name, want in theirs.items():
        if name in zero:
            assert not np.any(want) and not np.any(ours[name]), name
            continue
        scale = np.abs(want).max()
        assert scale > 0, f"{name}: sentence-transformers' gradient is zero (vacuous comparison)"
        np.testing.assert_allclose(ours[name], want, rtol=1e-3, atol=1e-4 * scale, err_msg=name)


def assert_same(case, st_loss, ours, zero=(), **kw):
    """Value and selected gradients agree."""
    v_st, g_st = case.st_value_and_grads(st_loss)
    v, g = case.ours_value_and_grads(ours, **kw)
    np.testing.assert_allclose(v, v_st, rtol=VALUE_RTOL)
    assert_grads_close(g, g_st, zero)
    return v, g


def last(fn):
    """A loss of the last layer only, as a function of stacks."""
    return lambda za, zb, y, **kw: fn(za[-1], zb[-1], y, **kw)


def no_embedding_layer(fn):
    """What embedjax's training objective passes by default: the stacks without entry 0."""
    return lambda za, zb, y, **kw: fn(za[1:], zb[1:], y, **kw)


def pinned(expected_population, picks):
    """A stand-in for ST's ``random`` module whose ``sample`` returns ``picks``."""
    calls = []

    def sample(population, k):
        assert list(population) == list(expected_population)
        assert k == len(picks)
        calls.append(k)
        return list(picks)

    return types.SimpleNamespace(sample=sample), calls


@pytest.fixture(scope="module")
def case(st_minilm, minilm, minilm_path, stsb_dir):
    assert hf.read_sentence_transformers(minilm_path).normalize  # why the stacks are normalised
    rows = read_stsb(stsb_dir / "sts-train.csv")
    pairs, seen = [], set()
    for row in rows[::97]:  # spread over the genres; no text twice (in-batch negatives are genuine)
        if len(pairs) < N_PAIRS and not {row.text_a, row.text_b} & seen:
            pairs.append(row)
            seen |= {row.text_a, row.text_b}
    texts = [p.text_a for p in pairs] + [p.text_b for p in pairs]
    assert len(set(texts)) == len(texts)  # in-batch negatives are all genuine
    assert len({p.score for p in pairs}) > N_PAIRS // 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: 1 thread is much faster than 2 on a shared CPU
    st_minilm.eval()  # dropout off, as embedjax without a dropout key
    c = Case(st_minilm, minilm, pairs)
    # Same model, same ids: the last layer's embeddings agree before any loss is compared.
    with torch.no_grad():
        za_t = st_minilm(dict(c.fa))["sentence_embedding"].numpy()
    np.testing.assert_allclose(np.asarray(c.stacks[0][-1]), za_t, atol=2e-5)
    yield c
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- MatryoshkaLoss


INNER = {
    "cosent": (stl.CoSENTLoss, L.cosent),
    "mnrl": (stl.MultipleNegativesRankingLoss, lambda a, b, y: L.infonce(a, b)),
    "angle": (stl.AnglELoss, functools.partial(L.angle_loss, cosine_w=0.0, ibn_w=0.0, angle_w=1.0)),
}


@pytest.mark.parametrize("inner", sorted(INNER))
def test_matryoshka_vs_st(case, inner):
    st_inner, ours_inner = INNER[inner]
    st_loss = stl.MatryoshkaLoss(case.st, st_inner(case.st), list(DIMS), list(WEIGHTS))
    ours = last(L.matryoshka(ours_inner, DIMS, WEIGHTS))
    if inner == "angle":  # its gradient path is CoSENT's; the value shows ST's re-normalisation is moot
        v = case.ours_value(ours)
        np.testing.assert_allclose(v, case.st_value(st_loss), rtol=VALUE_RTOL)
    else:
        v, _ = assert_same(case, st_loss, ours)
    # Discriminating: the weights are paired with their dims (ST sorts both together).
    wrong = last(L.matryoshka(ours_inner, DIMS, DESC_WEIGHTS))
    assert abs(case.ours_value(wrong) - v) > 1e-3 * abs(v)


def test_matryoshka_prefix_renormalisation_vs_st(case):
    """Documented difference: ST L2-normalises each prefix before the inner loss, we only slice.
    With a dot-product CoSENT, ST's loss is therefore our cosine one, not our dot one."""
    from sentence_transformers import util

    st_loss = stl.MatryoshkaLoss(case.st, stl.CoSENTLoss(case.st, similarity_fct=util.pairwise_dot_score),
                                 list(DIMS), list(WEIGHTS))
    v_st = case.st_value(st_loss)
    cosine = last(L.matryoshka(functools.partial(L.cosent, similarity="cosine"), DIMS, WEIGHTS))
    dot = last(L.matryoshka(functools.partial(L.cosent, similarity="dot"), DIMS, WEIGHTS))
    np.testing.assert_allclose(case.ours_value(cosine), v_st, rtol=VALUE_RTOL)
    assert abs(case.ours_value(dot) - v_st) > 1e-3 * abs(v_st)


def test_matryoshka_sampled_dims_vs_st(case, monkeypatch):
    n = 2
    ours = last(L.matryoshka(L.cosent, DESC_DIMS, DESC_WEIGHTS, n_dims_per_step=n))
    st_loss = stl.MatryoshkaLoss(case.st, stl.CoSENTLoss(case.st), list(DESC_DIMS), list(DESC_WEIGHTS),
                                 n_dims_per_step=n)
    draws, values = set(), set()
    for seed in range(2):
        key = jax.random.key(seed)
        picks = [int(i) for i in L.sample_dims(key, len(DESC_DIMS), n)]
        fake, calls = pinned(range(len(DESC_DIMS)), picks)
        monkeypatch.setattr(ST_MATRYOSHKA, "random", fake)
        if seed == 0:
            v, _ = assert_same(case, st_loss, ours, key=key)
        else:
            v = case.ours_value(ours, key=key)
            np.testing.assert_allclose(v, case.st_value(st_loss), rtol=VALUE_RTOL)
        assert calls, "sentence-transformers did not sample dims"
        draws.add(tuple(sorted(picks)))
        values.add(round(v, 5))
    assert len(draws) > 1 and len(values) > 1


# ---------------------------------------------------------------- AdaptiveLayerLoss

# Same weighting, two names: ST's "linear" is 1 / (1 + layer index) = embedjax's "inverse".
WEIGHTING = {"uniform": "uniform", "linear": "inverse", "log": "log"}
ADAPTIVE_KW = dict(last_layer_weight=1.5, prior_layers_weight=0.7, kl_div_weight=2.0, kl_temperature=0.3)


@pytest.mark.parametrize("st_weighting", sorted(WEIGHTING))
def test_adaptive_layer_all_layers_vs_st(case, st_weighting):
    st_loss = stl.AdaptiveLayerLoss(case.st, stl.CoSENTLoss(case.st), n_layers_per_step=-1,
                                    layer_weighting=st_weighting, **ADAPTIVE_KW)
    ours = L.adaptive_layer(L.cosent, n_layers_per_step=-1, layer_weighting=WEIGHTING[st_weighting],
                            embedding_layer=True, **ADAPTIVE_KW)
    v, g = assert_same(case, st_loss, ours)
    if st_weighting == "uniform":
        # ST detaches the KL teacher: not detaching gives the same value, other gradients.
        live = L.adaptive_layer(L.cosent, n_layers_per_step=-1, layer_weighting="uniform",
                                embedding_layer=True, detach_teacher=False, **ADAPTIVE_KW)
        v_live, g_live = case.ours_value_and_grads(live)
        np.testing.assert_allclose(v_live, v, rtol=1e-6)
        name = "encoder.layer.5.output.dense.weight"
        assert not np.allclose(g_live[name], g[name], rtol=1e-3, atol=1e-4 * np.abs(g[name]).max())


@pytest.mark.parametrize("kl_temperature", [0.3, 0.05])
def test_adaptive_layer_kl_term_vs_st(case, kl_temperature):
    """The KL term alone (task weights 0): on unit vectors it is a small part of the full loss,
    so it gets its own comparison, value and gradient (the teacher detached on both sides)."""
    kw = dict(last_layer_weight=0.0, prior_layers_weight=0.0, kl_div_weight=1.0, kl_temperature=kl_temperature)
    st_loss = stl.AdaptiveLayerLoss(case.st, stl.CoSENTLoss(case.st), n_layers_per_step=-1, **kw)
    ours = L.adaptive_layer(L.cosent, n_layers_per_step=-1, embedding_layer=True, **kw)
    # The last layer only feeds the (detached) teacher: no gradient reaches its weights.
    v, _ = assert_same(case, st_loss, ours, zero=("encoder.layer.5.output.dense.weight",))
    assert v > 0


def test_adaptive_layer_kl_sees_the_embeddings_as_passed(case):
    """Documented difference: ST's KL term is on its model's outputs, unit vectors for this
    checkpoint (Normalize module). Rescaling each row (what un-normalised pooled vectors are)
    leaves the cosine task terms equal to ST's and changes only the KL term."""
    rng = np.random.default_rng(0)
    za, zb = case.stacks
    norms = [jnp.asarray(rng.uniform(2.0, 8.0, size=z.shape[:-1] + (1,)), jnp.float32) for z in (za, zb)]
    ra, rb = za * norms[0], zb * norms[1]

    def both(**kw):
        st_loss = stl.AdaptiveLayerLoss(case.st, stl.CoSENTLoss(case.st), n_layers_per_step=-1,
                                        layer_weighting="uniform", **dict(ADAPTIVE_KW, **kw))
        ours = L.adaptive_layer(L.cosent, n_layers_per_step=-1, layer_weighting="uniform", embedding_layer=True,
                                **dict(ADAPTIVE_KW, **kw))
        return case.st_value(st_loss), float(ours(ra, rb, case.y))

    v_st, v = both(kl_temperature=0.0)
    np.testing.assert_allclose(v, v_st, rtol=VALUE_RTOL)
    v_st, v = both()
    assert abs(v - v_st) > 1e-3 * abs(v_st)
    np.testing.assert_allclose(case.ours_value(L.adaptive_layer(
        L.cosent, n_layers_per_step=-1, layer_weighting="uniform", embedding_layer=True, **ADAPTIVE_KW)),
        v_st, rtol=VALUE_RTOL)


def test_adaptive_layer_sampled_vs_st(case, monkeypatch):
    n = 2
    kw = dict(ADAPTIVE_KW, kl_temperature=0.5)
    st_loss = stl.AdaptiveLayerLoss(case.st, stl.CoSENTLoss(case.st), n_layers_per_step=n,
                                    layer_weighting="linear", **kw)
    ours = L.adaptive_layer(L.cosent, n_layers_per_step=n, layer_weighting="inverse",
                            embedding_layer=True, **kw)
    draws, values = set(), set()
    for seed in range(2):
        key = jax.random.key(seed)
        picks = [int(i) for i in L.sample_layers(key, case.n_hidden - 1, n)]
        fake, calls = pinned(range(case.n_hidden - 1), picks)
        monkeypatch.setattr(ST_ADAPTIVE, "random", fake)
        if seed == 0:
            v, _ = assert_same(case, st_loss, ours, key=key)
        else:
            v = case.ours_value(ours, key=key)
            np.testing.assert_allclose(v, case.st_value(st_loss), rtol=VALUE_RTOL)
        assert calls, "sentence-transformers did not sample layers"
        draws.add(tuple(sorted(picks)))
        values.add(round(v, 5))
    assert len(draws) > 1 and len(values) > 1


def test_adaptive_layer_without_embedding_layer_is_st_without_layer_0(case, monkeypatch):
    """Documented difference: embedjax's objective drops stack entry 0 (embedding_layer=False);
    that is ST with the embedding output removed from the candidate students, nothing else."""
    n_students = case.n_hidden - 2  # the transformer layers below the last
    fake, calls = pinned(range(case.n_hidden - 1), list(range(1, n_students + 1)))
    monkeypatch.setattr(ST_ADAPTIVE, "random", fake)
    st_loss = stl.AdaptiveLayerLoss(case.st, stl.CoSENTLoss(case.st), n_layers_per_step=n_students,
                                    layer_weighting="linear", **ADAPTIVE_KW)
    ours = no_embedding_layer(L.adaptive_layer(L.cosent, n_layers_per_step=None, **ADAPTIVE_KW))
    v, _ = assert_same(case, st_loss, ours)
    assert calls
    monkeypatch.undo()
    # ...and it is a real difference: ST over all its candidates (embedding output included).
    st_all = stl.AdaptiveLayerLoss(case.st, stl.CoSENTLoss(case.st), n_layers_per_step=-1,
                                   layer_weighting="linear", **ADAPTIVE_KW)
    assert abs(case.st_value(st_all) - v) > 1e-3 * abs(v)


def test_layer_weighting_names_vs_st(case):
    """Documented difference: embedjax's "linear" is (N - d) / N; ST's "linear" is embedjax's
    "inverse". ST reproduces ours through a callable weighting."""
    n = case.n_hidden - 1  # the teacher's depth
    ours = L.adaptive_layer(L.cosent, n_layers_per_step=-1, layer_weighting="linear",
                            embedding_layer=True, **ADAPTIVE_KW)
    st_callable = stl.AdaptiveLayerLoss(case.st, stl.CoSENTLoss(case.st), n_layers_per_step=-1,
                                        layer_weighting=lambda i: (n - i) / n, **ADAPTIVE_KW)
    st_linear = stl.AdaptiveLayerLoss(case.st, stl.CoSENTLoss(case.st), n_layers_per_step=-1,
                                      layer_weighting="linear", **ADAPTIVE_KW)
    v = case.ours_value(ours)
    np.testing.assert_allclose(v, case.st_value(st_callable), rtol=VALUE_RTOL)
    assert abs(case.st_value(st_linear) - v) > 1e-3 * abs(v)


def test_adaptive_layer_zero_layers_per_step_means_all_as_st(case):
    st_loss = stl.AdaptiveLayerLoss(case.st, stl.CoSENTLoss(case.st), n_layers_per_step=0,
                                    layer_weighting="log", **ADAPTIVE_KW)
    ours = L.adaptive_layer(L.cosent, n_layers_per_step=0, layer_weighting="log", embedding_layer=True,
                            **ADAPTIVE_KW)
    np.testing.assert_allclose(case.ours_value(ours), case.st_value(st_loss), rtol=VALUE_RTOL)


# ---------------------------------------------------------------- Matryoshka2dLoss


def test_matryoshka2d_vs_st(case, monkeypatch):
    """embedjax's ``adaptive_layer(matryoshka(...))`` = Matryoshka2dLoss with every dim per layer
    (``n_dims_per_step=-1``; ST's default samples one dim per layer call, see the next test)."""
    n = 2
    kw = dict(last_layer_weight=1.2, prior_layers_weight=1.5, kl_div_weight=0.5, kl_temperature=0.4)
    st_loss = stl.Matryoshka2dLoss(case.st, stl.CoSENTLoss(case.st), list(DIMS), list(WEIGHTS),
                                   n_layers_per_step=n, n_dims_per_step=-1, layer_weighting="log", **kw)
    ours = L.adaptive_layer(L.matryoshka(L.cosent, DIMS, WEIGHTS), n_layers_per_step=n, layer_weighting="log",
                            embedding_layer=True, **kw)
    key = jax.random.key(1)
    picks = [int(i) for i in L.sample_layers(key, case.n_hidden - 1, n)]
    fake, calls = pinned(range(case.n_hidden - 1), picks)
    monkeypatch.setattr(ST_ADAPTIVE, "random", fake)
    assert_same(case, st_loss, ours, key=key)
    assert calls


def test_matryoshka2d_st_default_samples_dims_per_layer_call(case, monkeypatch):
    """Documented difference: ST's Matryoshka2dLoss defaults to ``n_dims_per_step=1``, a dim drawn
    for each layer's loss; embedjax uses every dim of its ``matryoshka`` inner loss. With ST's draw
    pinned to one dim, ours over that single dim is the same loss."""
    j = 2
    st_loss = stl.Matryoshka2dLoss(case.st, stl.CoSENTLoss(case.st), list(DESC_DIMS), list(DESC_WEIGHTS),
                                   n_layers_per_step=-1, layer_weighting="linear")
    fake, calls = pinned(range(len(DESC_DIMS)), [j])
    monkeypatch.setattr(ST_MATRYOSHKA, "random", fake)
    ours = L.adaptive_layer(L.matryoshka(L.cosent, DESC_DIMS[j:j + 1], DESC_WEIGHTS[j:j + 1]),
                            n_layers_per_step=-1, layer_weighting="inverse", embedding_layer=True)
    v_st = case.st_value(st_loss)
    np.testing.assert_allclose(case.ours_value(ours), v_st, rtol=VALUE_RTOL)
    assert len(calls) == case.n_hidden  # one draw per layer call: the last layer + every student
    every_dim = L.adaptive_layer(L.matryoshka(L.cosent, DESC_DIMS, DESC_WEIGHTS), n_layers_per_step=-1,
                                 layer_weighting="inverse", embedding_layer=True)
    assert abs(case.ours_value(every_dim) - v_st) > 1e-3 * abs(v_st)
