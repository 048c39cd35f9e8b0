"""Sparse search (embedjax/sparse_index.py) against brute force written here: every query's score
with every document by a dense loop, sorted by (score descending, document index)."""

import numpy as np
import pytest
import scipy.sparse as sp

from embedjax.sparse_index import SparseIndex, to_csr


def _sparse_rows(rng, n, v, active):
    w = np.zeros((n, v), np.float32)
    for i in range(n):
        terms = rng.choice(v, size=active, replace=False)
        w[i, terms] = rng.integers(1, 6, size=active) / 4.0  # few distinct values: many ties
    return w


def brute_force(q, d, k):
    out_scores, out_ids = [], []
    for row in q:
        scored = [(float(np.dot(row.astype(np.float64), doc)), j) for j, doc in enumerate(d)]
        scored.sort(key=lambda t: (-t[0], t[1]))
        out_scores.append([s for s, _ in scored[:k]])
        out_ids.append([j for _, j in scored[:k]])
    return np.array(out_scores), np.array(out_ids)


@pytest.mark.parametrize("k,block", [(1, 256), (5, 3), (40, 7), (100, 256)])
def test_search_equals_brute_force_ties_included(k, block):
    rng = np.random.default_rng(0)
    docs, queries = _sparse_rows(rng, 40, 60, 6), _sparse_rows(rng, 11, 60, 4)
    queries[3] = 0.0  # a query with no terms scores every document 0
    index = SparseIndex.build([to_csr(docs[:17]), to_csr(docs[17:])])
    scores, ids = index.search(to_csr(queries), k, block=block)
    want_scores, want_ids = brute_force(queries, docs, min(k, 40))
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    np.testing.assert_array_equal(ids, want_ids)
    assert scores.shape == (11, min(k, 40))


def test_index_keeps_only_active_terms_and_refuses_bad_input():
    w = np.array([[0.0, 0.5, 0.0, 0.01], [0.0, 0.0, 0.0, 0.0]], np.float32)
    assert to_csr(w).nnz == 2 and to_csr(w, threshold=0.1).nnz == 1
    index = SparseIndex.build([to_csr(w)])
    np.testing.assert_array_equal(index.active_terms(), [2, 0])
    assert isinstance(index.postings, sp.csr_matrix) and index.postings.shape == (4, 2)
    with pytest.raises(ValueError, match="queries have 3 terms, the index 4"):
        index.search(sp.csr_matrix(np.ones((1, 3), np.float32)), 1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(to_csr(w), 0)
    with pytest.raises(ValueError, match=r"expected \(batch, vocabulary\) weights"):
        to_csr(np.ones(3))
