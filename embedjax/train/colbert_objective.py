"""The ColBERT training objective: the dense losses on MaxSim scores of token vectors.

A ColBERT run (``config.model_kind = "colbert"``) encodes each side of a batch to its token
vectors (``embedjax.colbert.token_vectors``: the backbone, the projection, L2 normalisation), laid
out on the host as PyLate lays them (``colbert.ColbertFormat``: markers, query expansion, the
skiplist; each side's ``pool`` is its score mask). The tokens that do not score are zeroed and each
text's tokens flattened to one row, so ``similarity.TokenMaxSim`` is just another metric of the
dense losses:

* ``infonce`` (default; scale 1, PyLate's ``Contrastive`` at temperature 1): in-batch and
  cross-device negatives, hard negatives, multiple positives, qrels masks, false-negative margins;
* ``listwise_kl`` (default ``scale=1``, ``normalize_scores=True``: PyLate's ``Distillation``) and
  ``margin_mse`` on teacher scores stored with the records (``data.kind="distill"`` / mined records).

GradCache (``objective.gradcache_chunk``) embeds the batch chunk by chunk as for dense runs. The
objective section's other wrappers (Matryoshka, layers, auxiliary losses, distillation from a
teacher model, guide) are for single-vector runs and must stay off.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


from embedjax import colbert
from embedjax import similarity as sim
from embedjax.data.batch import Batch, Side
from embedjax.train.loss_specs import LOSSES

COLBERT_LOSSES = ("infonce", "listwise_kl", "margin_mse")
_DEFAULTS = {"infonce": {"scale": 1.0}, "listwise_kl": {"scale": 1.0, "normalize_scores": True},
             "margin_mse": {}}


@dataclasses.dataclass(frozen=True)
class ColbertObjective:
    """Static description of a ColBERT loss (hashable: a jit static argument)."""

    loss: str = "infonce"
    loss_kwargs: tuple = ()  # sorted (name, value) items, the loss's defaults included
    dim: int = colbert.DEFAULT_DIM
    remat: bool | str = False
    unroll: bool = True
    dropout: bool = True
    gradcache_chunk: int = 0
    # the dense objective's fields the shared data checks and memory messages read: always off here
    aux_losses: tuple = ()
    guide: bool = False
    tri_head: bool = False

    @staticmethod
    def check_section(objective: Mapping[str, Any]) -> dict[str, Any]:
        """The objective section's checks for a ColBERT run (before any model is loaded); returns
        the dense objective's checked fields."""
        from embedjax.train.objective import Objective, dense_only_options

        fields = Objective.check_section(objective)
        changed = [k for k in dense_only_options(fields) if k != "gradcache_chunk"]
        if changed:
            raise ValueError(f"objective {changed} apply to single-vector runs; a ColBERT run reads objective.{{loss, "
                             "loss_kwargs, gradcache_chunk, remat, unroll, dropout}}")
        if fields["loss"] not in COLBERT_LOSSES:
            raise ValueError(f"objective.loss={fields['loss']!r}: a ColBERT run trains with {COLBERT_LOSSES}")
        if "similarity" in dict(objective["loss_kwargs"] or {}):
            raise ValueError("objective.loss_kwargs.similarity: a ColBERT run scores by MaxSim; leave it unset")
        return fields

    @classmethod
    def from_config(cls, objective: Mapping[str, Any], *, dim: int) -> ColbertObjective:
        """From a config's ``objective`` section and the model's token width ``dim``."""
        fields = cls.check_section(objective)
        kwargs = {**_DEFAULTS[fields["loss"]], **dict(fields["loss_kwargs"])}
        return cls(loss=fields["loss"], loss_kwargs=tuple(sorted(kwargs.items())), dim=int(dim), remat=fields["remat"],
                   unroll=fields["unroll"], dropout=fields["dropout"], gradcache_chunk=fields["gradcache_chunk"])

    @property
    def metric(self) -> sim.TokenMaxSim:
        return sim.TokenMaxSim(self.dim)


def side_tokens(params, cfg, objective: ColbertObjective, side: Side, key):
    """One side's flattened scoring token vectors: ``lead + (T * dim,)``, the tokens outside the
    side's score mask (``pool``) zeroed."""
    lead, length = side.ids.shape[:-1], side.ids.shape[-1]
    flat = lambda x: x.reshape(-1, length)  # noqa: E731
    backbone = {k: v for k, v in params.items() if k != "projection"}
    tokens = colbert.token_vectors(backbone, cfg, params["projection"], flat(side.ids), flat(side.mask),
                                   token_type_ids=flat(side.types), dropout_key=key if objective.dropout else None,
                                   remat=objective.remat, unroll=objective.unroll)
    rows = objective.metric.flatten(tokens, flat(side.pool))
    return rows.reshape(*lead, rows.shape[-1])


def colbert_batch_loss(params, cfg, objective: ColbertObjective, batch: Batch, key, teacher=None):
    """Loss of one ColBERT batch (``ColbertFormat``'s layout); ``teacher``: unused (the train step's
    signature; teacher scores come with the batch)."""
    del teacher
    from embedjax.train.objective import embed_padded_sides

    za, zb, zn = embed_padded_sides(lambda p, side, k: side_tokens(p, cfg, objective, side, k), params, batch, key,
                                    gradcache_chunk=objective.gradcache_chunk, run="a ColBERT run")
    loss = LOSSES[objective.loss].bind({**dict(objective.loss_kwargs), "similarity": objective.metric})
    return loss(za, zb, zn, batch.labels, a_hash=batch.a.hashes, b_hash=batch.positive_hashes,
                n_hash=None if batch.n is None else batch.n.hashes, teacher_scores=batch.teacher,
                relevant=batch.relevant)


__all__ = ["COLBERT_LOSSES", "ColbertObjective", "colbert_batch_loss", "side_tokens"]
