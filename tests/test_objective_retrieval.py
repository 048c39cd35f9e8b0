"""The training objective on retrieval batches (data.kind=beir): several positive slots, relevant
sets and a guide model, wired through ``batch_loss`` and composed with hard negatives, Matryoshka,
layer losses, GradCache and 8-device sharding; retrieval records refused by losses that cannot
read them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from embedjax import losses
from embedjax.data.batch import Batch, Side
from embedjax.encoders import bert
from embedjax.train.loss_specs import check_objective_data
from embedjax.train.objective import Objective, batch_loss, embed_batch

pytestmark = pytest.mark.fast_compile  # checks wiring and composition, not speed (conftest.py)

CFG = bert.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=16)
B, M, K, T, R = 8, 2, 1, 8, 8  # queries, positive slots, hard negatives, tokens, relevant width
FN = (("directions", ("query_to_doc", "query_to_query")), ("fn_margin", 0.05))


def side(rng, lead, hashes):
    ids = rng.integers(1, CFG.vocab_size, size=(*lead, T)).astype(np.int32)
    mask = (np.arange(T) < rng.integers(2, T + 1, size=lead)[..., None]).astype(np.int32)
    return Side(hashes=hashes, ids=ids * mask, mask=mask, types=np.zeros_like(ids))


def retrieval_batch(seed=0):
    """B queries with M positive slots (the last query has one real positive: slot 1 is empty, hash 0),
    K mined negatives each, and relevant sets: query 0's second positive is query 3's first positive
    (the same text) and query 5's negative is relevant to query 5's neighbour 6."""
    rng = np.random.default_rng(seed)
    b_hash = rng.integers(1, 2**30, size=(B, M)).astype(np.int32)
    b_hash[B - 1, 1] = 0
    n_hash = rng.integers(1, 2**30, size=(B, K)).astype(np.int32)
    pos = side(rng, (B, M), b_hash)
    ids = pos.ids.copy()
    ids[3, 0] = ids[0, 1]
    pos = dataclasses.replace(pos, ids=ids, mask=np.where(ids > 0, 1, 0).astype(np.int32))
    b_hash[3, 0] = b_hash[0, 1]
    relevant = np.zeros((B, R), np.int32)
    for i in range(B):
        real = b_hash[i][b_hash[i] != 0]
        relevant[i, :len(real)] = real
    relevant[6, M] = n_hash[5, 0]
    return Batch(a=side(rng, (B,), rng.integers(1, 2**30, size=B).astype(np.int32)),
                 b=dataclasses.replace(pos, hashes=b_hash), n=side(rng, (B, K), n_hash), relevant=relevant)


@pytest.fixture(scope="module")
def params():
    return bert.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def guide_params():
    return bert.init(CFG, jax.random.key(1))


def objective(**kw):
    kw.setdefault("loss_kwargs", FN)
    return Objective(loss="infonce", pooling="mean", dropout=False, unroll=False, **kw)


def test_batch_loss_is_infonce_with_the_batch_masks_and_the_guide(params, guide_params):
    batch = retrieval_batch()
    obj = objective(guide=True, teacher_cfg=CFG, teacher_pooling="cls")
    got = float(jax.jit(lambda p, t, b: batch_loss(p, CFG, obj, b, jax.random.key(0), teacher=t))(
        params, guide_params, batch))
    za, zb, zn = embed_batch(params, CFG, obj, batch, jax.random.key(0))
    view = dataclasses.replace(obj, pooling="cls", guide=False)
    guide = embed_batch(guide_params, CFG, view, batch, jax.random.key(0))
    want = float(losses.infonce(za, zb, zn, anchor_ids=batch.a.hashes, positive_ids=batch.b.hashes,
                                negative_ids=batch.n.hashes, positive_mask=batch.b.hashes != 0,
                                relevant_ids=batch.relevant, relevant_mask=batch.relevant != 0, guide=guide,
                                **dict(FN)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # without the guide the rule reads the student's own scores: a different loss
    alone = float(batch_loss(params, CFG, objective(), batch, jax.random.key(0)))
    assert abs(alone - got) > 1e-4
    # the batch's relevant sets matter: without them query 0's second positive is query 3's negative
    unmasked = float(batch_loss(params, CFG, objective(), dataclasses.replace(batch, relevant=None),
                                jax.random.key(0)))
    assert abs(unmasked - alone) > 1e-4


def test_gradcache_gives_the_same_loss_and_gradients(params):
    batch = retrieval_batch(1)
    plain, cached = objective(), objective(gradcache_chunk=4)
    grad = lambda obj: jax.jit(jax.value_and_grad(lambda p: batch_loss(p, CFG, obj, batch, jax.random.key(0))))  # noqa: E731
    (v1, g1), (v2, g2) = grad(plain)(params), grad(cached)(params)
    np.testing.assert_allclose(float(v2), float(v1), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-6)


def test_matryoshka_slices_the_student_not_the_guide(params, guide_params):
    batch = retrieval_batch(2)
    dims = (8, 32)
    obj = objective(guide=True, teacher_cfg=CFG, teacher_pooling="mean", matryoshka_dims=dims)
    got = float(batch_loss(params, CFG, obj, batch, jax.random.key(0), teacher=guide_params))
    za, zb, zn = embed_batch(params, CFG, obj, batch, jax.random.key(0))
    guide = embed_batch(guide_params, CFG, dataclasses.replace(obj, guide=False, matryoshka_dims=()), batch,
                        jax.random.key(0))
    def loss(guide_at):
        return sum(float(losses.infonce(za[:, :d], zb[..., :d], zn[..., :d], anchor_ids=batch.a.hashes,
                                        positive_ids=batch.b.hashes, negative_ids=batch.n.hashes,
                                        positive_mask=batch.b.hashes != 0, relevant_ids=batch.relevant,
                                        relevant_mask=batch.relevant != 0, guide=guide_at(d), **dict(FN)))
                   for d in dims)

    np.testing.assert_allclose(got, loss(lambda d: guide), rtol=1e-5)
    sliced = loss(lambda d: tuple(g[..., :d] for g in guide))  # what slicing the guide too would give
    assert abs(sliced - got) > 1e-4


def test_layer_losses_and_eight_devices(params):
    """2D (adaptive layers) on a retrieval batch: finite, and the same value and gradients with the
    batch sharded over 8 devices (the negatives and relevant masks of every device) as on one."""
    assert len(jax.devices()) == 8
    batch = retrieval_batch(3)
    obj = objective(layers="adaptive", layer_kwargs=(("n_layers_per_step", 1),))
    fn = jax.jit(jax.value_and_grad(lambda p, b: batch_loss(p, CFG, obj, b, jax.random.key(4))))
    v1, g1 = fn(params, batch)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    assert not sharded.relevant.sharding.is_fully_replicated
    v8, g8 = fn(params, sharded)
    assert np.isfinite(float(v1))
    np.testing.assert_allclose(float(v8), float(v1), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-6)


def test_retrieval_records_need_a_loss_that_reads_them():
    fields = ("text_a", "text_b", "text_n", "relevant")
    check_objective_data(objective(), fields)
    with pytest.raises(ValueError, match="cannot train on retrieval records.*objective.loss=infonce"):
        check_objective_data(Objective(loss="margin_mse"), fields)
    with pytest.raises(ValueError, match="objective.guide is set but objective.loss='cosent'"):
        check_objective_data(Objective(loss="cosent", guide=True), ("text_a", "text_b", "score"), [1.0])
    with pytest.raises(ValueError, match="one frozen model per run"):
        from embedjax.train.config import SourceConfig

        SourceConfig("x", None, {"distill": {"teacher": "a", "weight": 1.0}, "guide": "b"}).teacher
