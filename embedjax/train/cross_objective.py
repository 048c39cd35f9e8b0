"""The cross-encoder training objective: which rerank loss, on the logits of which candidate groups.

A cross-encoder run (``config.model_kind = "cross_encoder"``) trains on batches of candidate
groups (``embedjax.data.cross_batches``): the backbone reads every (query, candidate) pair of
the batch, the head gives one logit per pair (or ``num_labels``), and the loss compares each
group's logits with its labels or a teacher's scores. Groups are independent, so the loss over
a batch sharded across devices is the same as on one device: nothing is gathered.

``CROSS_LOSSES`` are the losses of ``embedjax.losses.rerank`` (docs/losses.md, section
"Cross-encoder losses (`embedjax.losses.rerank`)") by config name; ``cross_entropy`` trains an n-class head on integer labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from embedjax import cross_encoder as ce
from embedjax.data.batch import Batch
from embedjax.losses import rerank

# name -> (the loss, what it reads: "labels" | "teacher" | "classes")
CROSS_LOSSES = {
    "bce": (rerank.binary_cross_entropy, "labels"),
    "mse": (rerank.score_mse, "labels"),
    "mnrl": (rerank.multiple_negatives_ce, "groups"),
    "listnet": (rerank.listnet, "labels"),
    "lambda": (rerank.lambda_loss, "labels"),
    "margin_mse": (rerank.margin_mse, "teacher"),
    "listwise_kl": (rerank.listwise_kl, "teacher"),
    "cross_entropy": (None, "classes"),
}
# objective keys a cross-encoder run reads; the bi-encoder's wrappers (Matryoshka, layers, GradCache,
# auxiliary losses, distillation, guide) must stay at their defaults
_USED_KEYS = ("loss", "loss_kwargs", "remat", "unroll", "dropout")


@dataclasses.dataclass(frozen=True)
class CrossObjective:
    """Static description of a cross-encoder loss (hashable: a jit static argument)."""

    loss: str
    head: ce.HeadSpec
    loss_kwargs: tuple = ()           # sorted (name, value) items passed to the loss
    label_range: tuple | None = None  # (lo, hi): labels mapped linearly to [0, 1] (e.g. STS-B's 0-5)
    remat: bool | str = False
    unroll: bool = True
    dropout: bool = True
    gradcache_chunk: int = 0          # the bi-encoder's knob, always off here (memory messages read it)

    @property
    def reads(self) -> str:
        return CROSS_LOSSES[self.loss][1]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], head: ce.HeadSpec) -> CrossObjective:
        """From a config's ``objective`` section (``loss`` one of ``CROSS_LOSSES``;
        ``loss_kwargs.label_range`` rescales labels, the rest go to the loss)."""
        from embedjax.train.objective import Objective, dense_only_options

        fields = Objective.check_section({**dict(cfg), "loss": "infonce"})  # the section's own checks
        changed = dense_only_options(fields)
        if changed:
            raise ValueError(f"objective {changed} apply to bi-encoders; a cross-encoder run reads only "
                             f"objective.{{{', '.join(_USED_KEYS)}}}")
        loss = cfg["loss"]
        if loss not in CROSS_LOSSES:
            raise ValueError(f"objective.loss={loss!r} is not a cross-encoder loss; choose one of {tuple(CROSS_LOSSES)}")
        if (loss == "cross_entropy") != (head.num_labels > 1):
            raise ValueError(f"objective.loss={loss!r} with num_labels={head.num_labels}: cross_entropy trains a head of "
                             "n > 1 classes, the other losses a one-logit head")
        kwargs = dict(cfg["loss_kwargs"] or {})
        label_range = kwargs.pop("label_range", None)
        if label_range is not None:
            label_range = tuple(float(v) for v in label_range)
            if len(label_range) != 2 or not label_range[0] < label_range[1]:
                raise ValueError(f"objective.loss_kwargs.label_range must be (lo, hi) with lo < hi, got {label_range}")
        return cls(loss=loss, head=head, loss_kwargs=tuple(sorted(kwargs.items())), label_range=label_range,
                   remat=fields["remat"], unroll=fields["unroll"], dropout=fields["dropout"])


def check_cross_data(objective: CrossObjective, fields: Sequence[str], scores: Sequence[float] | None,
                     in_batch_negatives: int = 0) -> None:
    """Refuses training records the loss would misuse (ValueError naming the fix)."""
    fields, loss = set(fields), objective.loss
    if "text_b" not in fields:
        raise ValueError("a cross-encoder trains on pairs: records need text_b (data.kind pairs, scored, triplets, "
                         "distill, beir, stsb, sick)")
    reads = objective.reads
    if reads == "teacher":
        if "teacher" not in fields:
            raise ValueError(f"objective.loss={loss!r} distils teacher scores: records need them (data.kind='distill', "
                             "e.g. scripts/mine.py --cross_encoder)")
        if in_batch_negatives:
            raise ValueError(f"objective.loss={loss!r}: in-batch negatives have no teacher score; set "
                             "data.in_batch_negatives=0")
    elif "teacher" in fields:
        raise ValueError(f"the records carry teacher scores but objective.loss={loss!r} ignores them; use "
                         "objective.loss='margin_mse' or 'listwise_kl'")
    has_candidates = "text_n" in fields or in_batch_negatives > 0
    if reads == "groups" and not has_candidates:
        raise ValueError(f"objective.loss={loss!r} ranks a positive above negatives: add hard negatives (text_n, "
                         "data.num_negatives) or data.in_batch_negatives")
    if scores is not None:
        if "text_n" in fields or in_batch_negatives:
            raise ValueError("scored pairs are groups of one: set data.in_batch_negatives=0")
        if reads not in ("labels", "classes"):
            raise ValueError(f"objective.loss={loss!r} ignores the records' scores; use 'bce', 'mse' or 'cross_entropy'")
        lo, hi = objective.label_range or (0.0, 1.0)
        if reads == "classes":
            bad = next((s for s in scores if s != int(s) or not 0 <= s < objective.head.num_labels), None)
            if bad is not None:
                raise ValueError(f"cross_entropy needs class labels in 0..{objective.head.num_labels - 1}, found {bad}")
        elif min(scores) < lo or max(scores) > hi:
            raise ValueError(f"scores span [{min(scores)}, {max(scores)}] but objective.loss={loss!r} needs labels in "
                             f"[0, 1]: set objective.loss_kwargs.label_range=(lo, hi) (e.g. (0, 5) for STS-B)")
    elif reads == "classes":
        raise ValueError("cross_entropy needs class labels: records with a score")


def group_logits(params, cfg, objective: CrossObjective, batch: Batch, key):
    """Logits of every pair of the batch: (B, G) for one label, else (B, G, num_labels)."""
    side = batch.a
    dropout_key = key if objective.dropout else None
    options = dict(dropout_key=dropout_key, remat=objective.remat, unroll=objective.unroll)
    if batch.packed is not None:
        rows = batch.packed
        flat = ce.score_packed(params, cfg, objective.head, rows.ids, rows.segments, rows.positions,
                               num_pairs=int(side.text_index.size), token_type_ids=rows.types, **options)
        logits = jnp.take(flat, side.text_index, axis=0)
    else:
        lead, length = side.ids.shape[:-1], side.ids.shape[-1]
        flat = ce.score(params, cfg, objective.head, side.ids.reshape(-1, length), side.mask.reshape(-1, length),
                        token_type_ids=side.types.reshape(-1, length), **options)
        logits = flat.reshape(*lead, flat.shape[-1])
    return logits[..., 0] if objective.head.num_labels == 1 else logits


def cross_batch_loss(params, cfg, objective: CrossObjective, batch: Batch, key, teacher=None):
    """Loss of one batch of candidate groups (``teacher``: unused, the train step's signature)."""
    del teacher
    logits = group_logits(params, cfg, objective, batch, key)
    mask = batch.a.hashes != 0
    fn, reads = CROSS_LOSSES[objective.loss]
    kwargs = dict(objective.loss_kwargs)
    if reads == "classes":
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, G, L)
        classes = batch.labels.astype(jnp.int32)
        nll = -jnp.take_along_axis(log_p, classes[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
    if reads == "teacher":
        k = batch.teacher.shape[-1]
        return fn(logits[:, :k], batch.teacher, mask=mask[:, :k], **kwargs)
    if reads == "groups":  # column 0 against the negatives: a query's other positives are never its negatives
        other_positive = (batch.labels > 0) & (jnp.arange(logits.shape[-1]) > 0)
        return fn(logits, mask=mask & ~other_positive, **kwargs)
    labels = batch.labels
    if objective.label_range is not None:
        lo, hi = objective.label_range
        labels = (labels - lo) / (hi - lo)
    return fn(logits, labels, mask=mask, **kwargs)


__all__ = ["CROSS_LOSSES", "CrossObjective", "check_cross_data", "cross_batch_loss", "group_logits"]
