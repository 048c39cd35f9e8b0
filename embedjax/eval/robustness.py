"""Robustness in the PTEB spirit (arXiv:2510.06730): any evaluator run on ``copies`` perturbed
copies of its data, each metric reported as the mean and standard deviation over the copies.

The perturbation is the caller's: ``perturb(text, rng) -> text``. ``RobustnessEvaluator`` applies it
to every text the wrapped evaluator encodes (sentences, queries and documents alike, through any
``encode*`` method of the model: dense, SPLADE, ColBERT and three-head models), so it wraps every
evaluator without knowing its data. Each text's perturbation is drawn from a generator seeded by
``(seed, copy, the text)``: the same text gets the same perturbation within a copy whatever the
batching, order or number of hosts, and a rerun gives the same numbers.

    from embedjax.eval import robustness
    from embedjax.eval.sts import STSEvaluator

    noisy = robustness.RobustnessEvaluator(STSEvaluator(pairs, name="stsb_dev"),
                                           robustness.character_typos(0.05), copies=5)
    metrics = dict(noisy.run(model))   # stsb_dev/cosine_spearman_mean, ..._std, ... and the clean run's keys
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from typing import Callable, Iterator

import numpy as np

Perturbation = Callable[[str, np.random.Generator], str]


def text_seed(seed: int, copy: int, text: str) -> list[int]:
    """The generator seed of one text in one copy: stable across processes (not Python's ``hash``)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return [seed, copy, int.from_bytes(digest, "little")]


class PerturbedModel:
    """``model`` with every ``encode*`` method's texts (its first argument) perturbed; everything
    else is the model's own."""

    def __init__(self, model, perturb: Perturbation, *, seed: int, copy: int):
        self._model, self._perturb, self._seed, self._copy = model, perturb, seed, copy

    def perturbed(self, text: str) -> str:
        out = self._perturb(text, np.random.default_rng(text_seed(self._seed, self._copy, text)))
        if not isinstance(out, str):
            raise TypeError(f"the perturbation returned {type(out).__name__} for {text[:40]!r}; it must return a str")
        return out

    def __getattr__(self, name: str):
        attribute = getattr(self._model, name)
        if not (name.startswith("encode") and callable(attribute)):
            return attribute

        def encode(texts, *args, **kwargs):
            texts = self.perturbed(texts) if isinstance(texts, str) else [self.perturbed(t) for t in texts]
            return attribute(texts, *args, **kwargs)

        return encode


@dataclasses.dataclass
class RobustnessEvaluator:
    """``evaluator`` on ``copies`` perturbed copies: ``{key}_mean`` and ``{key}_std`` (population
    standard deviation over the copies) for each of its metrics, and with ``clean=True`` its
    unperturbed metrics under their own keys beside them."""

    evaluator: object
    perturb: Perturbation
    copies: int = 5
    seed: int = 0
    clean: bool = True

    def __post_init__(self):
        if self.copies < 1:
            raise ValueError(f"copies must be >= 1, got {self.copies}")
        self.name = self.evaluator.name
        self.main_metric = f"{self.evaluator.main_metric}_mean"

    def run(self, model) -> Iterator[tuple[str, float]]:
        runs = [dict(self.evaluator.run(PerturbedModel(model, self.perturb, seed=self.seed, copy=c)))
                for c in range(self.copies)]
        if self.clean:
            yield from self.evaluator.run(model)
        for key in runs[0]:
            values = np.array([r[key] for r in runs], np.float64)
            yield f"{key}_mean", float(values.mean())
            yield f"{key}_std", float(values.std())


def character_typos(rate: float) -> Perturbation:
    """A perturbation: each letter, with probability ``rate``, deleted, doubled, swapped with the
    next character or replaced by a random lowercase letter (one of the four, uniformly)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}")

    def perturb(text: str, rng: np.random.Generator) -> str:
        chars, out, i = list(text), [], 0
        while i < len(chars):
            c = chars[i]
            if not c.isalpha() or rng.random() >= rate:
                out.append(c)
            else:
                edit = rng.integers(4)
                if edit == 1:
                    out += [c, c]
                elif edit == 2 and i + 1 < len(chars):
                    out += [chars[i + 1], c]
                    i += 1
                elif edit == 3:
                    out.append(string.ascii_lowercase[rng.integers(26)])
                # edit 0 (or a swap at the end): the letter is deleted
            i += 1
        return "".join(out)

    return perturb
