"""Shared helpers for mapping PyTorch-named state dicts onto embedjax param trees.

Each backbone module owns its name map; these helpers give every one of them the same
bookkeeping (missing and unexpected tensors listed in one error, shapes checked against
the config) so that a checkpoint that does not fit says exactly why.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import jax
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be mapped onto an embedjax encoder."""


def strip_prefix(state: dict[str, np.ndarray], prefixes: Iterable[str], marker: str) -> dict[str, np.ndarray]:
    """Removes the first of ``prefixes`` under which a tensor named ``prefix + marker...`` exists
    (e.g. ``bert.`` before ``embeddings.``; ``model.`` before ``layers.``)."""
    for prefix in prefixes:
        if any(k.startswith(prefix + marker) for k in state):
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


class Reader:
    """Takes tensors out of a state dict by name, remembering what was used and what was missing.

    ``aliases(name)`` gives other names a tensor may have (e.g. TF-era ``gamma``/``beta``).
    """

    def __init__(self, state: dict[str, np.ndarray], aliases: Callable[[str], Iterable[str]] = lambda n: ()):
        self.state = state
        self.aliases = aliases
        self.used: set[str] = set()
        self.missing: list[str] = []

    def take(self, name: str, transpose: bool = False):
        """The tensor ``name`` as float32 numpy (transposed if asked); None (and recorded) if absent."""
        for candidate in (name, *self.aliases(name)):
            if candidate in self.state:
                self.used.add(candidate)
                arr = np.asarray(self.state[candidate], dtype=np.float32)
                return arr.T if transpose else arr
        self.missing.append(name)
        return None

    def check(self, description: str, ignored: re.Pattern) -> None:
        """Raises ``CheckpointError`` listing every missing and every unexpected (unused, not
        ``ignored``) tensor."""
        unexpected = sorted(k for k in self.state if k not in self.used and not ignored.match(k))
        if self.missing or unexpected:
            show = lambda xs: f"{xs[:20]}{' ...' if len(xs) > 20 else ''}"
            raise CheckpointError(
                f"checkpoint does not match {description}:\n"
                f"  missing ({len(self.missing)}): {show(self.missing)}\n"
                f"  unexpected ({len(unexpected)}): {show(unexpected)}"
            )


def stack_layers(per_layer: list) -> dict:
    """A list of per-layer param trees -> one tree whose leaves have a leading layer axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *per_layer)


def check_shapes(params: dict, expected) -> None:
    """Raises ``CheckpointError`` when a leaf's shape differs from ``expected`` (an abstract tree,
    e.g. ``jax.eval_shape`` of the backbone's ``init``)."""
    flat_exp = dict(jax.tree_util.tree_leaves_with_path(expected))
    bad = [
        f"{jax.tree_util.keystr(path)}: checkpoint {np.shape(leaf)} vs config {flat_exp[path].shape}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if path in flat_exp and tuple(np.shape(leaf)) != tuple(flat_exp[path].shape)
    ]
    if bad:
        raise CheckpointError("tensor shapes do not match config.json:\n  " + "\n  ".join(bad))
