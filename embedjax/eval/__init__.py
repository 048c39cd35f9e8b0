"""Evaluators: each has ``run(encoder)`` yielding ``(name, value)`` pairs."""

from embedjax.eval.sts import STSEvaluator, correlations

__all__ = ["STSEvaluator", "correlations"]
