"""Multi-host training for real: 2 processes x 2 CPU devices joined by ``jax.distributed``
(gloo collectives on localhost) must train exactly like 1 process x 8 devices, resume after
both processes are SIGKILLed, and a misconfigured coordinator must stop the run."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

import embedjax
from embedjax import distributed, tokenize
from embedjax.data import pipeline
from embedjax.data.batch import Batch, Side
from embedjax.train import sources
from embedjax.train.config import DataConfig
from embedjax.train.objective import Objective, batch_loss
from conftest import subprocess_xla_flags  # noqa: E402  (tests/ is on sys.path)
from test_train import loss_curve  # noqa: E402

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- host batches, in process


def first_batches_with_unequal_hosts(source, tok, packing, batch_size=16, limit=200):
    """The one-host global batch and the two hosts' batches of the first step at which the
    hosts' own shapes differ (what agreement must fix)."""
    shard = lambda h, n: grain.sharding.ShardOptions(shard_index=h, shard_count=n)
    # An instruction excluded from pooling: its per-side pool masks must be agreed like the ids.
    make = lambda h, n: pipeline.train_pipeline(source, tok, global_batch_size=batch_size, seed=0, common_length=True,
                                                packing=packing, shard_options=shard(h, n),
                                                prompts={"a": "query: "}, include_prompt=False)
    keep = lambda b: b.model_inputs()  # noqa: E731
    one, hosts = make(0, 1), [make(0, 2), make(1, 2)]
    for _ in range(limit):
        batch, two = keep(next(one)), [keep(next(h)) for h in hosts]
        sigs = [b.shape_signature() for b in two]
        if (sigs[0] != sigs[1]).any():
            return batch, two
    raise AssertionError(f"the hosts' batch shapes never differed in {limit} steps")


def agreed_global(batches, pad_token_id):
    """What the hosts' ``global_batch`` calls assemble: agreed shapes, then rows concatenated."""
    target = np.max([b.shape_signature() for b in batches], axis=0)
    agreed = [distributed.agree_batch(b, target, pad_token_id=pad_token_id, process_index=h)
              for h, b in enumerate(batches)]
    return concatenated(agreed)


def concatenated(batches):
    """The hosts' slices as one batch, rows (leaf by leaf) in host order."""
    return jax.tree.map(lambda *xs: np.concatenate(xs), *batches)


@pytest.mark.parametrize("layout", ["packed", "padded_hard_negatives"])
def test_agreed_host_batches_are_the_single_process_batch(layout, tiny_model, stsb_dir, sick_dir):
    enc = embedjax.load_pretrained(tiny_model)
    tok = tokenize.Tokenizer(enc.tokenizer.backend, 64, enc.cfg.pad_token_id, buckets=(16, 24, 32, 48, 64))
    if layout == "packed":
        source = sources.train_source(DataConfig(kind="stsb", train=str(stsb_dir / "sts-train.csv")))
        packing, objective = pipeline.Packing(length=64, rows_multiple=4), Objective(loss="cosent", dropout=False)
    else:
        source = sources.train_source(DataConfig(kind="sick_triplets", train=str(sick_dir / "SICK_train.txt")))
        packing, objective = None, Objective(loss="infonce", dropout=False)
    one, two = first_batches_with_unequal_hosts(source, tok, packing)
    merged = agreed_global(two, enc.cfg.pad_token_id)
    if packing is None:
        # padded: the agreed global batch IS the single-process batch, array for array
        assert jax.tree.structure(merged) == jax.tree.structure(one)
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(one)):
            np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
    else:
        # packed: each host packs its own texts; every global text index points at a distinct packed segment
        texts = np.concatenate([merged.a.text_index, merged.b.text_index])
        assert len(set(texts.tolist())) == texts.size == 2 * 16
        assert set(np.unique(merged.packed.segments)) - {0} == set((texts + 1).tolist())
    key = jax.random.PRNGKey(0)
    want = float(batch_loss(enc.params, enc.cfg, objective, one, key))
    got = float(batch_loss(enc.params, enc.cfg, objective, merged, key))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # without the global offsets, host 1's texts would pool host 0's segments: a different loss
    if packing is not None:
        target = np.max([b.shape_signature() for b in two], axis=0)
        naive = concatenated([distributed.agree_batch(b, target, pad_token_id=0, process_index=0) for b in two])
        assert abs(float(batch_loss(enc.params, enc.cfg, objective, naive, key)) - want) > 1e-3


def test_single_process_batch_is_unchanged():
    batch = Batch(a=Side(hashes=np.zeros(4, np.int32), ids=np.ones((4, 16), np.int32)))
    out = distributed.global_batch(batch, pad_token_id=0)
    assert out is batch


# ---------------------------------------------------------------------------- initialize


def test_initialize_without_a_cluster_is_one_process(monkeypatch):
    def no_cluster(*args, **kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.delenv(distributed.COORDINATOR_ENV, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    assert distributed.initialize() is False


@pytest.mark.parametrize("how", ["flag", "env", "detected"])
def test_initialize_failure_stops_the_run(monkeypatch, how):
    """Configured by flag or $JAX_COORDINATOR_ADDRESS, or a cluster JAX detected: any error
    from jax.distributed.initialize propagates (the run must not go on as one process)."""
    errors = {"flag": RuntimeError("UNAVAILABLE: failed to connect to 127.0.0.1:1"),
              "env": ValueError("coordinator_address should be defined."),  # even jax's "nothing configured"
              "detected": RuntimeError("DEADLINE_EXCEEDED: barrier timed out")}

    def failing(*args, **kw):
        raise errors[how]

    monkeypatch.setattr(jax.distributed, "initialize", failing)
    monkeypatch.delenv(distributed.COORDINATOR_ENV, raising=False)
    if how == "env":
        monkeypatch.setenv(distributed.COORDINATOR_ENV, "127.0.0.1:1")
    args = ("127.0.0.1:1", 2, 0) if how == "flag" else ()
    with pytest.raises(type(errors[how])):
        distributed.initialize(*args)


def test_train_cli_refuses_a_bad_process_id(tiny_model, small_dev, tmp_path):
    """A configured coordinator whose initialisation fails ends the run: one line, exit 2."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "stsb_angle.py"),
         "--workdir", str(tmp_path / "w"), f"--config.model={tiny_model}", f"--config.evals.dev.path={small_dev}",
         "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=5"],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "process_id" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()  # nothing ran as a lone process


# ---------------------------------------------------------------------------- 2 processes x 2 == 1 x 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir: Path, config: str, overrides: dict, *, processes: int, devices: int = 8, kill_at: int = 0):
    """scripts/train.py as ``processes`` processes of one run, ``devices`` CPU devices in all, through
    tests/train_with_kill.py (every process writes the compilation cache; with ``kill_at``, each
    SIGKILLs itself after that step); returns their return codes and stderr.

    Once ``jax.distributed`` is initialised, XLA:CPU runs every collective through gloo, even
    between one process's devices, each device a gloo rank: a tiny model's step takes 1.2 s on
    2 x 4 devices, 0.6 s on 2 x 2 (0.25 s on 8 devices of one process). The data-parallel
    tests use 2 x 2 against the one-process 8-device run: host count and device count differ."""
    script = REPO / "tests" / "train_with_kill.py"
    args = [sys.executable, str(script), "--config", str(REPO / "configs" / config),
            "--workdir", str(workdir), *[f"--config.{k}={v}" for k, v in overrides.items()]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "EMBEDJAX_KILL_AT_STEP": str(kill_at),
           "XLA_FLAGS": subprocess_xla_flags(devices // processes)}
    env.pop(distributed.COORDINATOR_ENV, None)
    port = free_port()
    extra = lambda i: ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                        f"--process_id={i}"] if processes > 1 else [])
    procs = [subprocess.Popen(args + extra(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=420)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


TEXTS = ["A man is playing a flute.", "Two dogs run on the beach.", "A woman slices an onion.", ""]


def test_two_processes_train_like_one_and_resume_after_sigkill(tiny_train_overrides, tiny_straight_run, tmp_path):
    """configs/stsb_angle.py:smoke (packed batches, AnglE on scored STS-B pairs) as 2 processes x 2
    devices, both SIGKILLed after step 5 and resumed by the same command: its whole loss curve and
    export equal the 1-process, 8-device run's (conftest's shared ``tiny_straight_run``, the same
    overrides), which an uninterrupted two-process run would only repeat (steps 1-4 come from the
    first launch, 5-8 from the resumed one). Padded batches with hard negatives across hosts: the
    LLM recipe's two-host run (test_llm_train: SICK triplets, padded for GradCache); their
    agreement on one global batch: test_agreed_host_batches_are_the_single_process_batch."""
    config, overrides, one = "stsb_angle.py:smoke", tiny_train_overrides, tiny_straight_run
    killed = launch(tmp_path / "two", config, overrides, processes=2, devices=4, kill_at=5)
    assert [rc for rc, _ in killed] == [-signal.SIGKILL] * 2, [err[-3000:] for _, err in killed]
    data_files = sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("*/data/*.json"))
    assert "process_0-of-2.json" in data_files and "process_1-of-2.json" in data_files  # each host's position
    for rc, err in launch(tmp_path / "two", config, overrides, processes=2, devices=4):  # the same command resumes
        assert rc == 0, err[-4000:]

    ref = loss_curve(one)
    assert sorted(ref) == list(range(1, 9)) and len(set(ref.values())) > 4  # a moving curve
    curve = loss_curve(tmp_path / "two")
    assert sorted(curve) == sorted(ref)
    np.testing.assert_allclose([curve[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-5)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 8
    got = embedjax.load_pretrained(tmp_path / "two").encode(TEXTS)
    np.testing.assert_allclose(got, embedjax.load_pretrained(one).encode(TEXTS), atol=1e-5)

