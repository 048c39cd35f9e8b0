"""Evaluators on one contract (``embedjax.eval.base``): ``run(encoder)`` yields ``(name, value)`` pairs.

* ``STSEvaluator`` (``sts``): Spearman / Pearson x100, pooled (SentEval "all") and the per-subset mean.
* ``RetrievalEvaluator`` (``retrieval``): BEIR layout; nDCG/MRR/recall/precision/MAP/accuracy@k,
  corpus sharded over every device.
* ``RerankingEvaluator`` (``reranking``): MAP, MRR@10, nDCG@10 (MTEB).
* ``PairClassificationEvaluator`` (``pair_classification``): accuracy, F1, AP at the best
  thresholds (MTEB).
* ``GridEvaluator`` (``grid``) and ``QuantizedEvaluator`` (``quantized``): any of the above over
  (layers x dims) cells, or on int8 / binary embeddings.
* ``suite``: evaluators from config (``config.evals``, ``scripts/eval.py --task``).
* ``embedjax.eval.mteb``: an ``Encoder`` in mteb's encoder protocol (needs ``pip install mteb``).
"""

from embedjax.eval.grid import GridEvaluator
from embedjax.eval.pair_classification import PairClassificationEvaluator
from embedjax.eval.quantized import QuantizedEvaluator
from embedjax.eval.reranking import RerankingEvaluator
from embedjax.eval.retrieval import RetrievalEvaluator
from embedjax.eval.sts import STSEvaluator, correlations
from embedjax.eval.suite import build, from_config, run_all

__all__ = ["GridEvaluator", "PairClassificationEvaluator", "QuantizedEvaluator", "RerankingEvaluator",
           "RetrievalEvaluator", "STSEvaluator", "build", "correlations", "from_config", "run_all"]
