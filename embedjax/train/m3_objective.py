"""The three-head (BGE-M3) training objective: ``embedjax.losses.m3_loss`` on every side's heads.

A three-head run (``config.model_kind = "m3"``, ``embedjax.m3_model.M3Encoder``) encodes each side
of a batch to its dense, lexical and multi-vector outputs in one forward pass (``embedjax.m3.outputs``),
lays each text out as one row (``m3.rows``) and trains with InfoNCE per head and for their ensemble
plus the ensemble's self-knowledge distillation; the masks (duplicate texts, qrels, empty positive
slots) and the cross-device negatives are InfoNCE's, as for dense runs.

``objective.loss = "m3"``; its ``loss_kwargs``: ``scale`` (50: temperature 0.02), ``ensemble_weights``
((1, 0.3, 1)), ``head_weights`` ((1, 0.1, 1)), ``self_distill`` (True). GradCache
(``objective.gradcache_chunk``) applies; the other wrappers are for single-vector runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping


from embedjax import m3
from embedjax.data.batch import Batch, Side
from embedjax.losses.m3 import m3_loss
from embedjax.train.loss_specs import batch_infonce

M3_LOSS_KEYS = frozenset({"scale", "ensemble_weights", "head_weights", "self_distill"})


@dataclasses.dataclass(frozen=True)
class M3Objective:
    """Static description of a three-head loss (hashable: a jit static argument)."""

    loss_kwargs: tuple = ()     # sorted (name, value) items of m3_loss
    hidden_size: int = 0
    vocab_size: int = 0
    special_ids: tuple = ()     # the ids the lexical head zeroes
    remat: bool | str = False
    unroll: bool = True
    dropout: bool = True
    gradcache_chunk: int = 0
    # the dense objective's fields the shared data checks and memory messages read: always off here
    aux_losses: tuple = ()
    guide: bool = False
    tri_head: bool = False

    @property
    def loss(self) -> str:
        """The records it reads are InfoNCE's (pairs, triplets, BEIR queries with their qrels)."""
        return "infonce"

    @staticmethod
    def check_section(objective: Mapping[str, Any]) -> dict[str, Any]:
        """The objective section's checks for a three-head run; returns the checked fields."""
        from embedjax.train.objective import Objective, dense_only_options

        if objective["loss"] != "m3":
            raise ValueError(f"objective.loss={objective['loss']!r}: a three-head (m3) run trains with 'm3'")
        kwargs = dict(objective["loss_kwargs"] or {})
        unknown = sorted(set(kwargs) - M3_LOSS_KEYS)
        if unknown:
            raise ValueError(f"objective.loss_kwargs {unknown}: m3 takes {sorted(M3_LOSS_KEYS)}")
        fields = Objective.check_section({**dict(objective), "loss": "infonce", "loss_kwargs": {}})
        changed = [k for k in dense_only_options(fields) if k != "gradcache_chunk"]
        if changed:
            raise ValueError(f"objective {changed} apply to single-vector runs; a three-head run reads objective."
                             "{loss, loss_kwargs, gradcache_chunk, remat, unroll, dropout}")
        return {**fields, "loss_kwargs": tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                      for k, v in kwargs.items()))}

    @classmethod
    def from_config(cls, objective: Mapping[str, Any], model) -> M3Objective:
        """From a config's ``objective`` section and the ``M3Encoder`` it trains."""
        fields = cls.check_section(objective)
        return cls(loss_kwargs=fields["loss_kwargs"], hidden_size=int(model.cfg.hidden_size),
                   vocab_size=int(model.vocab_size), special_ids=tuple(model.special_ids), remat=fields["remat"],
                   unroll=fields["unroll"], dropout=fields["dropout"], gradcache_chunk=fields["gradcache_chunk"])


def side_rows(params, cfg, objective: M3Objective, side: Side, key):
    """One side's ``m3.rows``: ``lead + (H + V + (T - 1) * H,)``."""
    from embedjax.m3_model import HEADS_KEY

    lead, length = side.ids.shape[:-1], side.ids.shape[-1]
    flat = lambda x: x.reshape(-1, length)  # noqa: E731
    backbone = {k: v for k, v in params.items() if k != HEADS_KEY}
    out = m3.outputs(backbone, cfg, params[HEADS_KEY], flat(side.ids), flat(side.mask),
                     special_ids=objective.special_ids, token_type_ids=flat(side.types),
                     dropout_key=key if objective.dropout else None, remat=objective.remat, unroll=objective.unroll)
    rows = m3.rows(*out)
    return rows.reshape(*lead, rows.shape[-1])


def m3_batch_loss(params, cfg, objective: M3Objective, batch: Batch, key, teacher=None):
    """``(loss, parts)`` of one batch: ``m3_loss`` with the batch's InfoNCE masks; ``parts`` every
    head's InfoNCE and distillation term. ``teacher``: unused (the train step's signature)."""
    del teacher
    from embedjax.train.objective import embed_padded_sides

    za, zb, zn = embed_padded_sides(lambda p, side, k: side_rows(p, cfg, objective, side, k), params, batch, key,
                                    gradcache_chunk=objective.gradcache_chunk, run="a three-head (m3) run")
    masked = functools.partial(batch_infonce, anchor_ids=batch.a.hashes, positive_ids=batch.positive_hashes,
                               negative_ids=None if batch.n is None else batch.n.hashes, relevant=batch.relevant)
    return m3_loss(za, zb, zn, hidden_size=objective.hidden_size, vocab_size=objective.vocab_size,
                   infonce_fn=masked, **dict(objective.loss_kwargs))


__all__ = ["M3Objective", "M3_LOSS_KEYS", "m3_batch_loss", "side_rows"]
