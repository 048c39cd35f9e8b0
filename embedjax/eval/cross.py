"""Cross-encoder evaluation: STS pairs scored by a cross-encoder, and retrieval whose first
stage's top-k a cross-encoder reranks.

Both score pairs with ``CrossEncoder.predict`` on every local device (the batch's rows split
over ``embedjax.sharding.local_mesh()``) and, on several hosts, a strided share per host
(``base.on_every_host``), so every host reports the same figures.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from embedjax.eval import base, ranking_metrics
from embedjax.eval.retrieval import RetrievalEvaluator


def predict(cross_encoder, pairs: Sequence[tuple[str, str]], *, batch_size: int = 64) -> np.ndarray:
    """``cross_encoder.predict(pairs)`` (activation applied) on every device and host; (N,) or (N, L)."""
    from embedjax import sharding

    mesh = sharding.local_mesh()
    return base.on_every_host(lambda share: cross_encoder.predict(share, batch_size=batch_size, mesh=mesh),
                              list(pairs), filler=("", ""))


@dataclasses.dataclass
class CrossEncoderSTSEvaluator:
    """STS with a cross-encoder: Spearman and Pearson (x100, as ``STSEvaluator``) of its scores
    against the gold scores (sentence-transformers' ``CrossEncoderCorrelationEvaluator``, which
    reports fractions); keys ``spearman``, ``pearson``.

    Args:
      pairs: ``ScoredPair``s (e.g. ``embedjax.data.read_stsb``). name: prefix of every key.
    """

    pairs: Sequence
    name: str = "sts"
    batch_size: int = 64
    main_metric: str = "spearman"

    def __post_init__(self):
        self.pairs = list(self.pairs)
        if not self.pairs:
            raise ValueError(f"CrossEncoderSTSEvaluator {self.name!r}: no pairs to evaluate")

    def score(self, cross_encoder) -> dict[str, float]:
        from scipy import stats

        scores = predict(cross_encoder, [(p.text_a, p.text_b) for p in self.pairs], batch_size=self.batch_size)
        if scores.ndim != 1:
            raise ValueError(f"{self.name}: STS needs a one-logit cross-encoder, got {scores.shape[1]} labels")
        gold = np.asarray([p.score for p in self.pairs], np.float64)
        return {"spearman": 100 * float(stats.spearmanr(scores, gold)[0]),
                "pearson": 100 * float(stats.pearsonr(scores, gold)[0])}

    def run(self, cross_encoder) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(cross_encoder))


@dataclasses.dataclass
class RerankEvaluator:
    """Two-stage retrieval: ``first_stage``'s bi-encoder retrieves ``top_k`` documents per query,
    the cross-encoder rescores (query, document) and reorders them.

    ``run(encoder, cross_encoder)`` reports the first stage's keys as ``RetrievalEvaluator`` does
    (``{name}/ndcg@10``, ...) and the reranked list's under ``{name}/rerank@{top_k}/`` (its
    headline ``rerank@{top_k}/ndcg@10``); a cut-off beyond ``top_k`` sees only the reranked ``top_k``.
    """

    first_stage: RetrievalEvaluator
    top_k: int = 100
    batch_size: int = 64

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        self._texts = dict(zip(self.first_stage.data.corpus_ids, self.first_stage.data.corpus_texts))

    @property
    def name(self) -> str:
        return self.first_stage.name

    @property
    def main_metric(self) -> str:
        return f"rerank@{self.top_k}/{self.first_stage.main_metric}"

    def rerank(self, ranked: Sequence[Sequence[str]], cross_encoder) -> list[list[str]]:
        """Each query's candidates (corpus ids, best first) reordered by the cross-encoder's scores."""
        queries = self.first_stage.query_texts
        if len(ranked) != len(queries):
            raise ValueError(f"expected candidates for {len(queries)} queries, got {len(ranked)}")
        pairs = [(q, self._texts[d]) for q, ids in zip(queries, ranked) for d in ids]
        scores = predict(cross_encoder, pairs, batch_size=self.batch_size)
        if scores.ndim != 1:
            raise ValueError(f"{self.name}: reranking needs a one-logit cross-encoder, got {scores.shape[1]} labels")
        out, start = [], 0
        for ids in ranked:
            mine = scores[start:start + len(ids)]
            start += len(ids)
            out.append([ids[i] for i in np.argsort(-mine, kind="stable")])
        return out

    def first_stage_ranking(self, encoder) -> list[list[str]]:
        """Each query's first-stage candidates (corpus ids, best first), deep enough for ``top_k``
        and every cut-off."""
        stage = self.first_stage
        return stage.retrieve(stage.embed(encoder), depth=max(self.top_k, *stage.k_values))

    def score(self, encoder, cross_encoder) -> dict[str, float]:
        return self.score_ranking(self.first_stage_ranking(encoder), cross_encoder)

    def score_ranking(self, ranked: Sequence[Sequence[str]], cross_encoder) -> dict[str, float]:
        """The first stage's metrics of ``ranked`` and the reranked top ``top_k``'s (``score``)."""
        stage = self.first_stage
        ideal, n_relevant = ranking_metrics.ideal_relevance(stage._qrels)
        depth = max(stage.k_values)

        def metrics(lists):
            rels = ranking_metrics.ranked_relevance(lists, stage._qrels, depth)
            return ranking_metrics.retrieval_scores(rels, ideal, n_relevant, stage.k_values)

        first = metrics([ids[:depth] for ids in ranked])
        reranked = metrics(self.rerank([ids[: self.top_k] for ids in ranked], cross_encoder))
        return {**first, **{f"rerank@{self.top_k}/{k}": v for k, v in reranked.items()}}

    def run(self, encoder, cross_encoder) -> Iterator[tuple[str, float]]:
        yield from base.prefixed(self.name, self.score(encoder, cross_encoder))


@dataclasses.dataclass
class FixedFirstStageRerank:
    """``RerankEvaluator`` whose first stage is a fixed bi-encoder (``first_stage_model``, a path or
    hub id): its candidates are retrieved once, on the first run, and every later run (each
    evaluation of a cross-encoder in training) only reranks them. ``run(cross_encoder)``."""

    rerank: RerankEvaluator
    first_stage_model: str
    _ranked: list | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.rerank.name

    @property
    def main_metric(self) -> str:
        return self.rerank.main_metric

    def run(self, cross_encoder) -> Iterator[tuple[str, float]]:
        if self._ranked is None:
            from embedjax.model import load_pretrained

            self._ranked = self.rerank.first_stage_ranking(load_pretrained(self.first_stage_model))
        yield from base.prefixed(self.name, self.rerank.score_ranking(self._ranked, cross_encoder))


STS_KEYS = ("path", "format", "batch_size")
CSTS_KEYS = ("path", "split", "dev_fraction", "seed", "template", "batch_size")
RERANK_KEYS = ("first_stage", "top_k", "batch_size")


def sts_from_spec(name: str, spec) -> CrossEncoderSTSEvaluator:
    """``{"type": "cross_sts", "path": FILE, "format": "stsb" | "sick" | "scored", "batch_size"?}``:
    a cross-encoder scores the file's pairs (``CrossEncoderSTSEvaluator``)."""
    from pathlib import Path

    from embedjax.data import read_scored_pairs
    from embedjax.data.sts_readers import read_sick_sts, read_stsb_sts
    from embedjax.eval.retrieval import check_options

    spec = dict(spec)
    check_options(name, spec, STS_KEYS)
    readers = {"stsb": read_stsb_sts, "sick": read_sick_sts, "scored": read_scored_pairs}
    if spec.get("format") not in readers or "path" not in spec:
        raise ValueError(f"needs 'path' and 'format' one of {tuple(readers)}, got {spec}")
    pairs = readers[spec["format"]](Path(spec["path"]))
    return CrossEncoderSTSEvaluator(pairs, name=name, **({"batch_size": spec["batch_size"]} if "batch_size" in spec
                                                         else {}))


def csts_from_spec(name: str, spec) -> CrossEncoderSTSEvaluator:
    """``{"type": "cross_csts", "path": C-STS CSV, "split": "dev", ...}``: the pairs the ``csts``
    evaluator scores (each sentence written with its condition, the same split carved by sentence
    pair), scored by a cross-encoder that reads both together."""
    from embedjax.data.csts import DEFAULT_TEMPLATE, conditioned_pairs
    from embedjax.eval.csts import examples_of
    from embedjax.eval.retrieval import check_options

    check_options(name, spec, CSTS_KEYS)
    pairs = conditioned_pairs(examples_of(spec), spec.get("template", DEFAULT_TEMPLATE))
    return CrossEncoderSTSEvaluator(pairs, name=name, **({"batch_size": spec["batch_size"]} if "batch_size" in spec
                                                         else {}))


def rerank_from_spec(name: str, spec) -> FixedFirstStageRerank:
    """``{"type": "rerank", "path": BEIR_DIR, "split": "dev", "first_stage": BI_ENCODER, "top_k": 100,
    **RetrievalEvaluator options}``: the cross-encoder reranks ``first_stage``'s top ``top_k``
    (``FixedFirstStageRerank``); keys ``{name}/ndcg@10`` (first stage) and
    ``{name}/rerank@{top_k}/ndcg@10``."""
    from embedjax.eval import retrieval

    spec = dict(spec)
    if "first_stage" not in spec:
        raise ValueError("needs 'first_stage': the bi-encoder (path or hub id) whose candidates are reranked")
    first_stage = spec.pop("first_stage")
    top_k = int(spec.pop("top_k", 100))
    batch_size = int(spec.get("batch_size", 64))
    stage = retrieval.from_spec(name, spec)
    return FixedFirstStageRerank(RerankEvaluator(stage, top_k=top_k, batch_size=batch_size), str(first_stage))
