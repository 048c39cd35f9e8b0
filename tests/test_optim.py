"""Gradient accumulation that does what it says: accumulate=k over micro-batches of B/k is the
batch-B run (for a loss without in-batch interaction, cosine_mse), and the learning-rate
schedule counts optimizer updates. Plus cosine_mse against NumPy and sentence-transformers."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import base  # noqa: E402
from embedjax import losses  # noqa: E402
from embedjax.data.batch import Batch, Side  # noqa: E402
from embedjax.encoders import bert  # noqa: E402
from embedjax.train import optim  # noqa: E402
from embedjax.train.objective import Objective, batch_loss  # noqa: E402
from embedjax.train.state import TrainState  # noqa: E402
from embedjax.train.step import train_step  # noqa: E402

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

# ---------------------------------------------------------------------------- cosine_mse


def np_cosine_mse(a, b, y, lo=0.0, hi=1.0):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    total = 0.0
    for i in range(len(a)):
        cos = a[i] @ b[i] / (np.linalg.norm(a[i]) * np.linalg.norm(b[i]))
        total += (cos - (y[i] - lo) / (hi - lo)) ** 2
    return total / len(a)


def test_cosine_mse_matches_numpy_and_sentence_transformers():
    import torch
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 16, 24)).astype(np.float32)
    y = rng.uniform(0, 5, 16).astype(np.float32)
    got = float(losses.cosine_mse(jnp.asarray(a), jnp.asarray(b), jnp.asarray(y), label_range=(0.0, 5.0)))
    np.testing.assert_allclose(got, np_cosine_mse(a, b, y, 0.0, 5.0), rtol=1e-5)
    st = CosineSimilarityLoss(model=None).compute_loss_from_embeddings(
        [torch.from_numpy(a), torch.from_numpy(b)], torch.from_numpy(y / 5.0))  # ST wants labels in [0, 1]
    np.testing.assert_allclose(got, float(st), rtol=1e-5)
    # default label_range (0, 1): the labels are used as they are
    y01 = y / 5.0
    np.testing.assert_allclose(float(losses.cosine_mse(jnp.asarray(a), jnp.asarray(b), jnp.asarray(y01))),
                               np_cosine_mse(a, b, y01), rtol=1e-5)
    # bfloat16 embeddings compute in float32
    assert losses.cosine_mse(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16), y01).dtype == jnp.float32
    with pytest.raises(ValueError, match="hi > lo"):
        losses.cosine_mse(jnp.asarray(a), jnp.asarray(b), jnp.asarray(y), label_range=(5.0, 0.0))


def test_cosine_mse_gradient_matches_sentence_transformers():
    import torch
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 8, 12)).astype(np.float32)
    y = rng.uniform(0, 1, 8).astype(np.float32)
    ga, gb = jax.grad(losses.cosine_mse, argnums=(0, 1))(jnp.asarray(a), jnp.asarray(b), jnp.asarray(y))
    ta, tb = torch.from_numpy(a).requires_grad_(), torch.from_numpy(b).requires_grad_()
    CosineSimilarityLoss(model=None).compute_loss_from_embeddings([ta, tb], torch.from_numpy(y)).backward()
    np.testing.assert_allclose(np.asarray(ga), ta.grad.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gb), tb.grad.numpy(), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- accumulation == large batch

TINY = bert.BertConfig(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position_embeddings=16)


def padded_batch(rng, rows: int, length: int = 8) -> Batch:
    """A padded scored-pair batch like the pipeline's (sides a and b, labels), texts of varied lengths."""
    sides = {}
    for side in "ab":
        lengths = rng.integers(2, length + 1, rows)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        sides[side] = Side(ids=(rng.integers(1, TINY.vocab_size, (rows, length)) * mask).astype(np.int32), mask=mask,
                           types=np.zeros((rows, length), np.int32))
    return Batch(**sides, labels=rng.uniform(0, 5, rows).astype(np.float32))


def optim_config(**overrides):
    c = base.base_config().optim
    c.update(overrides)
    return c


def cosine_objective() -> Objective:
    cfg = base.base_config().objective
    cfg.loss, cfg.loss_kwargs, cfg.dropout = "cosine_mse", {"label_range": (0.0, 5.0)}, False
    return Objective.from_config(cfg, "mean")


def run(params, batches, cfg, total_steps):
    tx, lr_at_step = optim.make_optimizer(cfg, total_steps)
    step = jax.jit(functools.partial(train_step, enc_cfg=TINY, objective=cosine_objective(), tx=tx))
    state = TrainState.create(params, tx, 0)
    trajectory = []
    for batch in batches:
        state, _ = step(state, batch)
        trajectory.append(jax.tree.map(np.asarray, state.params))
    return trajectory


UPDATES, ROWS = 3, 8
SCHEDULE = dict(learning_rate=1e-3, warmup=1, decay="linear")  # weight decay and clipping as configured


@pytest.fixture(scope="module")
def large_batch_run():
    """``UPDATES`` steps at batch ``ROWS``, accumulate=1: (params, batches, trajectory)."""
    params = bert.init(TINY, jax.random.key(0))
    rng = np.random.default_rng(0)
    large = [padded_batch(rng, ROWS) for _ in range(UPDATES)]
    return params, large, run(params, large, optim_config(**SCHEDULE, accumulate=1), UPDATES)


@pytest.mark.parametrize("k", [2, 4])
def test_accumulating_k_micro_batches_is_the_large_batch(k, large_batch_run):
    params, large, ref = large_batch_run
    updates, rows, cfg = UPDATES, ROWS, SCHEDULE
    micro = [jax.tree.map(lambda v: v[i * rows // k:(i + 1) * rows // k], b) for b in large for i in range(k)]
    got = run(params, micro, optim_config(**cfg, accumulate=k), updates * k)
    assert len(got) == updates * k
    start = jax.tree.map(np.asarray, params)
    for s, p in enumerate(got):
        u = s // k
        want = ref[u] if s % k == k - 1 else (ref[u - 1] if u else start)  # unchanged until the k-th micro-step
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(p), jax.tree.leaves(want)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=f"step {s} {jax.tree_util.keystr(path)}")
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref[-1]), jax.tree.leaves(start)))
    assert moved > 1e-4  # the comparison is not between unmoved parameters
    # the second update ran at the peak (warmup=1 update: the first at lr 0), the third half-way down
    assert not np.array_equal(jax.tree.leaves(ref[1])[0], jax.tree.leaves(ref[0])[0])


def test_objective_cosine_mse_is_the_loss_of_the_embeddings():
    from embedjax.train.objective import embed_batch

    params = bert.init(TINY, jax.random.key(1))
    batch = padded_batch(np.random.default_rng(2), 6)
    objective = cosine_objective()
    key = jax.random.key(0)
    za, zb, _ = embed_batch(params, TINY, objective, batch, jax.random.split(key)[0])
    want = losses.cosine_mse(za, zb, batch.labels, label_range=(0.0, 5.0))
    np.testing.assert_allclose(float(batch_loss(params, TINY, objective, batch, key)), float(want), rtol=1e-6)


# ---------------------------------------------------------------------------- the schedule counts updates


def expected_lr(u: int, peak: float, updates: int, warmup: int, decay: str) -> float:
    """Linear warmup over ``warmup`` updates from 0, then linear / cosine decay to 0 at ``updates``."""
    if u < warmup:
        return peak * u / warmup
    t = (u - warmup) / (updates - warmup)
    return peak * (1 - t) if decay == "linear" else peak * 0.5 * (1 + np.cos(np.pi * t))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_applied_learning_rate_follows_a_schedule_over_the_updates(k, decay):
    """With Adam's b1 = b2 = 0, no clipping and no weight decay, each update moves a parameter with
    a constant gradient 1 by lr / (1 + eps): the applied rate is read off the parameter."""
    peak, updates, eps = 0.1, 10, 1e-6
    cfg = optim_config(learning_rate=peak, warmup=0.2, decay=decay, accumulate=k, b1=0.0, b2=0.0, eps=eps,
                       clip_norm=0.0, weight_decay=0.0)
    tx, lr_at_step = optim.make_optimizer(cfg, updates * k)
    params = {"w": jnp.zeros((3,))}
    opt_state = tx.init(params)
    grads = {"w": jnp.ones((3,))}
    update = jax.jit(tx.update)
    applied = []
    for s in range(updates * k):
        new_updates, opt_state = update(grads, opt_state, params)
        delta = -float(new_updates["w"][0]) * (1 + eps)
        if s % k != k - 1:
            assert delta == 0.0  # a micro-step only accumulates
        else:
            applied.append(delta)
        np.testing.assert_allclose(float(lr_at_step(s)), expected_lr(s // k, peak, updates, 2, decay), atol=1e-7)
    want = [expected_lr(u, peak, updates, 2, decay) for u in range(updates)]
    np.testing.assert_allclose(applied, want, rtol=1e-5, atol=1e-7)
    assert applied[0] == 0.0 and applied[2] == pytest.approx(peak) and applied[-1] > 0  # decays over the updates
    # lr_at_step(s) is the rate of the update micro-step s contributes to
    for s in range(updates * k):
        assert float(lr_at_step(s)) == pytest.approx(applied[s // k], abs=1e-7)


def test_warmup_counts_updates_and_accumulate_must_divide_the_steps():
    tx, lr_at_step = optim.make_optimizer(optim_config(learning_rate=1.0, warmup=4, accumulate=2), 20)
    # warmup=4 updates = 8 micro-steps: the peak is reached by update 4 (micro-steps 8, 9)
    np.testing.assert_allclose([float(lr_at_step(s)) for s in (0, 1, 2, 7, 8, 9)], [0, 0, 0.25, 0.75, 1, 1])
    with pytest.raises(ValueError, match=r"optim.accumulate=4 does not divide the 10 train steps.*multiple of 4"):
        optim.make_optimizer(optim_config(accumulate=4), 10)
    with pytest.raises(ValueError, match="accumulate must be >= 1"):
        optim.make_optimizer(optim_config(accumulate=0), 10)
    with pytest.raises(KeyError):
        optim.make_optimizer({"learning_rate": 1e-5}, 10)  # every key is required (configs/base.py declares them)
