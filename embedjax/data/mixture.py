"""Multi-task training: several named sources, each batch from ONE of them.

Multi-task embedding training (e.g. retrieval pairs, NLI triplets and scored STS pairs in one
run) keeps every batch homogeneous: in-batch negatives come from the same task and the loss
sees one kind of record at a time (as GTE, arXiv:2308.03281, and E5, arXiv:2212.03533, sample
each batch from a single task). ``schedule`` says which source global step t draws from;
``MixtureIterator`` runs one ``pipeline.train_pipeline`` per source (each repeating forever,
``num_epochs=None``, so a small source is re-shuffled epoch after epoch while a big one is still
in its first) and yields ``(name, host_batch)``.

The schedule is a pure function of (names, weights, mode, seed, step): every host picks the
same source at every step without communicating, and a resumed run continues the same
sequence. Names are taken in sorted order, so a mapping's insertion order never matters.

Modes:

* ``"sampled"``: step t draws source i with probability ``w_i / sum(w)``, from a numpy
  ``Generator`` seeded with ``(seed, t)``: independent of every other step.
* ``"round_robin"``: deterministic smooth weighted round robin. Step t goes to the source with
  the largest deficit ``(t + 1) * w_i / W - n_i(t)`` (``W = sum(w)``, ``n_i(t)`` the batches
  source i got in steps 0..t-1), ties to the first name: nginx's smooth weighted round robin.
  Equal weights take the names in turn (A B C A B C ...); weights 2:1 give A B A A B A ...
  (period 3, A twice in it: at step 1 B's deficit 2/3 beats A's 1/3, so B comes between). The
  weights are read as ratios of integers (each rounded to a fraction with denominator <= 1000,
  then scaled to the smallest integers with the same ratios: 0.7 / 0.3 -> 7 / 3); the pattern
  repeats with period = the sum of those integers (at most 100,000).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from embedjax.data import pipeline

MODES = ("sampled", "round_robin")
MAX_ROUND_ROBIN_PERIOD = 100_000


def _check(names: Sequence[str], weights: Sequence[float], mode: str, seed: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validated ``(names, weights)`` as tuples (ValueError naming the bad argument)."""
    names, weights = tuple(names), tuple(weights)
    if not names:
        raise ValueError("a mixture needs at least one source (names is empty)")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"source names must be distinct non-empty strings, got {list(names)}")
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} sources {list(names)}: expected one weight per source")
    for name, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise ValueError(f"the weight of source {name!r} is {w!r}: expected a finite number > 0")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return names, weights


def integer_weights(weights: Sequence[float]) -> tuple[int, ...]:
    """The smallest integers with the ratios of ``weights`` (each weight first rounded to a fraction
    with denominator <= 1000): (2, 1) -> (2, 1); (0.7, 0.3) -> (7, 3); (0.5, 0.5, 1.0) -> (1, 1, 2)."""
    fractions = [Fraction(w).limit_denominator(1000) for w in weights]
    if any(f <= 0 for f in fractions):
        raise ValueError(f"weights {list(weights)} round to 0 at a 1/1000 resolution; round_robin needs them larger "
                         "(only their ratios matter: scale them all up)")
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    common = math.gcd(*ints)
    return tuple(i // common for i in ints)


@functools.lru_cache(maxsize=32)
def _round_robin_pattern(weights: tuple[int, ...]) -> tuple[int, ...]:
    """One period (sum(weights) steps) of smooth weighted round robin over integer ``weights``:
    the source index of each step. The deficits are back to 0 after a period, so it repeats."""
    total = sum(weights)
    if total > MAX_ROUND_ROBIN_PERIOD:
        raise ValueError(f"round_robin weights {weights} repeat only every {total} steps (more than "
                         f"{MAX_ROUND_ROBIN_PERIOD}); use weights with simpler ratios, or mode='sampled'")
    current = np.zeros(len(weights), np.int64)  # W * deficit, in integers: exact
    step_weights = np.asarray(weights, np.int64)
    pattern = []
    for _ in range(total):
        current += step_weights
        pick = int(np.argmax(current))  # argmax returns the first maximum: ties go to the first name
        current[pick] -= total
        pattern.append(pick)
    return tuple(pattern)


def schedule(names: Sequence[str], weights: Sequence[float], mode: str, seed: int, step: int) -> str:
    """The source of global step ``step`` (0-based): pure in all its arguments.

    Args:
      names: the source names, in the order ties and the sampler's intervals use
        (``MixtureIterator`` passes them sorted).
      weights: one positive weight per name; only their ratios matter.
      mode: "sampled" (random by weight, ``Generator(PCG64(SeedSequence((seed, step))))``: step t's
        draw does not depend on any other step) or "round_robin" (the deterministic rule of the
        module docstring).
      seed: integer >= 0 (sampled mode only).
      step: integer >= 0.

    Returns the name of the source step ``step`` draws its batch from.
    """
    names, weights = _check(names, weights, mode, seed)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if mode == "round_robin":
        pattern = _round_robin_pattern(integer_weights(weights))
        return names[pattern[int(step) % len(pattern)]]
    cumulative = np.cumsum(weights) / math.fsum(weights)
    u = np.random.default_rng((int(seed), int(step))).random()
    # source i owns [c_{i-1}, c_i); min() guards u against a cumulative sum rounding to just below 1
    return names[min(int(np.searchsorted(cumulative, u, side="right")), len(names) - 1)]


def _fingerprint(names, weights, mode, seed, iterators) -> str:
    parts = "; ".join(f"{n}: weight={float(w)!r} [{getattr(iterators[n], 'fingerprint', type(iterators[n]).__name__)}]"
                      for n, w in zip(names, weights))
    return f"mixture mode={mode} seed={seed} sources={{{parts}}}"


class MixtureIterator(grain.DatasetIterator):
    """Batches of several sources, each step's from the one ``schedule`` picks.

    ``__next__`` -> ``(name, host_batch)``. ``get_state()`` -> ``{"step", "sources": {name:
    source state}, "fingerprint"}`` (JSON-able); ``set_state`` resumes at the next step and
    refuses a state of another mixture (other names, weights, mode, seed or source pipelines).
    Sources are read only when picked: a source's position is its own state, so resuming
    needs no replay of the schedule.
    """

    def __init__(self, iterators: Mapping[str, Any], weights: Mapping[str, float], *, mode: str = "sampled",
                 seed: int = 0):
        """Args:
          iterators: {name: ``pipeline.train_pipeline(..., num_epochs=None)``}: iterators with
            ``get_state`` / ``set_state`` that never run out.
          weights: {name: weight > 0}, the same names.
          mode: "sampled" or "round_robin" (see ``schedule``).
          seed: the schedule's seed (the sources shuffle with their own seeds).
        """
        super().__init__()  # no grain parents: the sources keep their own contexts
        self.iterators: dict[str, Any] = {}  # set once valid: close() (also from __del__) closes only these
        missing, extra = sorted(set(iterators) - set(weights)), sorted(set(weights) - set(iterators))
        if missing or extra:
            raise ValueError(f"weights must name exactly the sources {sorted(iterators)}: missing {missing}, "
                             f"unknown {extra}")
        names = tuple(sorted(iterators))
        self.names, self.weights = _check(names, [weights[n] for n in names], mode, seed)
        self.mode, self.seed = mode, int(seed)
        for name in names:
            it = iterators[name]
            if getattr(it, "num_batches", None) is not None:
                raise ValueError(f"source {name!r} stops after {it.num_batches} batches (num_epochs="
                                 f"{getattr(it, 'num_epochs', '?')}); a mixture source must repeat forever: build it "
                                 "with train_pipeline(..., num_epochs=None)")
        self.iterators = dict(iterators)
        self.fingerprint = _fingerprint(self.names, self.weights, mode, self.seed, self.iterators)
        self.step = 0

    def source_of(self, step: int) -> str:
        """The source of global step ``step``."""
        return schedule(self.names, self.weights, self.mode, self.seed, step)

    def __next__(self) -> tuple[str, dict[str, np.ndarray]]:
        name = self.source_of(self.step)
        batch = next(self.iterators[name])
        self.step += 1
        return name, batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "sources": {n: self.iterators[n].get_state() for n in self.names},
                "fingerprint": self.fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"iterator state is for another mixture:\n  state:   {state.get('fingerprint')}\n"
                             f"  mixture: {self.fingerprint}")
        for name in self.names:
            self.iterators[name].set_state(state["sources"][name])
        self.step = int(state["step"])

    def start_prefetch(self) -> None:
        for it in self.iterators.values():
            getattr(it, "start_prefetch", lambda: None)()

    def close(self) -> None:
        for it in self.iterators.values():
            getattr(it, "close", lambda: None)()
        super().close()


def mixture_steps_per_epoch(sizes: Mapping[str, int], global_batch_size: int, host_count: int = 1) -> int:
    """Steps of one mixture "epoch": the sum over sources of ``pipeline.steps_per_epoch`` (as many
    steps as one pass over every source would take; at the weights' proportions a source may be
    read more or less than once in that many steps).

    Args:
      sizes: {name: number of examples}.
      global_batch_size: rows per step over all hosts.
      host_count: the number of hosts (the global batch must split evenly).
    """
    if not sizes:
        raise ValueError("a mixture needs at least one source (sizes is empty)")
    total = 0
    for name, n in sizes.items():
        steps = pipeline.steps_per_epoch(int(n), global_batch_size, host_count)
        if steps == 0:
            raise ValueError(f"source {name!r} has {n} examples, fewer than the global batch of {global_batch_size}: "
                             "no full batch to train on")
        total += steps
    return total


__all__ = ["MODES", "MixtureIterator", "integer_weights", "mixture_steps_per_epoch", "schedule"]
