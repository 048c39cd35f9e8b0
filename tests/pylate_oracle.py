"""PyLate as a parity oracle, run in its own virtualenv (``make oracles``: PyLate pins older
sentence-transformers and transformers than the test extra). tests/test_colbert_model.py calls it:

    .venv-pylate/bin/python tests/pylate_oracle.py REQUEST.json OUTPUT.npz

REQUEST: ``{"model": DIR, "queries": [...], "documents": [...]}``, optionally ``"pool_factor": F`` (the
documents encoded pooled too, as ``p{j}``), and optionally ``"create": {"base":
DIR, "embedding_size": D, "query_length": Lq, "document_length": Ld}`` to build a ColBERT model on
``base`` first (PyLate adds its ``[Q] `` / ``[D] `` markers) and save it as ``model``. OUTPUT holds
``q{i}`` / ``d{j}`` (each text's token vectors, as ``ColBERT.encode`` returns them) and ``scores``
(``pylate.scores.colbert_scores`` of the queries against the documents, padded by PyLate).
"""

import json
import sys

import numpy as np
import torch


def main(request_path: str, output_path: str) -> None:
    from pylate import models, scores

    torch.manual_seed(0)
    request = json.loads(open(request_path).read())
    create = request.get("create")
    if create:
        model = models.ColBERT(create["base"], device="cpu", embedding_size=create["embedding_size"],
                               query_length=create["query_length"], document_length=create["document_length"])
        model.save(request["model"])
    model = models.ColBERT(request["model"], device="cpu")
    queries = model.encode(request["queries"], is_query=True)
    documents = model.encode(request["documents"], is_query=False)
    out = {f"q{i}": q for i, q in enumerate(queries)} | {f"d{j}": d for j, d in enumerate(documents)}
    if request.get("pool_factor", 1) > 1:  # token pooling of the documents (hierarchical clustering)
        pooled = model.encode(request["documents"], is_query=False, pool_factor=request["pool_factor"])
        out |= {f"p{j}": np.asarray(d) for j, d in enumerate(pooled)}
    width = max(d.shape[0] for d in documents)
    padded = np.zeros((len(documents), width, documents[0].shape[1]), np.float32)
    mask = np.zeros((len(documents), width), np.float32)
    for j, d in enumerate(documents):
        padded[j, : len(d)], mask[j, : len(d)] = d, 1
    out["scores"] = scores.colbert_scores(torch.from_numpy(np.stack(queries)), torch.from_numpy(padded),
                                          documents_mask=torch.from_numpy(mask)).numpy()
    np.savez(output_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
