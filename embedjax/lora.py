"""LoRA (Hu et al., arXiv:2106.09685) as pure functions over plain param trees.

Adapters are extra leaves next to the kernels they adapt: a dense ``{"kernel": W (.., in, out),
...}`` chosen by ``LoraSpec.targets`` gains ``lora_a`` (.., in, r) and ``lora_b`` (.., r, out),
and every backbone's ``dense`` adds ``scale * x @ lora_a @ lora_b`` (``scale = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA). The spec travels in the backbone config (``cfg.lora``), a
static jit argument.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which dense layers get adapters and how they are scaled (hashable: part of the static config).

    ``targets`` is a regex ``re.search``-ed against each dense layer's '/'-joined param path
    (e.g. ``layers/attention/(q|k|v|o)$``); ``dropout`` applies to the adapter's input only.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str = ""
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)
