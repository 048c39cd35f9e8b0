"""A run's workdir: what it holds, and the guarantees around it.

    LOCK                  the trainer working in it (host, pid, start): one at a time
    train_config.json     the run's config, written when a run starts
    checkpoints/<step>/   train state + data position + the config (embedjax.checkpoint)
    best/<step>/          the best params by the selection metric + the config
    damaged/              checkpoints that failed to restore, moved aside
    metrics.jsonl, tensorboard/, summary.json, the exported model (and adapter/ with LoRA)

* ``WorkdirLock``: a second trainer on the same workdir stops with one line naming the first.
* ``config_changes`` / ``check_rerun``: a rerun resumes its run, so a config that differs from
  the run's saved one (``saved_config``: the newest checkpoint's copy, else ``train_config.json``)
  in anything that changes the result is refused unless ``--allow_config_change``.

What changes the run: every key except ``IGNORED`` (below). That is the model and its
settings (model, pooling, max_length, dtype, hidden_dropout, attention_dropout), seed,
batch_size, num_steps / num_epochs (the schedule's length), every ``optim.*`` and
``objective.*`` key, every ``data.*`` key (the training data and its layout: buckets and
packing decide dropout masks' shapes), and the selection of the exported checkpoint
(``evals``: the evaluators and their data; ``select_metric``). ``num_epochs`` is ignored when
both configs set ``num_steps`` (it is not read then).

``IGNORED`` = keys that cannot change any parameter or the selection's candidates' scores:
log_every, eval_every and eval_start (when the dev set is scored: which steps compete for
"best", never what training does), eval_export, eval_batch_size, checkpoint.* (how often / how
many are kept), mesh.*, sharding_rules and memory_limit_gib (the hardware layout: the same computation up to float
round-off, and a run must be able to resume on another machine), data.streaming and data.index_dir (how the
same records are read: whole, or one at a time through an index), objective.negatives_exchange (the same
contrastive loss, gathered or around a ring of devices); and ``testing``, a section
older configs had, still in their workdirs' saved configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from typing import Any, Mapping

import jax
from etils import epath

from embedjax import distributed, paths
from embedjax.train.config import as_dict

log = logging.getLogger(__name__)

IGNORED = ("log_every", "eval_every", "eval_start", "eval_export", "eval_batch_size", "checkpoint", "mesh",
           "sharding_rules", "memory_limit_gib", "data.streaming", "data.index_dir", "objective.negatives_exchange",
           "testing")  # the last: a section older configs had, still in their workdirs' saved configs
ABSENT = "(absent)"

# The run's config in its workdir; not config.json, which the export writes (the model's HF config).
CONFIG_FILE = "train_config.json"


# How configs before the typed sections wrote "not set" (None now), key by key.
_EMPTY = lambda v: v in ("", [], ())  # noqa: E731
_ZERO = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0  # noqa: E731
_NEGATIVE = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0  # noqa: E731
LEGACY_UNSET = {"pooling": _EMPTY, "attention": _EMPTY, "lora.targets": _EMPTY, "lora.init_from": _EMPTY,
                "objective.layers": _EMPTY, "objective.distill.teacher": _EMPTY, "data.format": _EMPTY,
                "data.score_range": _EMPTY, "data.tfds_name": _EMPTY, "data.tfds_data_dir": _EMPTY,
                "max_length": _ZERO, "num_steps": _ZERO, "memory_limit_gib": _ZERO,
                "hidden_dropout": _NEGATIVE, "attention_dropout": _NEGATIVE}


def legacy_config(saved: Mapping[str, Any]) -> dict:
    """A saved config (``train_config.json``) with older runs' "not set" values ("", 0, or a
    negative dropout rate: ``LEGACY_UNSET``) as None, so old workdirs resume, compare and load
    like new ones."""
    out = json.loads(json.dumps(dict(saved)))
    for path, unset in LEGACY_UNSET.items():
        *parents, key = path.split(".")
        section = out
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if isinstance(section, dict) and key in section and unset(section[key]):
            section[key] = None
    return out


def _leaves(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> leaf value (dicts are descended; an empty dict is a leaf ``{}``)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def _ignored(path: str) -> bool:
    return any(path == p or path.startswith(p + ".") for p in IGNORED)


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples -> lists, Paths -> str), as train_config.json holds it."""
    return json.loads(json.dumps(value, default=str))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)  # JSON's 2 vs 2.0
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _show(value: Any) -> str:
    if value is ABSENT:
        return ABSENT
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The differences between two configs that change the run, one line each, sorted by key:

        optim.learning_rate: 1e-05 -> 2e-05

    ``saved``: the workdir's ``train_config.json`` (``json.loads``; written with
    ``to_json_best_effort``), ``new``: ``config.to_dict()`` (or the same JSON form). Tuples and
    lists compare equal, as do 2 and 2.0; a key present on one side only shows ``(absent)``.
    Keys under ``IGNORED`` are skipped (module docstring), and ``num_epochs`` when both set
    ``num_steps`` > 0.
    """
    old, cur = _leaves(_plain(dict(saved))), _leaves(_plain(as_dict(new)))
    ignore_epochs = all(_num(side.get("num_steps")) > 0 for side in (old, cur))
    lines = []
    for path in sorted(old.keys() | cur.keys()):
        if _ignored(path) or (ignore_epochs and path == "num_epochs"):
            continue
        a, b = old.get(path, ABSENT), cur.get(path, ABSENT)
        if a is ABSENT or b is ABSENT or not _same(a, b):
            lines.append(f"{path}: {_show(a)} -> {_show(b)}")
    return lines


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def has_progress(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir`` holds anything a rerun would continue from: a saved step (latest or
    best checkpoint) or a finished run's ``summary.json``."""
    root = epath.Path(workdir)
    if (root / "summary.json").is_file():
        return True
    return any(d.is_dir() and any(c.name.isdigit() for c in d.iterdir()) for d in (root / "checkpoints", root / "best"))


@contextlib.contextmanager
def _orbax_quiet():
    """Orbax's warnings about a read-only manager (that it is one, the settings that implies)
    silenced: reading a config is not news, and the CLIs promise one line on an error."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def saved_config(workdir: str | os.PathLike) -> tuple[dict | None, str]:
    """``(config, where)``: the config a workdir's run trained with. The newest checkpoint's own
    copy (``checkpoints/``, else ``best/``) wins; else ``train_config.json`` (a run that saved
    no step yet, or checkpoints from before they carried their config); ``(None, "")`` when
    there is neither."""
    import orbax.checkpoint as ocp

    root = epath.Path(workdir)
    for sub in ("checkpoints", "best"):
        directory = root / sub
        if not directory.is_dir():
            continue
        with _orbax_quiet(), ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
            for step in sorted(manager.all_steps(), reverse=True):
                if not (directory / str(step) / "integrity").exists():
                    continue
                try:
                    item = manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
                    config = item["integrity"]["config"]
                except Exception as err:  # noqa: BLE001  (a damaged step: the restore reports it later)
                    log.warning("%s: its saved config does not read (%s)", directory / str(step), err)
                    continue
                if config is not None:
                    return legacy_config(config), str(directory / str(step))
    path = root / CONFIG_FILE  # local or gs://
    if not path.is_file():
        return None, ""
    try:
        return legacy_config(json.loads(path.read_text())), str(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it, or use another --workdir") from None


def check_rerun(workdir: str | os.PathLike, config: Any, allow_change: bool) -> list[str]:
    """Refuses to resume ``workdir`` with a config that changes its run.

    When the workdir has progress to resume (``has_progress``: a checkpoint or a summary; a run
    that stopped before its first save leaves none, and its config is simply replaced) and
    ``config_changes(saved, config)`` against the run's saved config (``saved_config``: the
    newest checkpoint's copy, so deleting ``train_config.json`` hides nothing) is not empty,
    raises ValueError listing the differences and the ways out, unless ``allow_change``. Returns
    the changes (empty when nothing run-changing differs) so the caller can log what
    ``allow_change`` let through. Call it before the run writes its ``train_config.json``.
    """
    if not has_progress(workdir):
        return []  # nothing saved to resume (e.g. a first run that stopped on bad input): start afresh
    saved, where = saved_config(workdir)
    if saved is None:
        return []
    changes = config_changes(saved, config)
    if changes and not allow_change:
        raise ValueError(
            f"{workdir} already holds a run whose config ({where}) differs in what it trains:\n  "
            + "\n  ".join(changes)
            + "\nA rerun resumes that run, so its results would mix both configs. Undo the change, use another "
            "--workdir, or pass --allow_config_change to resume with the new settings.")
    return changes


# ---------------------------------------------------------------------------- one trainer per workdir


class WorkdirLocked(OSError):
    """Another trainer holds the workdir."""


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds a workdir's lock (the lock file's content)."""

    host: str
    pid: int
    started: float

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), time.time())

    def is_alive(self) -> bool | None:
        """Whether the owner still runs: None when that cannot be told from here (another host)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # it runs, as another user
            return True
        return True

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"


class WorkdirLock:
    """One trainer per workdir: ``workdir/LOCK`` names the host and pid that train in it.

    ``acquire`` creates the file exclusively (``O_EXCL`` on a local disk; on an object store,
    written then read back). A lock whose owner is gone (the same host, its pid not running:
    a run killed with SIGKILL) is stale and taken over with a warning. A live owner, or one
    on another host (whose process cannot be checked from here), is refused with a one-line
    ``WorkdirLocked`` naming it and the way out. ``release`` removes the file if it is ours.
    """

    NAME = "LOCK"

    def __init__(self, workdir: str | os.PathLike):
        self.path = epath.Path(workdir) / self.NAME
        self.owner = Owner.me()
        self.held = False

    def acquire(self) -> WorkdirLock:
        for _ in range(3):  # a stale lock removed, or a race lost: look again
            if self._create():
                self.held = True
                return self
            holder = self._holder()
            if holder is None:
                continue
            alive = holder.is_alive()
            if alive is False:
                log.warning("%s: taking over a stale lock of %s (that process is gone)", self.path, holder.describe())
                self.path.unlink(missing_ok=True)
                continue
            where = "" if alive else " (another host: its process cannot be checked from here)"
            raise WorkdirLocked(f"{self.path.parent} is in use by another trainer, {holder.describe()}{where}: "
                                f"wait for it to finish, or use another --workdir; if that run is dead, delete "
                                f"{self.path}")
        raise WorkdirLocked(f"{self.path}: could not take the lock (other trainers keep taking it)")

    def _create(self) -> bool:
        text = json.dumps(dataclasses.asdict(self.owner))
        if paths.is_remote(self.path):
            if self.path.exists():
                return False
            self.path.write_text(text)
            return self.path.read_text() == text  # the last writer wins: read back who that was
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def _holder(self) -> Owner | None:
        try:
            return Owner(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            return None  # released meanwhile
        except (ValueError, TypeError) as err:  # an empty or garbled lock file: its writer died mid-write
            log.warning("%s: unreadable lock (%s); taking it over", self.path, err)
            self.path.unlink(missing_ok=True)
            return None

    def release(self) -> None:
        if self.held and self._holder() == self.owner:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def one_trainer(workdir: str | os.PathLike):
    """Holds ``workdir``'s lock for a run on every process: process 0 takes it (the workdir is
    shared storage on several hosts) and every process learns whether it did, so all of them
    stop on the same one-line ``WorkdirLocked``."""
    lock = WorkdirLock(workdir)
    refused = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLocked as err:
            refused = err
    if not distributed.all_processes(refused is None):
        raise refused or WorkdirLocked(f"{lock.path.parent} is in use by another trainer (process 0 could not "
                                       f"take {lock.path})")
    try:
        yield lock
    finally:
        lock.release()
