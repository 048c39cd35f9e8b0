"""Exact search over learned sparse vectors (SPLADE) on the host: an inverted index as a scipy
CSR matrix, and top-k by sparse dot product.

SPLADE vectors have a vocabulary-sized width (30,522 for BERT) but a few dozen to a few hundred
non-zero terms, so they stay sparse from the device to the index: ``to_csr`` keeps the non-zero
terms of a (B, V) batch, ``SparseIndex`` stacks a corpus's batches, and ``search`` scores a
block of queries against every document with one sparse product (queries x terms) @ (terms x
documents), whose cost is the number of (query term, document term) matches, not the corpus size
times the vocabulary. The scores of a block are a dense (block, documents) array, so queries go
in blocks of ``block`` rows; ``top_k`` over it is exact, ties broken by the lower document index.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp


def to_csr(weights, *, threshold: float = 0.0) -> sp.csr_matrix:
    """The terms of a (B, V) weight batch above ``threshold``, as a float32 CSR matrix."""
    w = np.asarray(weights, np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected (batch, vocabulary) weights, got shape {w.shape}")
    return sp.csr_matrix(np.where(w > threshold, w, 0.0).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class SparseIndex:
    """A corpus's sparse vectors: ``docs`` (documents x vocabulary, CSR) and, built once, its
    transpose ``postings`` (vocabulary x documents, CSR: each term's posting list)."""

    docs: sp.csr_matrix
    postings: sp.csr_matrix

    @classmethod
    def build(cls, batches) -> "SparseIndex":
        """Stacks CSR batches (``to_csr`` of each encoded block, in corpus order)."""
        docs = sp.vstack(list(batches), format="csr").astype(np.float32)
        docs.sum_duplicates()
        return cls(docs=docs, postings=docs.T.tocsr())

    @property
    def num_docs(self) -> int:
        return self.docs.shape[0]

    def active_terms(self) -> np.ndarray:
        """Non-zero terms per document."""
        return np.diff(self.docs.indptr)

    def search(self, queries: sp.csr_matrix, k: int, *, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` documents per query by sparse dot product: (scores, document indices),
        both (Q, min(k, documents)), best first; equal scores in document order."""
        queries = sp.csr_matrix(queries, dtype=np.float32)
        if queries.shape[1] != self.docs.shape[1]:
            raise ValueError(f"queries have {queries.shape[1]} terms, the index {self.docs.shape[1]}")
        k = min(int(k), self.num_docs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        scores = np.empty((queries.shape[0], k), np.float32)
        ids = np.empty((queries.shape[0], k), np.int64)
        for start in range(0, queries.shape[0], block):
            dense = (queries[start:start + block] @ self.postings).toarray()
            scores[start:start + block], ids[start:start + block] = _top_k(dense, k)
        return scores, ids


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a dense block, equal scores by the lower column (a stable sort)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order
