"""The loop's one seam for periodic work: ``Callback(every, fn)``.

The loop's own periodic work (the training log and its NaN guard, evaluation with best-k
selection, checkpoints) and whatever a caller adds (tests inject faults, benchmarks time
steps) are all callbacks, run in order after the step that makes them due.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Callback:
    """``fn(step, state, metrics)`` after every ``every``-th step (and after the last step too
    with ``at_end``). ``metrics`` are the step's device scalars (``float()`` syncs); ``state``
    is donated to the next step, so read what you need before returning."""

    every: int
    fn: Callable[[int, Any, dict], None]
    at_end: bool = False

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or (self.at_end and step == last)


def due(callbacks: Sequence[Callback], step: int, last: int) -> list[Callback]:
    """The callbacks due after ``step`` of ``last``, in order."""
    return [c for c in callbacks if c.due(step, last)]
