"""C-STS evaluation (arXiv:2305.15093): Spearman and Pearson (x100) of the model's similarity of
the two sentences, each written with the condition, against the 1-5 labels, over every example
(the paper's protocol). A bi-encoder is scored by ``STSEvaluator`` on
``embedjax.data.csts.conditioned_pairs``; a cross-encoder by
``embedjax.eval.cross.CrossEncoderSTSEvaluator`` on the same pairs.

Config entry (``type: "csts"``, bi-encoders)::

    {"type": "csts", "path": ".../csts/train.csv", "split": "dev", "dev_fraction": 0.1, "seed": 0,
     "template": "{sentence} {condition}", "metrics": ["cosine"], "batch_size": 128}

``split``: ``"dev"`` / ``"train"`` (``split_by_pair``: both conditions of a sentence pair on the
same side) or ``"all"``.
"""

from __future__ import annotations

from typing import Any, Mapping

from embedjax.data.csts import DEFAULT_TEMPLATE, conditioned_pairs, read_csts, split_by_pair
from embedjax.eval.sts import STSEvaluator

SPLITS = ("dev", "train", "all")
OPTIONS = ("path", "split", "dev_fraction", "seed", "template", "metrics", "batch_size")


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


def from_spec(name: str, spec: Mapping[str, Any]) -> STSEvaluator:
    """An ``STSEvaluator`` over the conditioned pairs of a C-STS file (module docstring)."""
    unknown = sorted(set(spec) - set(OPTIONS))
    if unknown:
        raise ValueError(f"C-STS spec {name!r}: unknown keys {unknown}; allowed: {list(OPTIONS)}")
    if "path" not in spec:
        raise ValueError(f"C-STS spec {name!r}: missing 'path' (a C-STS CSV file)")
    pairs = conditioned_pairs(examples_of(spec), spec.get("template", DEFAULT_TEMPLATE))
    options = {k: spec[k] for k in ("metrics", "batch_size") if k in spec}
    return STSEvaluator(pairs, name=name, protocol="pooled", **options)
