"""SPLADE's training loss: any dense loss on the sparse vectors' dot products, plus the FLOPS
regulariser on the queries and on the documents, each with its own weight.

    L = base(q, d, n) + lambda_q * FLOPS(q) + lambda_d * FLOPS([d; n])

``FLOPS(w) = sum_j (mean_b w_bj)^2`` (``embedjax.sparse.flops``). The documents' term covers
every document column of the batch, positives and hard negatives together, as
sentence-transformers' ``SpladeLoss``; ``lambda_q = None`` regularises the documents only
(inference-free query sides, whose query weights are a lookup). Warm the weights up with
``embedjax.sparse.regulariser_weight`` (SPLADE: quadratic over the first third of training).
The base loss defaults to InfoNCE on dot products at scale 1 (sentence-transformers'
``SparseMultipleNegativesRankingLoss``); any of ``embedjax.losses`` taking embeddings first fits.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from embedjax.losses.infonce import infonce
from embedjax.sparse import flops

SPARSE_INFONCE = functools.partial(infonce, scale=1.0, similarity="dot")


def splade_loss(anchors, positives, negatives=None, *, query_weight: float | None, document_weight: float,
                base=SPARSE_INFONCE, query_threshold: int | None = None, document_threshold: int | None = None,
                **base_kwargs):
    """``(total, parts)``: the base loss plus the weighted FLOPS terms, and each term alone
    (``base``, ``query_flops``, ``document_flops``, unweighted) for logging.

    ``anchors`` (B, V) query weights; ``positives`` (B, V) or (B, m, V); ``negatives`` (B, V),
    (B, k, V) or None. Every positive slot and negative enters the documents' mean (padding
    slots of a ``positive_mask`` too: pass real documents only when the mean must not see them).
    """
    base_value = base(anchors, positives, negatives, **base_kwargs)
    width = anchors.shape[-1]
    documents = positives.reshape(-1, width)
    if negatives is not None:
        documents = jnp.concatenate([documents, negatives.reshape(-1, width)], axis=0)
    doc_term = flops(documents, threshold=document_threshold)
    parts = {"base": base_value, "document_flops": doc_term}
    total = base_value + document_weight * doc_term
    if query_weight is not None:
        parts["query_flops"] = flops(anchors, threshold=query_threshold)
        total = total + query_weight * parts["query_flops"]
    return total, parts
