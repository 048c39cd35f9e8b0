"""Semantic textual similarity (STS) evaluation.

Embeds both sides of each pair with ``Encoder.encode`` (the jitted ``embed``),
scores them with ``similarity.pairwise`` (the same core the losses use) and
reports Spearman and Pearson correlations x100 against the gold scores.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import numpy as np
from scipy import stats

from embedjax import similarity
from embedjax.data.readers import ScoredPair

DEFAULT_METRICS = ("cosine", "dot", "euclidean", "manhattan")


@functools.partial(jax.jit, static_argnames="metric")
def _scores(a, b, metric):
    # Scores on unit vectors: the standard for embedding models (cosine is unchanged by it).
    return similarity.pairwise(similarity.l2_normalize(a), similarity.l2_normalize(b), metric)


def correlations(za, zb, gold, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """``{'{metric}_spearman': ..., '{metric}_pearson': ...}`` (x100) for embeddings of pairs.

    Embeddings are L2-normalised before scoring, so dot equals cosine and the
    distances are those between unit vectors.
    """
    gold = np.asarray(gold, np.float64)
    out = {}
    for metric in metrics:
        scores = np.asarray(_scores(za, zb, metric), np.float64)
        out[f"{metric}_spearman"] = 100 * stats.spearmanr(scores, gold).statistic
        out[f"{metric}_pearson"] = 100 * stats.pearsonr(scores, gold).statistic
    return out


@dataclasses.dataclass
class STSEvaluator:
    """Evaluates an ``Encoder`` on scored pairs; ``run`` yields ``(name, value)``.

    Args:
      pairs: the scored pairs (e.g. ``read_stsb(".../sts-dev.csv")``).
      name: prefix of every reported key, e.g. ``"stsb_dev"``.
      metrics: similarity functions to report (cosine first: it is the headline).
      dims / layers: Matryoshka truncations and layer counts to report as well.
      batch_size: encode batch size.
    """

    pairs: Sequence[ScoredPair]
    name: str = "sts"
    metrics: Sequence[str] = DEFAULT_METRICS
    dims: Sequence[int | None] = (None,)
    layers: Sequence[int | None] = (None,)
    batch_size: int = 128

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        """Yields ``(f"{name}/{metric}_spearman[@L{layers}][@{dim}]", value)`` for every cell."""
        texts_a = [p.text_a for p in self.pairs]
        texts_b = [p.text_b for p in self.pairs]
        gold = [p.score for p in self.pairs]
        for num_layers in self.layers:
            # Encode at full width once per depth; every dim is a slice of it (Matryoshka).
            za = encoder.encode(texts_a, batch_size=self.batch_size, normalize=False, num_layers=num_layers)
            zb = encoder.encode(texts_b, batch_size=self.batch_size, normalize=False, num_layers=num_layers)
            for dim in self.dims:
                suffix = ("" if num_layers is None else f"@L{num_layers}") + ("" if dim is None else f"@{dim}")
                for key, value in correlations(za[:, :dim], zb[:, :dim], gold, self.metrics).items():
                    yield f"{self.name}/{key}{suffix}", float(value)

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))
