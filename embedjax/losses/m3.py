"""BGE-M3's training loss (arXiv:2402.03216, FlagEmbedding's ``BGEM3`` model): InfoNCE for each of
the three heads and for their ensemble, plus self-knowledge distillation, the ensemble's softmax
over the candidates teaching each head.

    s_inter = s_dense + 0.3 s_lex + s_mul                       (``embedjax.m3.metrics``' "ensemble")
    L  = (L_dense + L_inter + 0.1 L_lex + L_mul) / 4            (InfoNCE, each at ``scale``)
    L' = (L'_dense + 0.1 L'_lex + L'_mul) / 3                    (-sum_c softmax(s_inter)_c log softmax(s_head)_c)
    loss = (L + L') / 2

Every term is ``embedjax.losses.infonce`` on ``embedjax.m3.rows`` with that head's metric, so the
in-batch and cross-device negatives, hard negatives and the id / qrels masks are InfoNCE's, the
same for every head and for the distillation's candidates.
"""
from __future__ import annotations

from typing import Sequence

from embedjax import m3
from embedjax.losses.infonce import infonce

HEADS = ("dense", "lexical", "multi_vector")
HEAD_LOSS_WEIGHTS = (1.0, 0.1, 1.0)  # dense, lexical, multi-vector: FlagEmbedding's BGEM3


def m3_loss(anchors, positives, negatives=None, *, hidden_size: int, vocab_size: int, scale: float = 50.0,
            ensemble_weights: Sequence[float] = m3.ENSEMBLE_WEIGHTS,
            head_weights: Sequence[float] = HEAD_LOSS_WEIGHTS, self_distill: bool = True, infonce_fn=infonce,
            **infonce_kwargs):
    """``(loss, parts)`` on ``m3.rows`` of queries (B, W), positives (B, W') and negatives (B, k, W') or None.

    ``scale``: 1 / temperature (BGE-M3 fine-tunes at 0.02: 50); ``ensemble_weights``: s_inter's
    (dense, lexical, multi-vector); ``head_weights``: the heads' loss weights; ``self_distill``:
    add L' (off: L alone). ``infonce_kwargs``: InfoNCE's masks (``anchor_ids``, ``positive_ids``,
    ``relevant_ids``, ...); ``infonce_fn``: the InfoNCE every term calls (a training batch's, with
    its masks bound: ``embedjax.train.loss_specs.batch_infonce``). ``parts``: every term, for the logs.
    """
    metric = m3.metrics(hidden_size, vocab_size, ensemble_weights)
    term = lambda similarity, **kw: infonce_fn(anchors, positives, negatives, scale=scale,  # noqa: E731
                                               similarity=similarity, **infonce_kwargs, **kw)
    parts = {f"{head}_loss": term(metric[head]) for head in HEADS}
    parts["ensemble_loss"] = term(metric["ensemble"])
    base = (sum(w * parts[f"{h}_loss"] for h, w in zip(HEADS, head_weights)) + parts["ensemble_loss"]) / 4
    if not self_distill:
        return base, parts
    for head in HEADS:
        parts[f"{head}_distill"] = term(metric[head], teacher_similarity=metric["ensemble"])
    distill = sum(w * parts[f"{h}_distill"] for h, w in zip(HEADS, head_weights)) / 3
    return (base + distill) / 2, parts


__all__ = ["HEADS", "HEAD_LOSS_WEIGHTS", "m3_loss"]
