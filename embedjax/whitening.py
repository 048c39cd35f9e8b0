"""PCA whitening of sentence embeddings (BERT-whitening, arXiv:2103.15316; WhiteningBERT,
arXiv:2104.01767): ``y = (x - mu) W`` with ``W = U diag(1 / sqrt(lambda))`` from the
eigen-decomposition of the embeddings' covariance, optionally keeping the first ``dim`` components
(a dimension reduction as well).

The fitted transform is a Dense head with the identity activation (``embedjax.dense_head``:
kernel ``W``, bias ``-mu W``), so a whitened encoder encodes, evaluates, trains and exports like any
other, and sentence-transformers loads the export (Pooling, Dense, [Normalize]).

    encoder = embedjax.load_pretrained("all-MiniLM-L6-v2")
    white = whitening.whiten(encoder, corpus_sentences, dim=256)
    white.encode(["A man is playing a guitar."])   # whitened (and normalised, as the checkpoint says)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from embedjax import dense_head


# Components whose variance is below this fraction of the largest are not directions of the data:
# mean-pooled BERT states lie in a hyperplane (each token's LayerNorm output sums to a constant), so
# one of their covariance's eigenvalues is zero up to round-off.
RANK_TOLERANCE = 1e-8


def fit(embeddings, *, dim: int | None = None) -> dict:
    """The whitening Dense head of ``embeddings`` (N, D): ``{"kernel": (D, dim), "bias": (dim,)}``,
    float32, so that ``embeddings @ kernel + bias`` has zero mean and identity covariance (over the
    kept components, in decreasing order of variance). ``dim``: components kept (default: every
    component the embeddings span, their numerical rank; ValueError when ``dim`` exceeds it)."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"whitening fits on (N, D) embeddings with N >= 2, got shape {x.shape}")
    if dim is not None and not 1 <= int(dim) <= x.shape[1]:
        raise ValueError(f"dim must be in 1..{x.shape[1]}, got {dim}")
    mu = x.mean(axis=0)
    centred = x - mu
    covariance = centred.T @ centred / len(x)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    rank = int(np.sum(eigenvalues > RANK_TOLERANCE * max(eigenvalues[0], 1e-300)))
    width = rank if dim is None else int(dim)
    if rank == 0 or width > rank:
        raise ValueError(f"the embeddings span {rank} dimensions, fewer than dim={dim} (more varied texts, or a "
                         "smaller dim)")
    eigenvalues, eigenvectors = eigenvalues[:width], eigenvectors[:, :width]
    kernel = eigenvectors / np.sqrt(eigenvalues)
    return {"kernel": kernel.astype(np.float32), "bias": (-mu @ kernel).astype(np.float32)}


def whiten(encoder, texts: Sequence[str], *, dim: int | None = None, batch_size: int = 64, **encode_kwargs):
    """``encoder`` with a whitening Dense head fitted on its pooled (unnormalised) embeddings of
    ``texts`` (the head sits before the checkpoint's normalisation, as sentence-transformers'
    Pooling -> Dense -> Normalize). ``encode_kwargs``: passed to ``encode`` (e.g. ``prompt_name``)."""
    if encoder.dense is not None:
        raise ValueError(f"the encoder already has a Dense head ({encoder.dense}); whiten the model without it")
    x = encoder.encode(list(texts), batch_size=batch_size, normalize=False, **encode_kwargs)
    head = fit(x, dim=dim)
    return dataclasses.replace(encoder, params={**encoder.params, dense_head.KEY: head}, dense="identity")
