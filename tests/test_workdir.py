"""A workdir that survives damage: checkpoints verified on restore (a truncated or overwritten
file, an empty data position: reported by path, moved aside, the run resumes from the newest
good step and finishes like an uninterrupted run), one trainer per workdir (a lock; a stale
one taken over), the run's config stored in every checkpoint, and the CLI's one-line errors."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from embedjax.checkpoint import CheckpointDamaged, Checkpointer, checksums
from embedjax.train import workdir as workdirs
from test_train import loss_curve, run_train

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- checksums and the Checkpointer


def test_checksums_see_one_changed_bit_and_not_the_sharding():
    x = np.arange(24, dtype=np.float32).reshape(6, 4) / 7
    tree = {"w": x, "b": np.ones(3, np.int32), "h": x.astype(jax.numpy.bfloat16)}
    base = checksums(tree)
    assert set(base) == {"['w']", "['b']", "['h']"}
    flipped = x.copy()
    flipped.view(np.uint32)[3, 2] ^= 1  # one bit of one value
    assert checksums({**tree, "w": flipped})["['w']"] != base["['w']"]
    assert checksums({**tree, "w": x.T.copy().T})["['w']"] == base["['w']"]  # values, not memory layout
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, 4), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    assert checksums({**tree, "w": sharded}) == base


def _three_steps(root: Path, **kw) -> Checkpointer:
    ckpt = Checkpointer(root, keep=5, async_save=False, config={"seed": 7}, **kw)
    for step in (2, 4, 6):
        ckpt.save(step, {"w": np.full((64, 32), float(step), np.float32)}, {"position": step})
    ckpt.wait()
    return ckpt


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(16 * [0x5A])
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda step: (lambda p: os.truncate(p, p.stat().st_size // 2))(_largest_file(step / "state")),
    "overwritten": lambda step: _overwrite_middle(_largest_file(step / "state")),
    "empty data position": lambda step: next((step / "data").glob("*.json")).write_text(""),
    "values changed": lambda step: _tamper_checksum(step),
}


def _tamper_checksum(step: Path) -> None:
    """The arrays no longer match the checksums saved with them (as if their bytes had changed in a
    way the storage format cannot see)."""
    path = next(p for p in (step / "integrity").rglob("*") if p.is_file())
    record = json.loads(path.read_text())
    record["checksums"] = {k: (v + 1) % 2**32 for k, v in record["checksums"].items()}
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_step_is_named_moved_aside_and_the_previous_one_restored(damage, tmp_path, caplog):
    _three_steps(tmp_path).close()
    DAMAGE[damage](tmp_path / "checkpoints" / "6")
    ckpt = Checkpointer(tmp_path, keep=5, async_save=False)
    with caplog.at_level(logging.WARNING, logger="embedjax.checkpoint"):
        state, data, step = ckpt.restore({"w": jax.ShapeDtypeStruct((64, 32), np.float32)})
    assert step == 4 and data == {"position": 4} and float(np.asarray(state["w"])[5, 5]) == 4.0
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"{tmp_path / 'checkpoints' / '6'} does not restore" in warned
    assert ckpt.latest_step() == 4 and [p.name.split("-")[:2] for p in (tmp_path / "damaged").iterdir()] == [
        ["checkpoints", "6"]]
    ckpt.save(6, {"w": np.zeros((64, 32), np.float32)}, {"position": 6})  # the run saves step 6 again
    ckpt.close()


def test_no_restorable_step_is_one_error_naming_every_path(tmp_path):
    _three_steps(tmp_path).close()
    for step in (2, 4, 6):
        DAMAGE["empty data position"](tmp_path / "checkpoints" / str(step))
    ckpt = Checkpointer(tmp_path, keep=5, async_save=False)
    with pytest.raises(CheckpointDamaged) as err:
        ckpt.restore({"w": jax.ShapeDtypeStruct((64, 32), np.float32)})
    message = str(err.value)
    assert all(str(tmp_path / "checkpoints" / str(s)) in message for s in (2, 4, 6))
    assert f"delete {tmp_path / 'checkpoints'}" in message


def test_a_damaged_best_checkpoint_falls_back_to_the_next_best(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep=5, keep_best=2, best_metric="dev", async_save=False)
    for step, score in ((2, 0.5), (4, 0.9)):
        ckpt.save_best(step, {"w": np.full((8,), float(step), np.float32)}, {"dev": score})
    ckpt.close()
    DAMAGE["values changed"](tmp_path / "best" / "4")
    ckpt = Checkpointer(tmp_path, keep=5, keep_best=2, best_metric="dev", async_save=False)
    with caplog.at_level(logging.WARNING, logger="embedjax.checkpoint"):
        params, metrics, step = ckpt.restore_best({"w": jax.ShapeDtypeStruct((8,), np.float32)})
    assert step == 2 and metrics["dev"] == 0.5 and float(np.asarray(params["w"])[0]) == 2.0
    assert "do not match the checksums" in " ".join(r.getMessage() for r in caplog.records)
    ckpt.close()


def test_every_step_carries_the_runs_config(tmp_path):
    _three_steps(tmp_path).close()
    (tmp_path / workdirs.CONFIG_FILE).write_text(json.dumps({"seed": 1}))  # the checkpoint's copy wins
    config, where = workdirs.saved_config(tmp_path)
    assert config == {"seed": 7} and where == str(tmp_path / "checkpoints" / "6")


# ---------------------------------------------------------------------------- one trainer per workdir


HOLD = """
import sys, time
from embedjax.train.workdir import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def held_workdir(tmp_path):
    """A workdir whose lock a live process holds."""
    workdir = tmp_path / "held"
    workdir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield workdir, holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_lock_on_a_held_workdir_is_refused(held_workdir):
    workdir, pid = held_workdir
    with pytest.raises(workdirs.WorkdirLocked, match=rf"in use by another trainer, pid {pid} on "):
        workdirs.WorkdirLock(workdir).acquire()


def test_a_stale_or_garbled_lock_is_taken_over_and_another_hosts_refused(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    lock = tmp_path / workdirs.WorkdirLock.NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": time.time()}))
    with caplog.at_level(logging.WARNING, logger="embedjax.train.workdir"):
        with workdirs.WorkdirLock(tmp_path) as held:
            assert json.loads(lock.read_text())["pid"] == os.getpid() and held.held
    assert "taking over a stale lock" in caplog.text and not lock.exists()  # released on exit
    lock.write_text("{half a lock")
    workdirs.WorkdirLock(tmp_path).acquire().release()
    lock.write_text(json.dumps({"host": "elsewhere.example", "pid": 1, "started": time.time()}))
    with pytest.raises(workdirs.WorkdirLocked, match="another host"):
        workdirs.WorkdirLock(tmp_path).acquire()


def test_a_second_trainer_on_a_held_workdir_stops_with_one_line(held_workdir, tiny_train_overrides):
    workdir, pid = held_workdir
    proc = run_train(workdir, tiny_train_overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {pid}" in errors[0] and "Traceback" not in proc.stderr
    assert not (workdir / "checkpoints").exists()


# ---------------------------------------------------------------------------- a damaged workdir, end to end


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_train_overrides) -> Path:
    """``tiny_train_overrides`` SIGKILLed after step 7: checkpoints 2, 4, 6 and a stale LOCK. Read-only.
    Saved synchronously, so that step 6 is surely on disk when the kill comes (the resumed runs
    save in the background again: ``checkpoint.*`` may change between runs)."""
    workdir = tmp_path_factory.mktemp("killed") / "w"
    proc = run_train(workdir, {**tiny_train_overrides, "checkpoint.asynchronous": False}, check=False, kill_at=7)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
    return workdir


def copy_of(workdir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "w"
    shutil.copytree(workdir, target)
    return target


@pytest.mark.parametrize("damage", ["truncated", "overwritten + empty data position"])
def test_a_damaged_workdir_resumes_from_its_newest_good_step_and_ends_like_the_straight_run(
        damage, killed_run, tiny_straight_run, tiny_train_overrides, tmp_path):
    workdir = copy_of(killed_run, tmp_path)
    if damage == "truncated":
        DAMAGE["truncated"](workdir / "checkpoints" / "6")
        bad, resumed_from = [6], 4
    else:
        DAMAGE["overwritten"](workdir / "checkpoints" / "6")
        DAMAGE["empty data position"](workdir / "checkpoints" / "4")
        bad, resumed_from = [6, 4], 2
    proc = run_train(workdir, tiny_train_overrides)
    for step in bad:
        assert f"checkpoint {workdir / 'checkpoints' / str(step)} does not restore" in proc.stderr
    assert f"step {resumed_from}" in proc.stderr and "taking over a stale lock" in proc.stderr
    assert sorted(p.name.split("-")[1] for p in (workdir / "damaged").iterdir()) == sorted(map(str, bad))
    straight, resumed = loss_curve(tiny_straight_run), loss_curve(workdir)
    assert sorted(resumed) == list(range(1, 9)) and resumed == straight  # bitwise: the same program and bits


def test_a_changed_config_is_refused_even_without_train_config_json(killed_run, tiny_train_overrides, tmp_path):
    workdir = copy_of(killed_run, tmp_path)
    (workdir / workdirs.CONFIG_FILE).unlink()
    proc = run_train(workdir, {**tiny_train_overrides, "optim.learning_rate": 2e-3}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optim.learning_rate: 0.001 -> 0.002" in errors[0]
    assert str(workdir / "checkpoints" / "6") in errors[0] and "Traceback" not in proc.stderr


def test_export_of_an_unfinished_workdir_says_so_and_exports_its_best_checkpoint(killed_run, tmp_path):
    from sentence_transformers import SentenceTransformer

    import embedjax

    script = [sys.executable, str(REPO / "scripts" / "export.py"), "--model", str(killed_run)]
    refused = subprocess.run(script + ["--output", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "has not finished" in refused.stderr and "--best-checkpoint" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "x").exists()
    done = subprocess.run(script + ["--output", str(tmp_path / "best"), "--best-checkpoint"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"best checkpoint \(step [04], dev/cosine_spearman", done.stdout), done.stdout
    texts = ["A man is playing a flute.", "Two dogs run on the beach."]
    ours = embedjax.load_pretrained(tmp_path / "best").encode(texts)
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "best"), device="cpu").encode(texts), ours,
                               atol=1e-5)


# ---------------------------------------------------------------------------- the CLI contract


def one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("args, says", [
    (["--config.batch_size=abc"], "--config.batch_size"),
    (["--config.num_steps=None"], "--config.num_steps"),
])
def test_a_bad_flag_value_is_one_line(args, says, tiny_train_overrides, tmp_path):
    proc = run_train(tmp_path / "w", tiny_train_overrides, check=False, extra_args=args)
    assert says in one_line_error(proc)


def test_a_config_variant_typo_is_one_line(tiny_train_overrides, tmp_path):
    proc = run_train(tmp_path / "w", tiny_train_overrides, check=False, config="stsb_angle.py:smok")
    assert "unknown config variant 'smok'; did you mean 'smoke'" in one_line_error(proc)


def test_a_workdir_with_no_restorable_checkpoint_is_one_line(killed_run, tiny_train_overrides, tmp_path):
    workdir = copy_of(killed_run, tmp_path)
    for step in (2, 4, 6):
        DAMAGE["empty data position"](workdir / "checkpoints" / str(step))
    error = one_line_error(run_train(workdir, tiny_train_overrides, check=False))
    assert "restores" in error and f"delete {workdir / 'checkpoints'}" in error


def test_the_nan_stop_is_one_line(tiny_train_overrides, tmp_path):
    proc = run_train(tmp_path / "w", {**tiny_train_overrides, "optim.learning_rate": 1e30, "optim.warmup": 0},
                     check=False)
    error = one_line_error(proc)
    assert "non-finite training metrics" in error and "a rerun" in error
