"""Evaluation as one process of several: ``python tests/eval_on_hosts.py OUT MODEL EVALS_JSON [PORT N I]``.

Encodes ``TEXTS`` with ``embedjax.eval.base.encode`` (each host its share, gathered) and runs the
evaluators of ``EVALS_JSON`` (``config.evals`` entries, ``embedjax.eval.suite``); writes
``OUT.process<I>.npz`` (the embeddings) and ``OUT.process<I>.json`` (the metrics). With PORT N I,
joins a ``jax.distributed`` run of N processes first. With ``CROSS_ENCODER=<dir>`` in the
environment, also reranks the ``ir`` evaluator's top 20 with that cross-encoder
(``embedjax.eval.cross``). tests/test_eval_encode.py launches it.
"""

import json
import os
import sys

import numpy as np

TEXTS = [f"sentence number {i} about {'cats' if i % 3 else 'the weather'} and more" * (1 + i % 4) for i in range(37)]


def main(argv):
    out, model, evals = argv[1], argv[2], json.loads(argv[3])
    from embedjax import distributed

    if len(argv) > 4:
        port, n, i = argv[4:7]
        distributed.initialize(f"127.0.0.1:{port}", int(n), int(i))
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import embedjax
    from embedjax.eval import base, suite

    encoder = embedjax.load_pretrained(model)
    embeddings = base.encode(encoder, TEXTS, batch_size=8)
    metrics = suite.run_all(suite.from_config(evals), encoder)
    if os.environ.get("CROSS_ENCODER"):
        from embedjax.eval import cross, retrieval

        spec = {k: v for k, v in evals["ir"].items() if k not in ("type", "quantize")}
        reranker = cross.RerankEvaluator(retrieval.from_spec("ir", spec), top_k=20)
        metrics.update(reranker.run(encoder, embedjax.load_cross_encoder(os.environ["CROSS_ENCODER"])))
    me = jax.process_index()
    np.savez(f"{out}.process{me}.npz", embeddings=embeddings)
    with open(f"{out}.process{me}.json", "w") as f:
        json.dump({"metrics": metrics, "process_count": jax.process_count(), "devices": jax.device_count()}, f)


if __name__ == "__main__":
    main(sys.argv)
