"""C-STS evaluation (arXiv:2305.15093): Spearman and Pearson (x100) of the model's similarity of
the two sentences under the condition against the 1-5 labels, over every example (the paper's
protocol), for the paper's three model families:

* a bi-encoder (``family: "bi"``): ``STSEvaluator`` on ``embedjax.data.csts.conditioned_pairs``
  (each sentence written with the condition), cosine;
* a tri-encoder (``family: "tri"``): ``TriCSTSEvaluator``: the sentences and the condition embedded
  apart, the encoder's ``tri_head`` conditions each sentence, cosine (``embedjax.tri_head.score``);
* a cross-encoder: ``embedjax.eval.cross.CrossEncoderSTSEvaluator`` on the conditioned pairs
  (suite type ``cross_csts``).

Both bi and tri report ``cosine_spearman`` / ``cosine_pearson``.

Config entry (``type: "csts"``, bi-encoders)::

    {"type": "csts", "path": ".../csts/train.csv", "split": "dev", "dev_fraction": 0.1, "seed": 0,
     "family": "bi", "template": "{sentence} {condition}", "metrics": ["cosine"], "batch_size": 128}

(``template`` and ``metrics``: bi only.)

``split``: ``"dev"`` / ``"train"`` (``split_by_pair``: both conditions of a sentence pair on the
same side) or ``"all"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from embedjax import tri_head
from embedjax.data.csts import DEFAULT_TEMPLATE, CSTSExample, conditioned_pairs, read_csts, split_by_pair
from embedjax.eval import base
from embedjax.eval.sts import STSEvaluator, correlations

SPLITS = ("dev", "train", "all")
FAMILIES = ("bi", "tri")
OPTIONS = ("path", "split", "dev_fraction", "seed", "family", "template", "metrics", "batch_size")


def examples_of(spec: Mapping[str, Any]) -> list:
    """The C-STS examples a spec selects (``path``, ``split``, ``dev_fraction``, ``seed``)."""
    split = spec.get("split", "dev")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    examples = read_csts(spec["path"])
    if split == "all":
        return list(examples)
    train, dev = split_by_pair(examples, dev_fraction=float(spec.get("dev_fraction", 0.1)),
                               seed=int(spec.get("seed", 0)))
    return dev if split == "dev" else train


@dataclasses.dataclass
class TriCSTSEvaluator:
    """C-STS for a tri-encoder: each distinct sentence and condition embedded once (raw, as the
    tri-encoder trains), each sentence conditioned by the encoder's ``params["tri_head"]``, and
    the cosine of the two conditioned embeddings correlated with the labels (x100)."""

    examples: Sequence[CSTSExample]
    name: str = "csts"
    batch_size: int = 128
    main_metric: str = "cosine_spearman"

    def embed(self, encoder, *, num_layers: int | None = None) -> base.Embeddings:
        """``{"a": f(s1, c), "b": f(s2, c)}``, ``(N, D)`` each: the conditioned embeddings."""
        head = encoder.params.get(tri_head.KEY)
        if head is None:
            raise ValueError(f"C-STS {self.name!r} (family tri) needs a tri-encoder: params['tri_head'] is missing "
                             "(load it with load_pretrained(..., tri_head=...) or train with model_kind=tri_encoder)")
        texts = list(dict.fromkeys(t for e in self.examples for t in (e.sentence1, e.sentence2, e.condition)))
        row = {t: i for i, t in enumerate(texts)}
        z = base.encode(encoder, texts, batch_size=self.batch_size, num_layers=num_layers, normalize=False)
        pick = lambda field: z[[row[getattr(e, field)] for e in self.examples]]  # noqa: E731
        c = pick("condition")
        return {side: np.asarray(tri_head.condition(head, pick(field), c))
                for side, field in (("a", "sentence1"), ("b", "sentence2"))}

    def score(self, embeddings: base.Embeddings, *, reference: base.Embeddings | None = None) -> dict[str, float]:
        """``cosine_spearman`` and ``cosine_pearson`` of the conditioned embeddings."""
        return correlations(embeddings["a"], embeddings["b"], [e.label for e in self.examples], ("cosine",))

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))


def from_spec(name: str, spec: Mapping[str, Any]) -> STSEvaluator | TriCSTSEvaluator:
    """The C-STS evaluator of a spec's ``family`` (module docstring)."""
    unknown = sorted(set(spec) - set(OPTIONS))
    if unknown:
        raise ValueError(f"C-STS spec {name!r}: unknown keys {unknown}; allowed: {list(OPTIONS)}")
    if "path" not in spec:
        raise ValueError(f"C-STS spec {name!r}: missing 'path' (a C-STS CSV file)")
    family = spec.get("family", "bi")
    if family not in FAMILIES:
        raise ValueError(f"C-STS spec {name!r}: family must be one of {FAMILIES}, got {family!r}")
    if family == "tri":
        bi_only = sorted({"template", "metrics"} & set(spec))
        if bi_only:
            raise ValueError(f"C-STS spec {name!r}: {bi_only} apply to family 'bi' (a tri-encoder scores the cosine "
                             "of its conditioned embeddings)")
        return TriCSTSEvaluator(examples_of(spec), name=name, batch_size=int(spec.get("batch_size", 128)))
    pairs = conditioned_pairs(examples_of(spec), spec.get("template", DEFAULT_TEMPLATE))
    options = {k: spec[k] for k in ("metrics", "batch_size") if k in spec}
    return STSEvaluator(pairs, name=name, protocol="pooled", **options)
