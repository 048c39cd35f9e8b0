"""The SPLADE training objective: a dense contrastive loss on sparse dot products, plus the FLOPS
regulariser on queries and documents, warmed up over the first steps.

A SPLADE run (``config.model_kind = "splade"``) encodes every side of a batch to vocabulary-wide
term weights (``embedjax.sparse.splade_embed``: the backbone, its MLM head, max or sum pooling)
and applies ``embedjax.losses.splade.splade_loss``: the base loss (``objective.loss``, InfoNCE by
default at scale 1 on dot products, sentence-transformers' SparseMultipleNegativesRankingLoss;
qrels masks, false-negative margins and cross-device negatives as for dense runs; or MarginMSE /
listwise KL on a teacher's scores, SparseMarginMSELoss / SparseDistillKLDivLoss) plus
``query_weight * FLOPS(queries) + document_weight * FLOPS(documents)``, each weight warmed up
from 0 (``embedjax.sparse.regulariser_weight``: quadratic over ``warmup`` of the run's steps, as
SPLADE and sentence-transformers' SpladeRegularizerWeightSchedulerCallback do).

With ``splade.inference_free`` the queries are no transformer's: a learned weight per vocabulary id
on the ids each query holds (``static_query_side``; sentence-transformers' Router with a
SparseStaticEmbedding query route), trained with the rest.

The run's ``splade`` section sets the pooling and the regulariser; the ``objective`` section the
base loss (its Matryoshka, layer, GradCache, auxiliary, distillation and guide wrappers are for
dense runs and must stay off).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from embedjax import sparse
from embedjax.data.batch import Batch, Side
from embedjax.losses.splade import splade_loss
from embedjax.train.loss_specs import LOSSES

SPARSE_LOSSES = ("infonce", "margin_mse", "listwise_kl")  # base losses on sparse dot products
SPLADE_KEYS = frozenset({"pooling", "activation", "query_weight", "document_weight", "warmup", "schedule",
                         "query_threshold", "document_threshold", "inference_free", "head_init"})
# Raw dot products: SPLADE's scores are unbounded sums of term products, not cosines. InfoNCE at scale 1
# (SparseMultipleNegativesRankingLoss), MarginMSE (SparseMarginMSELoss), listwise KL at temperature 2 for
# student and teacher (SparseDistillKLDivLoss's default; ours is theirs / 4, see losses.listwise_kl)
_BASE_DEFAULTS = {"infonce": {"similarity": "dot", "scale": 1.0}, "margin_mse": {"similarity": "dot"},
                  "listwise_kl": {"similarity": "dot", "scale": 0.5, "teacher_temperature": 2.0}}


@dataclasses.dataclass(frozen=True)
class SparseObjective:
    """Static description of a SPLADE loss (hashable: a jit static argument)."""

    loss: str = "infonce"               # or "margin_mse" / "listwise_kl" on teacher scores (distillation records)
    loss_kwargs: tuple = ()             # sorted (name, value) items of the base loss
    pooling: str = "max"
    activation: str = "relu"
    query_weight: float | None = 5e-5   # None (config: 0): no query regulariser (an inference-free query side)
    document_weight: float = 3e-5
    warmup: float = 1 / 3               # the fraction of the run's steps the weights warm up over
    warmup_steps: int = 0               # set by the loop from ``warmup`` and the run's length
    schedule: str = "quadratic"
    query_threshold: int | None = None  # FLOPS counts only rows with more active terms (arXiv:2504.14839)
    document_threshold: int | None = None
    inference_free: bool = False        # queries: the static term weights params["query_static"], no transformer
    special_ids: tuple = ()             # ... which never weigh in (a static query side reads no [CLS] / [SEP])
    remat: bool | str = False
    unroll: bool = True
    dropout: bool = True
    # the dense objective's fields the shared data checks and memory messages read: always off here
    gradcache_chunk: int = 0
    aux_losses: tuple = ()
    guide: bool = False
    tri_head: bool = False

    @classmethod
    def from_config(cls, objective: Mapping[str, Any], splade: Mapping[str, Any]) -> SparseObjective:
        """From a config's ``objective`` section (the base loss) and its ``splade`` section."""
        from embedjax.train.objective import Objective, dense_only_options

        fields = Objective.check_section(dict(objective))
        changed = dense_only_options(fields)
        if changed:
            raise ValueError(f"objective {changed} apply to dense runs; a SPLADE run reads objective.{{loss, "
                             "loss_kwargs, remat, unroll, dropout}} and the splade section")
        if objective["loss"] not in SPARSE_LOSSES:
            raise ValueError(f"objective.loss={objective['loss']!r}: a SPLADE run trains with {SPARSE_LOSSES}")
        unknown = sorted(set(splade) - SPLADE_KEYS)
        if unknown:
            raise ValueError(f"unknown splade keys {unknown}; the splade section has {sorted(SPLADE_KEYS)}")
        if splade["pooling"] not in sparse.POOLINGS:
            raise ValueError(f"splade.pooling={splade['pooling']!r}; choose one of {sparse.POOLINGS}")
        if splade["activation"] not in sparse.ACTIVATIONS:
            raise ValueError(f"splade.activation={splade['activation']!r}; choose one of {sparse.ACTIVATIONS}")
        if splade.get("head_init", "identity") not in sparse.HEAD_INITS:
            raise ValueError(f"splade.head_init={splade['head_init']!r}; choose one of {sparse.HEAD_INITS}")
        if splade["schedule"] not in ("quadratic", "linear"):
            raise ValueError(f"splade.schedule={splade['schedule']!r}; choose 'quadratic' or 'linear'")
        for name in ("query_weight", "document_weight"):
            value = splade[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"splade.{name} must be a number >= 0, got {value!r}")
        warmup = splade["warmup"]
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup <= 1:
            raise ValueError(f"splade.warmup is the fraction of the run's steps the weights warm up over, in [0, 1]; "
                             f"got {warmup!r}")
        thresholds = {}
        for name in ("query_threshold", "document_threshold"):
            value = splade[name]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"splade.{name} must be an integer >= 0 or None, got {value!r}")
            thresholds[name] = value
        kwargs = {**_BASE_DEFAULTS[objective["loss"]], **dict(objective["loss_kwargs"] or {})}
        inference_free = splade.get("inference_free", False)
        if not isinstance(inference_free, bool):
            raise ValueError(f"splade.inference_free must be True or False, got {inference_free!r}")
        return cls(loss=objective["loss"], loss_kwargs=tuple(sorted(kwargs.items())), pooling=splade["pooling"],
                   inference_free=inference_free,
                   activation=splade["activation"],
                   query_weight=float(splade["query_weight"]) or None,  # 0: the queries are not regularised
                   document_weight=float(splade["document_weight"]), warmup=float(warmup),
                   schedule=splade["schedule"], remat=fields["remat"], unroll=fields["unroll"],
                   dropout=fields["dropout"], **thresholds)

    def for_run(self, total_steps: int) -> SparseObjective:
        """This objective with its warm-up in steps of a run of ``total_steps``: ``int(warmup * total_steps)``
        (at least 1 when ``warmup`` > 0), as sentence-transformers' SpladeRegularizerWeightSchedulerCallback."""
        steps = int(self.warmup * total_steps)
        return dataclasses.replace(self, warmup_steps=max(steps, 1) if self.warmup > 0 else 0)


def static_query_side(params, objective: SparseObjective, side: Side):
    """An inference-free model's query term weights (B, V): ``params["query_static"]`` on the ids each
    query holds, its special tokens left out (``objective.special_ids``), as sentence-transformers'
    SparseStaticEmbedding reads queries tokenized without them."""
    from embedjax.sparse_model import QUERY_STATIC

    mask = side.mask
    for special in objective.special_ids:
        mask = jnp.where(side.ids == special, 0, mask)
    return sparse.static_query_weights(params[QUERY_STATIC], side.ids, mask)


def splade_side(params, cfg, objective: SparseObjective, side: Side, key):
    """Term weights of one batch side: (B, V), or (B, k, V) for a side of several texts per row."""
    from embedjax.sparse_model import QUERY_STATIC

    lead, length = side.ids.shape[:-1], side.ids.shape[-1]
    flat = lambda x: None if x is None else x.reshape(-1, length)  # noqa: E731
    backbone = {k: v for k, v in params.items() if k not in ("mlm_head", QUERY_STATIC)}
    w = sparse.splade_embed(backbone, cfg, params["mlm_head"], flat(side.ids), flat(side.mask),
                            token_type_ids=flat(side.types), pooling=objective.pooling,
                            activation=objective.activation, dropout_key=key if objective.dropout else None,
                            remat=objective.remat, unroll=objective.unroll)
    return w.reshape(*lead, w.shape[-1])


def sparse_batch_loss(params, cfg, objective: SparseObjective, batch: Batch, key, teacher=None, *, step):
    """``(loss, parts)`` of one batch at ``step`` (the regulariser's warm-up reads it); ``parts``:
    the base loss, both FLOPS terms (unweighted), their weights and the mean active terms of the
    queries and of the positives, for the logs. ``teacher``: unused (the train step's signature)."""
    del teacher
    if batch.packed is not None:
        raise ValueError("a SPLADE run reads padded batches: set data.pack_length=0")
    k_a, k_b, k_n = jax.random.split(key, 3)
    wq = (static_query_side(params, objective, batch.a) if objective.inference_free
          else splade_side(params, cfg, objective, batch.a, k_a))
    wd = splade_side(params, cfg, objective, batch.b, k_b)
    wn = splade_side(params, cfg, objective, batch.n, k_n) if batch.n is not None else None
    base = LOSSES[objective.loss].bind(dict(objective.loss_kwargs))
    hashes = dict(a_hash=batch.a.hashes, b_hash=batch.positive_hashes,
                  n_hash=None if batch.n is None else batch.n.hashes, relevant=batch.relevant,
                  teacher_scores=batch.teacher)
    q_weight = (None if objective.query_weight is None else
                sparse.regulariser_weight(step, objective.query_weight, objective.warmup_steps,
                                          schedule=objective.schedule))
    d_weight = sparse.regulariser_weight(step, objective.document_weight, objective.warmup_steps,
                                         schedule=objective.schedule)
    total, parts = splade_loss(wq, wd, wn, query_weight=q_weight, document_weight=d_weight,
                               base=lambda q, d, n: base(q, d, n, **hashes),
                               query_threshold=objective.query_threshold,
                               document_threshold=objective.document_threshold)
    doc_active = sparse.active_terms(wd).astype(jnp.float32)  # (B,) or (B, m) with empty slots
    real = (batch.positive_hashes != 0) if doc_active.ndim == 2 else jnp.ones_like(doc_active, bool)
    parts = {**parts, "document_weight": d_weight,
             "query_active_terms": jnp.mean(sparse.active_terms(wq).astype(jnp.float32)),
             "document_active_terms": jnp.sum(jnp.where(real, doc_active, 0.0)) / jnp.maximum(jnp.sum(real), 1)}
    if q_weight is not None:
        parts["query_weight"] = q_weight
    return total, parts


__all__ = ["SPARSE_LOSSES", "SPLADE_KEYS", "SparseObjective", "sparse_batch_loss", "splade_side", "static_query_side"]
