"""The ring in-batch loss (embedjax.losses.ring) against the gathered one on 8 simulated devices:
loss and gradients at float32 rtol 1e-6 with every option, the wrappers composed around it, and
its per-device memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from embedjax import losses as L
from embedjax.losses.ring import ring_infonce

pytestmark = pytest.mark.fast_compile  # checks equality, not speed (conftest.py)

ALL4 = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
B, M, K, D = 16, 2, 2, 8  # global batch over 8 devices: 2 queries a device


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8
    return jax.make_mesh((4, 2, 1), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)


def make_batch(seed=0, m=M, k=K):
    """Embeddings with positives near their anchors, duplicate texts across queries and devices,
    padded slots, qrels naming another query's positive, and a guide model of another width."""
    rng = np.random.default_rng(seed)
    rand = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    p = rand(B, m, D)
    a = p[:, 0] + 0.8 * rand(B, D)
    n = p[:, :1] + 1.2 * rand(B, k, D)
    a_ids, p_ids = np.arange(B) + 1000, np.arange(B * m).reshape(B, m)
    n_ids = 500 + np.arange(B * k).reshape(B, k)
    p[9, -1], p_ids[9, -1] = p[2, 0], p_ids[2, 0]  # one text, the positive of queries on two devices
    n[4, 0], n_ids[4, 0] = p[13, 0], p_ids[13, 0]  # a hard negative that is another query's positive
    a[11], a_ids[11] = a[3], a_ids[3]  # the same query text twice
    pmask = np.ones((B, m), bool)
    pmask[[1, 6, 14], -1] = False
    rel = np.stack([p_ids[:, 0], p_ids[(np.arange(B) + 5) % B, 0]], axis=1)
    rel_mask = np.zeros((B, 2), bool)
    rel_mask[:, 0] = rel_mask[::3, 1] = True
    guide = (a[:, :6] + 0.3 * rand(B, 6), p[..., :6] + 0.3 * rand(B, m, 6), n[..., :6] + 0.3 * rand(B, k, 6))
    ids = dict(anchor_ids=a_ids, positive_ids=p_ids, negative_ids=n_ids, relevant_ids=rel, relevant_mask=rel_mask)
    return a, p, n, pmask, ids, guide


CASES = {
    # one positive; every id mask; the four directions; hardness on in-batch negatives
    "m1_ids_all4_hard": dict(m1=True, ids=True, directions=ALL4, hardness=9.0, hardness_mode="in_batch_negatives"),
    # padded slots, qrels, one row per slot, four directions, an absolute margin
    "each_ids_all4_margin": dict(ids=True, directions=ALL4, fn_margin=-0.2),
    # multi-positive numerator (CoDiEmb), query_to_query, relative rule, hardness on hard negatives
    "all_ids_q2q_relative": dict(ids=True, all_positives=True, directions=ALL4[:2], fn_relative=0.95, scale=5.0,
                                 hardness=5.0, hardness_mode="hard_negatives"),
    # a guide with both rules, two directions
    "each_guide_rules_d2q": dict(ids=True, guide=True, directions=("query_to_doc", "doc_to_query"), fn_margin=-0.1,
                                 fn_relative=0.9, hardness=3.0),
    # multi-positive rows read the guide
    "all_guide": dict(guide=True, all_positives=True, fn_margin=0.1),
    # the symmetric variant with duplicate masks, no hard negatives
    "symmetric_ids": dict(m1=True, ids=True, symmetric=True, no_negatives=True),
    # only the query's own documents compete, dot product
    "own_documents_dot": dict(ids=True, in_batch_negatives=False, similarity="dot", scale=0.5),
    # no ids, no options: MultipleNegativesRankingLoss
    "plain": dict(m1=True),
}


def case_arguments(name):
    case = dict(CASES[name])
    a, p, n, pmask, ids, guide = make_batch()
    kw = {}
    if case.pop("m1", False):
        p, guide = p[:, 0], (guide[0], guide[1][:, 0], guide[2])
        ids = dict(ids, positive_ids=ids["positive_ids"][:, 0])
    else:
        kw["positive_mask"] = pmask
    if case.pop("no_negatives", False):
        n, guide = None, guide[:2] + (None,)
        ids.pop("negative_ids")
    if case.pop("ids", False):
        kw.update(ids)
    if case.pop("guide", False):
        kw["guide"] = guide
    kw.update(case)
    return (a, p, n), kw


def sharded(x, mesh):
    if x is None:
        return None
    return jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(("data", "fsdp"))))


def loss_and_grads(loss_fn, embeddings, kw, mesh):
    """Loss and gradients w.r.t. the embeddings (and the guide: none flows), the inputs sharded."""
    a, p, n = (sharded(x, mesh) for x in embeddings)
    kw = {key: (tuple(sharded(g, mesh) for g in v) if key == "guide" else sharded(v, mesh) if isinstance(v, np.ndarray)
                else v) for key, v in kw.items()}
    argnums = (0, 1) if n is None else (0, 1, 2)
    fn = jax.jit(jax.value_and_grad(lambda a, p, n: loss_fn(a, p, n, **kw), argnums=argnums))
    with jax.set_mesh(mesh):
        return fn(a, p, n)


@pytest.fixture(scope="module")
def one_device():
    return jax.make_mesh((1, 1, 1), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:1])


@pytest.mark.parametrize("name", sorted(CASES))
def test_ring_equals_gathered(name, mesh):
    """In column tiles (2 a block here; whole blocks are what the wrapper tests below and the float64
    test run): the loss at rtol 1e-6, the gradients as close to the float64 truth as the gathered
    loss's own float32 gradients (``as_accurate_as_gathered``)."""
    embeddings, kw = case_arguments(name)
    want_v, want_g = loss_and_grads(L.infonce, embeddings, kw, mesh)
    truth = float64_gradients(L.infonce, embeddings, kw, mesh)
    got_v, got_g = loss_and_grads(functools.partial(ring_infonce, tile_columns=4), embeddings, kw, mesh)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-6)
    as_accurate_as_gathered(got_g, want_g, truth)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in got_g)  # the gradients are not trivially zero


def float64_gradients(loss_fn, embeddings, kw, mesh):
    with jax.enable_x64(True):
        embeddings = tuple(None if x is None else x.astype(np.float64) for x in embeddings)
        return [np.asarray(g) for g in loss_and_grads(loss_fn, embeddings, kw, mesh)[1]]


def as_accurate_as_gathered(got_g, want_g, truth):
    """float32 gradients' distance from the float64 truth (``relative_to_scale``): the ring's within
    3x the gathered loss's own, or 2e-6 of the gradient's scale. Both sum the same terms in other
    orders (the ring folds each block into running log-sum-exps), and the gathered loss's own
    float32 error reaches 4e-6 of the scale in these cases; a wrong mask or target moves entries by
    1e-2 and more."""
    for g, w, t in zip(got_g, want_g, truth):
        assert relative_to_scale(g, t) <= max(2e-6, 3 * relative_to_scale(w, t))


def relative_to_scale(got, want):
    """Largest entry difference over the gradient's largest entry. A gradient entry is a sum of
    terms (softmax weight x similarity slope, scaled) that cancel, so float32 rounding of the terms
    is a fixed fraction of the gradient's scale, not of each (possibly tiny) entry."""
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_same(got_v, got_g, want_v, want_g, rtol=1e-6):
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=rtol)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=rtol * np.abs(np.asarray(w)).max())


def test_ring_equals_gathered_in_float64(mesh):
    """In float64 the two agree to 1e-12: what differs in float32 is only summation order."""
    embeddings, kw = case_arguments("each_guide_rules_d2q")
    with jax.enable_x64(True):
        embeddings = tuple(None if x is None else x.astype(np.float64) for x in embeddings)
        want_v, want_g = loss_and_grads(L.infonce, embeddings, kw, mesh)
        for tiles in (None, 4):
            got_v, got_g = loss_and_grads(functools.partial(ring_infonce, tile_columns=tiles), embeddings, kw, mesh)
            assert got_g[0].dtype == np.float64
            assert_same(got_v, got_g, want_v, want_g, rtol=1e-12)


def test_ring_is_not_the_local_loss(mesh):
    """The candidates really travel: the per-device (local negatives) loss differs from the ring's."""
    embeddings, kw = case_arguments("each_ids_all4_margin")
    ring, _ = loss_and_grads(ring_infonce, embeddings, kw, mesh)
    per_device = [float(L.infonce(*(x[2 * d: 2 * d + 2] for x in embeddings), **{
        key: v[2 * d: 2 * d + 2] if isinstance(v, np.ndarray) else v for key, v in kw.items()})) for d in range(8)]
    assert abs(float(ring) - np.mean(per_device)) > 1e-2


def check_close_to_gathered(got, want, one):
    """Loss at rtol 1e-6; gradients no further from the gathered ones (``relative_to_scale``) than
    float32 rounding moves the gathered loss itself between 1 and 8 devices, or 2e-6 of the scale:
    the floor ``as_accurate_as_gathered`` measures against float64 (the gathered loss's own float32
    gradients are up to 4e-6 of the scale from the truth)."""
    (got_v, got_g), (want_v, want_g), (one_v, one_g) = got, want, one
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-6)
    own_rounding = max(relative_to_scale(o, w) for o, w in zip(one_g, want_g))
    for g, w in zip(got_g, want_g):
        assert relative_to_scale(g, w) <= max(2e-6, 2 * own_rounding)


def test_matryoshka_composes(mesh, one_device):
    """Matryoshka prefixes call the ring on sliced embeddings."""
    embeddings, kw = case_arguments("each_ids_all4_margin")
    wrapped = lambda fn: L.matryoshka(fn, (4, 8))  # noqa: E731
    check_close_to_gathered(loss_and_grads(wrapped(ring_infonce), embeddings, kw, mesh),
                            loss_and_grads(wrapped(L.infonce), embeddings, kw, mesh),
                            loss_and_grads(wrapped(L.infonce), embeddings, kw, one_device))


def test_2d_matryoshka_composes(mesh, one_device):
    """2DMSE: the ring inside the wrapper's sampled layer and dim (``lax.switch``) on (layers, B, D) stacks."""
    (a, p, n), kw = case_arguments("symmetric_ids")
    rng = np.random.default_rng(3)
    wide = [np.concatenate([x, x[:, ::-1]], axis=1) for x in (a, p)]  # width 16: 2DMSE's dims are 8 < d < 16
    stacks = [np.stack([x + 0.5 * rng.standard_normal(x.shape).astype(np.float32) for _ in range(3)]) for x in wide]
    ids = {key: jnp.asarray(v) for key, v in kw.items() if key.endswith("_ids")}

    def run(loss_fn, on):
        stack = NamedSharding(on, P(None, ("data", "fsdp")))
        za, zb = (jax.device_put(jnp.asarray(x), stack) for x in stacks)
        fn = L.matryoshka_2d(lambda a, b, **k: loss_fn(a, b, symmetric=True, **k))
        grad = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, key=jax.random.key(5), **ids), argnums=(0, 1)))
        with jax.set_mesh(on):
            return grad(za, zb)

    check_close_to_gathered(run(ring_infonce, mesh), run(L.infonce, mesh), run(L.infonce, one_device))


def test_memory_stays_local(mesh):
    """Per-device temporaries of loss + gradient (XLA's memory analysis, global batch 8192 over 8
    devices, a positive and 2 hard negatives per query): the gathered loss holds (local x global)
    logit blocks, the ring a few (local x local) ones, and in column tiles less than one."""
    b, d = 8192, 16
    spec = jax.ShapeDtypeStruct((b, d), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    nspec = jax.ShapeDtypeStruct((b, 2, d), jnp.float32, sharding=NamedSharding(mesh, P(("data", "fsdp"))))

    def temp_bytes(loss_fn):
        fn = jax.jit(jax.grad(lambda a, p, n: loss_fn(a, p, n), argnums=(0, 1, 2)))
        with jax.set_mesh(mesh):
            return fn.lower(spec, spec, nspec).compile().memory_analysis().temp_size_in_bytes

    gathered, ring = temp_bytes(L.infonce), temp_bytes(functools.partial(ring_infonce, tile_columns=None))
    tiled = temp_bytes(functools.partial(ring_infonce, tile_columns=384))  # 8 tiles of 384 of the 3,072 columns
    local_block = (b // 8) * (3 * b // 8) * 4  # float32 logits of one device's rows against one device's candidates
    print(f"temporaries / local block: gathered {gathered / local_block:.2f}, ring {ring / local_block:.2f}, "
          f"ring in 8 tiles {tiled / local_block:.2f}")
    assert gathered >= 8 * local_block  # at least one (local x global) block
    assert ring <= 6 * local_block  # a few local blocks (logits, exponentials, their gradients), not 8 per block
    assert 4 * ring < gathered
    assert tiled <= local_block  # never a whole (local x local) block


def test_ring_needs_a_mesh():
    a = jnp.ones((4, 8))
    with pytest.raises(ValueError, match="needs a mesh"):
        ring_infonce(a, a)


# ---------------------------------------------------------------- in training: the objective, GradCache, the plan

TINY_BERT = {"model_type": "bert", "vocab_size": 128, "hidden_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}


def test_objective_switch_picks_the_ring(mesh, one_device):
    """``objective.negatives_exchange="ring"``: the configured loss (Matryoshka around InfoNCE with
    hashes, hard negatives and a margin rule) is the gathered one's; other losses are refused."""
    from embedjax.train.objective import Objective, loss_function

    (a, p, n), kw = case_arguments("m1_ids_all4_hard")
    from configs import base

    section = {**base.base_config().objective.to_dict(), "loss": "infonce", "matryoshka_dims": (8, 4),
               "loss_kwargs": {"fn_margin": 0.05, "directions": ALL4[:2]}}
    hashes = dict(a_hash=kw["anchor_ids"], b_hash=kw["positive_ids"], n_hash=kw["negative_ids"])

    def run(exchange, on):
        objective = Objective.from_config({**section, "negatives_exchange": exchange}, "mean").on_mesh(on)
        loss = loss_function(objective)
        return loss_and_grads(lambda a, p, n, **h: loss(a, p, n, None, **h), (a, p, n), hashes, on)

    check_close_to_gathered(run("ring", mesh), run("gathered", mesh), run("gathered", one_device))
    with pytest.raises(ValueError, match="no ring form"):
        Objective.from_config({**section, "loss": "cosent", "negatives_exchange": "ring"}, "mean")
    with pytest.raises(ValueError, match="unknown objective.negatives_exchange"):
        Objective.from_config({**section, "negatives_exchange": "all_to_all"}, "mean")


def test_gradcache_composes(mesh, one_device):
    """GradCache (chunks of 4 texts) around the ring equals plain autodiff through the gathered loss,
    a tiny BERT's parameters sharded over the same 8 devices."""
    from embedjax import sharding
    from embedjax.embed import embed
    from embedjax.encoders import bert
    from embedjax.gradcache import gradcache_value_and_grad

    cfg = bert.BertConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          max_position_embeddings=16)
    params = bert.init(cfg, jax.random.key(1))
    rng = np.random.default_rng(2)
    inputs = {f"{side}_ids": rng.integers(1, 64, size=(B, 8)).astype(np.int32) for side in "ab"}

    def embed_fn(params, x, key):
        mask = jnp.ones_like(x["a_ids"])
        return embed(params, cfg, x["a_ids"], mask, unroll=False), embed(params, cfg, x["b_ids"], mask, unroll=False)

    def run(loss_fn, on, chunk):
        shards = sharding.param_shardings(params, on, bert.SHARDING_RULES)
        batch = sharding.to_global(inputs, on)
        if chunk:
            grad = gradcache_value_and_grad(embed_fn, lambda z: loss_fn(*z, symmetric=True), chunk)
        else:
            grad = jax.value_and_grad(lambda p, x: loss_fn(*embed_fn(p, x, None), symmetric=True))
        with jax.set_mesh(on):
            value, grads = jax.jit(grad)(jax.device_put(params, shards), batch)
        return value, jax.tree.leaves(grads)

    check_close_to_gathered(run(ring_infonce, mesh, 4), run(L.infonce, mesh, 0), run(L.infonce, one_device, 0))


def test_plan_reports_both(mesh):
    """The ahead-of-time memory check of a whole train step (``plan.step_memory``), global batch 4096
    over 8 devices with GradCache: the ring's temporaries are smaller by about the (local x global)
    logit blocks the gathered loss holds."""
    from configs import base
    from embedjax.train import plan

    config = base.base_config()
    config.data.kind, config.objective.loss = "triplets", "infonce"
    config.batch_size, config.max_length, config.objective.gradcache_chunk = 4096, 8, 256
    sizes = {}
    for exchange in ("gathered", "ring"):
        config.objective.negatives_exchange = exchange
        sizes[exchange] = plan.step_memory(config, TINY_BERT, mesh=mesh).temporaries
    local, candidates = 4096 // 8, 2 * 4096  # a positive and a hard negative per query
    assert sizes["gathered"] - sizes["ring"] >= local * candidates * 4  # at least one float32 (local x global) block


def test_runs_without_a_ring_form_refuse_it():
    """A SPLADE run (InfoNCE on sparse dot products) has no ring form: the switch is refused, not ignored."""
    from configs import base
    from embedjax.train.sparse_objective import SparseObjective

    section = {**base.base_config().objective.to_dict(), "loss": "infonce", "negatives_exchange": "ring"}
    with pytest.raises(ValueError, match="negatives_exchange='ring'"):
        SparseObjective.from_config(section, {})


def test_tile_count_is_the_fewest_dividing_tiles_within_the_limit():
    from embedjax.losses.ring import tile_count

    for queries in range(1, 40):
        for per_query in (1, 3):
            columns = queries * per_query
            for limit in (None, 1, 2, 5, 8, 64):
                got = tile_count(queries, columns, limit)
                fits = [t for t in range(1, queries + 1) if queries % t == 0
                        and (limit is None or columns // t <= limit)]
                assert got == (fits[0] if fits else queries)  # one query's columns are the finest tile
