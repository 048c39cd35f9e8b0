"""Config checks around a run (pure functions; ``scripts/train.py`` and the loop call them).

* ``check_override_keys(config, keys)``: every ``--config.KEY`` override names a declared key
  (configs/base.py), else a one-line ValueError with the close matches.
  ``override_keys_from_argv(argv)`` extracts those keys from a command line.
* ``config_changes(saved, new)`` / ``check_rerun(workdir, config, allow_change)``: a rerun in
  a workdir resumes its run, so a config that differs from the workdir's ``train_config.json`` in
  anything that changes the result is refused unless ``--allow_config_change``.

What changes the run: every key except ``IGNORED`` (below). That is the model and its
settings (model, pooling, max_length, dtype, hidden_dropout, attention_dropout), seed,
batch_size, num_steps / num_epochs (the schedule's length), every ``optim.*`` and
``objective.*`` key, every ``data.*`` key (the training data and its layout: buckets and
packing decide dropout masks' shapes), and the selection of the exported checkpoint
(``evals``: the evaluators and their data; ``select_metric``). ``num_epochs`` is ignored when
both configs set ``num_steps`` > 0 (it is not read then).

``IGNORED`` = keys that cannot change any parameter or the selection's candidates' scores:
log_every, eval_every (when the dev set is scored: which steps compete for "best", never
what training does), eval_batch_size, checkpoint.* (how often / how many are kept), mesh.*
sharding_rules and memory_limit_gib (the hardware layout: the same computation up to float round-off, and a
run must be able to resume on another machine), and the retired ``testing`` section.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from etils import epath

IGNORED = ("log_every", "eval_every", "eval_batch_size", "checkpoint", "mesh", "sharding_rules", "memory_limit_gib",
           "testing")
# Free-form dicts (keyword arguments, column maps, evaluator entries): any key may appear below them, but
# ``--config.a.b.key`` only overrides a key the config already has.
OPEN_SECTIONS = ("objective.loss_kwargs", "objective.layer_kwargs", "objective.aux_losses", "data.columns", "data.mixture",
                 "evals", "pooler_init")
ABSENT = "(absent)"

# The run's config in its workdir; not config.json, which the export writes (the model's HF config).
CONFIG_FILE = "train_config.json"


def _as_dict(config: Any) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _paths(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Every dotted path of a nested dict, sections included: ``{"optim": {...}, "optim.eps": 1e-6, ...}``."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out[path] = value
        if isinstance(value, Mapping):
            out.update(_paths(value, path + "."))
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


def override_keys_from_argv(argv: Sequence[str]) -> list[str]:
    """The dotted keys of ``--config.KEY=value`` / ``--config.KEY value`` / ``--noconfig.KEY``
    arguments, in order (up to a bare ``--``)."""
    keys = []
    for arg in argv:
        if arg == "--":
            break
        m = re.match(r"^--?(?:no)?config\.([^=\s]+)", arg)
        if m:
            keys.append(m.group(1))
    return keys


def _suggest(key: str, candidates: Iterable[str]) -> list[str]:
    """Up to 3 close matches, best first: by the whole dotted path or by its last part
    (``learning_rate`` -> ``optim.learning_rate``); only those nearly as close as the best."""
    ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()
    last = key.rsplit(".", 1)[-1]
    scored = sorted(((max(ratio(key, c), ratio(last, c.rsplit(".", 1)[-1]) - 0.05), c) for c in set(candidates)),
                    key=lambda sc: (-sc[0], sc[1]))
    if not scored or scored[0][0] < 0.6:
        return []
    return [c for score, c in scored if score >= max(0.6, scored[0][0] - 0.08)][:3]


def _or_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def check_override_keys(config: Any, keys: Iterable[str]) -> None:
    """Raises ValueError (one line) for the first ``--config.KEY`` that is not a key of ``config``:

        --config.optim.learning_rat: no such key; did you mean optim.learning_rate?

    Sections (``--config.optim="{...}"``) are keys too. Below a free-form dict
    (``OPEN_SECTIONS``) a key must already be in this config's dict: the message says to set
    the whole dict instead.
    """
    paths = _paths(_as_dict(config))
    for key in keys:
        if key in paths:
            continue
        section = next((s for s in OPEN_SECTIONS if key.startswith(s + ".")), None)
        if section is not None and section in paths:
            have = sorted(paths[section]) if isinstance(paths[section], Mapping) else []
            close = _suggest(key, [f"{section}.{k}" for k in have])
            hint = f"did you mean {_or_list(close)}? or " if close else ""
            raise ValueError(
                f"--config.{key}: {section} has no key {key[len(section) + 1:]!r} in this config (it has {have}); {hint}"
                f"set the whole dict instead, e.g. --config.{section}=\"{{'name': value, ...}}\"")
        close = _suggest(key, paths)
        hint = f"did you mean {_or_list(close)}?" if close else "see configs/base.py for the declared keys"
        raise ValueError(f"--config.{key}: no such key; {hint}")


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
    old, cur = _leaves(_plain(dict(saved))), _leaves(_plain(_as_dict(new)))
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


def check_rerun(workdir: str | os.PathLike, config: Any, allow_change: bool) -> list[str]:
    """Refuses to resume ``workdir`` with a config that changes its run.

    If ``workdir/train_config.json`` exists (the loop writes it at the start of every run: call this
    before it does), the workdir has progress to resume (``has_progress``: a checkpoint or a
    summary; a run that stopped before its first save leaves none, and its config is simply
    replaced) and ``config_changes(saved, config)`` is not empty, raises ValueError
    listing the differences and the ways out, unless ``allow_change``. Returns the changes
    (empty when there is no saved config or nothing run-changing differs) so the caller can
    log what ``allow_change`` let through.
    """
    path = epath.Path(workdir) / CONFIG_FILE  # local or gs://
    if not path.is_file() or not has_progress(workdir):
        return []  # nothing saved to resume (e.g. a first run that stopped on bad input): start afresh
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it, or use another --workdir") from None
    changes = config_changes(saved, config)
    if changes and not allow_change:
        raise ValueError(
            f"{workdir} already holds a run whose config ({path}) differs in what it trains:\n  "
            + "\n  ".join(changes)
            + "\nA rerun resumes that run, so its results would mix both configs. Undo the change, use another "
            "--workdir, or pass --allow_config_change to resume with the new settings.")
    return changes
