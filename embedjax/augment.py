"""Augmented SBERT (Thakur et al., arXiv:2010.08240): silver sentence pairs for a bi-encoder.

The gold pairs of a small STS training set cover few of the pairs its sentences could form. A
cross-encoder trained on the gold pairs labels new ones, sampled from the same sentences, and the
bi-encoder trains on gold plus silver. Sampling as the paper's best strategies: for every
sentence its ``top_k`` nearest other sentences by a bi-encoder (semantic-search sampling: the
similar pairs random sampling almost never draws) and ``random_pairs`` random partners (the
dissimilar end of the scale). ``label_pairs`` scores them with the cross-encoder on the gold
scale (``scale``: 5 for STS-B's 0-5 labels from a sigmoid cross-encoder).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from embedjax.data.readers import ScoredPair


def _key(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def sample_pairs(sentences: Sequence[str], encoder, *, top_k: int = 3, random_pairs: int = 3, seed: int = 0,
                 exclude: Iterable[tuple[str, str]] = (), batch_size: int = 128, mesh=None) -> list[tuple[str, str]]:
    """New (unordered, distinct) sentence pairs: each sentence with its ``top_k`` nearest other
    sentences by ``encoder`` (cosine, exact search on every device), then ``random_pairs`` random
    partners each (``numpy.random.default_rng(seed)``). Pairs in ``exclude`` (the gold pairs, in
    either order), pairs of a sentence with itself and repeats are left out. Sentences are
    deduplicated first; the result is deterministic for a seed.
    """
    from embedjax import sharding
    from embedjax.eval.search import sharded_topk

    if top_k < 0 or random_pairs < 0:
        raise ValueError(f"top_k and random_pairs must be >= 0, got {top_k} and {random_pairs}")
    texts = list(dict.fromkeys(sentences))
    if len(texts) < 2:
        raise ValueError(f"need at least two distinct sentences to pair, got {len(texts)}")
    seen = {_key(a, b) for a, b in exclude}
    out: list[tuple[str, str]] = []

    def add(i: int, j: int) -> None:
        key = _key(texts[i], texts[j])
        if i != j and key not in seen:
            seen.add(key)
            out.append((texts[i], texts[j]))

    if top_k:
        mesh = sharding.local_mesh() if mesh is None else mesh
        emb = encoder.encode(texts, batch_size=batch_size, normalize=True, mesh=mesh)
        k = min(top_k + 1, len(texts))  # + 1: a sentence is its own nearest neighbour
        _, nearest = sharded_topk(emb, emb, k, mesh=mesh, metric="cosine")
        for i, row in enumerate(nearest):
            for j in [int(j) for j in row if j != i][:top_k]:
                add(i, j)
    rng = np.random.default_rng(seed)
    for i in range(len(texts)):
        for j in rng.choice(len(texts) - 1, size=min(random_pairs, len(texts) - 1), replace=False):
            add(i, int(j) + (j >= i))  # partners other than i, uniformly
    return out


def label_pairs(pairs: Sequence[tuple[str, str]], cross_encoder, *, scale: float = 1.0,
                batch_size: int = 64) -> list[ScoredPair]:
    """``ScoredPair(a, b, scale * cross_encoder score)`` for every pair (the cross-encoder's
    activation applied: a sigmoid cross-encoder gives 0-1, so ``scale=5`` puts the silver labels
    on STS-B's 0-5 scale), scored on every local device."""
    from embedjax import sharding

    scores = cross_encoder.predict(list(pairs), batch_size=batch_size, mesh=sharding.local_mesh())
    if scores.ndim != 1:
        raise ValueError(f"silver labels need a one-logit cross-encoder, this one has {scores.shape[1]} labels")
    return [ScoredPair(a, b, float(scale * s)) for (a, b), s in zip(pairs, scores)]
