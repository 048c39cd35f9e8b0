"""The training losses as one table: each config name, its function, and what it reads.

As sentence-transformers documents an "Inputs" table per loss, every ``LossSpec`` says which
embeddings and batch fields its function takes. Dispatch (``LossSpec.bind``), the data check
(``check_objective_data``: records a loss would silently misuse are refused, naming the fix)
and the lists the docs and configs refer to (``AUX_LOSSES``) all follow from the table:

| ``objective.loss`` | function | records it trains on | reads |
|---|---|---|---|
| ``cosent`` | ``losses.cosent`` | scored pairs | a, b, gold scores |
| ``angle`` | ``losses.angle_loss`` | scored pairs | a, b, gold scores, text hashes |
| ``cosine_mse`` | ``losses.cosine_mse`` | scored pairs | a, b, gold scores |
| ``pearson`` | ``losses.pearson_loss`` | scored pairs | a, b, gold scores |
| ``rank_consistency`` | ``losses.rank_consistency_loss`` | scored pairs | a, b, gold scores |
| ``infonce`` | ``losses.infonce`` (``losses.ring.ring_infonce`` with ``objective.negatives_exchange="ring"``) | pairs / triplets / BEIR queries | a, b (or m positive slots), [hard negatives], text hashes, [relevant sets, guide] |
| ``simcse_unsup`` | ``losses.infonce`` on two dropout views | sentences | a twice, text hashes |
| ``quadruplet`` | ``losses.quadruplet`` | C-STS condition pairs | a, b, the same pair under the lower-scored condition |
| ``margin_mse`` | ``losses.margin_mse`` | distillation records | a, b, negatives, teacher scores |
| ``listwise_kl`` | ``losses.listwise_kl`` | distillation records | a, b, negatives, teacher scores |
| ``tsdae`` | ``embedjax.tsdae.reconstruction_loss`` | (damaged, original) texts (``data.noise``) | a's embedding, b's token ids |
| ``mntp`` | ``embedjax.mntp.mntp_loss`` | single texts | a's token ids, masked on device (a decoder's LM head) |

Embedding distillation from a teacher encoder (``objective.distill.loss``) and the layer
wrappers (``objective.layers``) are the two smaller tables ``DISTILL_LOSSES`` and ``LAYER_MODES``.
Formulas and references: docs/losses.md.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp

from embedjax import losses
from embedjax import similarity as sim
from embedjax.losses.ring import ring_infonce

# What a loss function can be given: the three sides' embeddings, gold scores, teacher scores, the
# text hashes of each side (equal texts are not each other's negatives), the hashes of each query's
# relevant documents (never its negatives) and a frozen guide model's embeddings of the three sides.
INPUTS = ("za", "zb", "zn", "labels", "teacher_scores", "a_hash", "b_hash", "n_hash", "relevant", "guide")


def _default_label_range(fn) -> Callable[[Mapping[str, Any]], tuple[float, float]]:
    default = inspect.signature(fn).parameters["label_range"].default
    return lambda kw: tuple(kw.get("label_range", default))


def _angle_label_range(kw: Mapping[str, Any]) -> tuple[float, float] | None:
    """AnglE scales scores only in its in-batch term's positive rule: not at all with ``ibn_w=0``
    or ``ibn_rule='angle_emb'`` (only the order of the scores matters then)."""
    defaults = {k: p.default for k, p in inspect.signature(losses.angle_loss).parameters.items()
                if p.default is not inspect.Parameter.empty}
    if not kw.get("ibn_w", defaults["ibn_w"]) or kw.get("ibn_rule", defaults["ibn_rule"]) == "angle_emb":
        return None
    return tuple(kw.get("label_range", defaults["label_range"]))


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One training loss: its config name, its function and what the function takes.

    ``args``: the function's positional inputs, in order, named as in ``INPUTS``;
    ``keywords``: ``(function keyword, input)`` pairs, e.g. ``("anchor_ids", "a_hash")``.
    ``single_texts``: it trains on one text per record (the positive is a second dropout view).
    ``label_range``: ``fn(loss_kwargs) -> (lo, hi)`` the scores are scaled by (None: order only).
    ``trains_on``: the records it is meant for, as the data check words its advice.
    ``suggested``: named as a fix when data does not suit another loss.
    """

    name: str
    fn: Callable
    args: tuple[str, ...]
    trains_on: str
    keywords: tuple[tuple[str, str], ...] = ()
    single_texts: bool = False
    label_range: Callable[[Mapping[str, Any]], tuple[float, float] | None] | None = None
    suggested: bool = True

    @property
    def reads_scores(self) -> bool:
        """Reads gold scores (the records' ``score``)."""
        return "labels" in self.args

    @property
    def takes_negatives(self) -> bool:
        """Takes hard negatives (the records' ``text_n``) when there are any."""
        return "zn" in self.args

    @property
    def reads_teacher(self) -> bool:
        """Reads teacher scores stored with the records (``teacher``)."""
        return "teacher_scores" in self.args

    @property
    def reads_relevant(self) -> bool:
        """Masks each query's relevant documents (retrieval records: several positives per query)."""
        return any(source == "relevant" for _, source in self.keywords)

    def bind(self, loss_kwargs: Mapping[str, Any]):
        """``fn(za, zb, zn=None, labels=None, *, a_hash, b_hash, n_hash, teacher_scores, relevant, guide)``:
        the loss with its keyword arguments, in the one signature the Matryoshka and layer wrappers wrap."""
        def fn(za, zb, zn=None, labels=None, *, a_hash=None, b_hash=None, n_hash=None, teacher_scores=None,
               relevant=None, guide=None):
            given = dict(za=za, zb=zb, zn=zn, labels=labels, teacher_scores=teacher_scores, a_hash=a_hash,
                         b_hash=b_hash, n_hash=n_hash, relevant=relevant, guide=guide)
            return self.fn(*(given[a] for a in self.args), **{k: given[v] for k, v in self.keywords}, **loss_kwargs)

        return fn


_SCORED = ("za", "zb", "labels")
_TEACHER = ("za", "zb", "zn", "teacher_scores")
_CONTRASTIVE_HASHES = (("anchor_ids", "a_hash"), ("positive_ids", "b_hash"), ("negative_ids", "n_hash"))


def batch_infonce(za, zb, zn=None, *, anchor_ids=None, positive_ids=None, negative_ids=None, relevant=None,
                   guide=None, ring_mesh=None, **kwargs):
    """``losses.infonce`` with the masks a batch's hashes imply (0 = no text): the empty slots of a
    ``(B, m)`` positive side, and each query's relevant documents; ``guide``: the frozen guide
    model's ``(za, zb, zn)`` for the false-negative rule (GISTEmbed). ``ring_mesh``: the same loss
    computed around the batch axes of that mesh (``losses.ring.ring_infonce``) instead of on
    gathered candidates (``objective.negatives_exchange="ring"``)."""
    if zb.ndim == za.ndim + 1 and positive_ids is not None:
        kwargs["positive_mask"] = positive_ids != 0
    if relevant is not None:
        kwargs.update(relevant_ids=relevant, relevant_mask=relevant != 0)
    if guide is not None:
        kwargs["guide"] = guide
    loss = losses.infonce if ring_mesh is None else functools.partial(ring_infonce, mesh=ring_mesh)
    return loss(za, zb, zn, anchor_ids=anchor_ids, positive_ids=positive_ids, negative_ids=negative_ids, **kwargs)


def _token_level(*args, **kwargs):
    raise ValueError("objective.loss='tsdae' reconstructs token ids from the embedding, not a loss of embeddings: "
                     "embedjax.train.objective.batch_loss runs it (embedjax.train.tsdae_objective)")


def _masked_tokens(*args, **kwargs):
    raise ValueError("objective.loss='mntp' predicts masked tokens through the decoder's LM head, not a loss of "
                     "embeddings: embedjax.train.objective.batch_loss runs it (embedjax.train.mntp_objective)")


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("cosent", losses.cosent, _SCORED, "scored pairs"),
    LossSpec("angle", losses.angle_loss, _SCORED, "scored pairs", keywords=(("a_ids", "a_hash"), ("b_ids", "b_hash")),
             label_range=_angle_label_range),
    # no in-batch interaction: gradient accumulation is exactly the large batch
    LossSpec("cosine_mse", losses.cosine_mse, _SCORED, "scored pairs",
             label_range=_default_label_range(losses.cosine_mse)),
    LossSpec("pearson", losses.pearson_loss, _SCORED, "scored pairs", suggested=False),
    LossSpec("rank_consistency", losses.rank_consistency_loss, _SCORED, "scored pairs", suggested=False),
    LossSpec("infonce", batch_infonce, ("za", "zb", "zn"), "pairs/triplets/BEIR queries",
             keywords=(*_CONTRASTIVE_HASHES, ("relevant", "relevant"), ("guide", "guide"))),
    # unsupervised SimCSE: InfoNCE between two dropout views of the same texts (zb is side a again)
    LossSpec("simcse_unsup", batch_infonce, ("za", "zb"), "sentences", keywords=_CONTRASTIVE_HASHES[:2],
             single_texts=True),
    # C-STS: (a, b) under the higher-scored condition, n = (a, b) under the lower (data.csts_records)
    LossSpec("quadruplet", losses.quadruplet, ("za", "zb", "zn"), "C-STS condition pairs", suggested=False),
    LossSpec("margin_mse", losses.margin_mse, _TEACHER, "distillation records"),
    LossSpec("listwise_kl", losses.listwise_kl, _TEACHER, "distillation records"),
    # TSDAE (arXiv:2104.06979): a decoder reconstructs b's tokens from a's embedding (embedjax.train.tsdae_objective)
    LossSpec("tsdae", _token_level, ("za", "zb"), "single texts damaged by data.noise='delete'", suggested=False),
    # LLM2Vec's MNTP (arXiv:2404.05961): masked tokens of a's ids predicted by a bidirectional decoder's LM head
    # (embedjax.train.mntp_objective)
    LossSpec("mntp", _masked_tokens, ("za",), "single texts", single_texts=True, suggested=False),
)}

# Scored-pair losses that may be added to the main one on the same embeddings (objective.aux_losses).
AUX_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.reads_scores)


def _unit(x):
    x = sim.as_float32(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# Embedding distillation from a teacher encoder (objective.distill.loss): fn(student, teacher) -> scalar.
# ``mse`` compares L2-normalised embeddings (what the exported, normalising model outputs).
DISTILL_LOSSES: dict[str, Callable] = {
    "mse": lambda s, t: losses.embedding_mse(_unit(s), _unit(t)),
    "cosine": losses.embedding_cosine,
    "similarity_mse": losses.similarity_mse,
}

# Layer wrappers (objective.layers): wrapper(loss_fn, **objective.layer_kwargs) over per-layer stacks.
LAYER_MODES: dict[str, Callable] = {
    "2dmse": losses.matryoshka_2d,
    "adaptive": losses.adaptive_layer,
    "espresso": losses.espresso,
}


def _names(specs: Sequence[LossSpec]) -> str:
    names = [s.name for s in specs]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _suggest(predicate) -> list[LossSpec]:
    return [s for s in LOSSES.values() if s.suggested and predicate(s)]


def check_objective_data(objective, fields: Sequence[str], scores: Sequence[float] | None = None) -> None:
    """Refuses training data the objective would silently misuse (ValueError naming the fix).

    ``objective``: an ``embedjax.train.objective.Objective``; ``fields``: the training records'
    fields (``embedjax.data.pipeline.fields_of(source)``, some of text_a, text_b, text_n, score,
    teacher); ``scores``: every record's score (``embedjax.train.sources.scores_of(source)``), or
    None when the records have none. What each loss reads is its ``LossSpec``:

    * a loss that reads teacher scores on records without them (and hard negatives), or
      teacher scores with a loss that ignores them;
    * auxiliary (scored) losses on unscored records;
    * scores with a loss that ignores them (every pair would count as a positive), or a loss
      that reads scores on unscored records;
    * hard negatives (text_n) with a loss that ignores them;
    * a pair loss on single texts, a single-text loss on pairs;
    * a ``label_range`` that does not cover the observed scores (they would be mis-scaled).
    """
    fields = tuple(fields)
    spec = LOSSES[objective.loss]
    if getattr(objective, "tri_head", False):  # text_n is the condition (or the pair's two), not a negative
        if "text_n" not in fields:
            raise ValueError(f"a tri-encoder reads each record's condition from text_n, but the records have only "
                             f"{fields}: use data.kind=csts with data.csts_records=tri (or tri_quadruplets)")
        if spec.name != "quadruplet":
            fields = tuple(f for f in fields if f != "text_n")
    loss, has_score = spec.name, "score" in fields
    if loss == "tsdae" and fields != ("text_a", "text_b"):
        raise ValueError(f"objective.loss='tsdae' reconstructs each text from the embedding of a damaged copy, but the "
                         f"records have {fields}: train on single texts (data.kind sentences, stsb_sentences or "
                         "beir_corpus) with data.noise='delete' (each text -> (damaged copy, text), as "
                         "sentence-transformers' DenoisingAutoEncoderDataset), or on (input, target) pairs")
    if loss == "mntp" and fields != ("text_a",):
        raise ValueError(f"objective.loss='mntp' masks tokens of single texts and predicts them, but the records "
                         f"have {fields}: train on data.kind sentences, stsb_sentences or beir_corpus (without "
                         "data.noise)")
    if "relevant" in fields and not spec.reads_relevant:
        raise ValueError(
            f"objective.loss={loss!r} cannot train on retrieval records (data.kind=beir: a query, its positives and "
            f"the documents it must never be pushed away from). Use objective.loss="
            f"{_names(_suggest(lambda s: s.reads_relevant))}.")
    if getattr(objective, "guide", False) and not spec.reads_relevant:
        raise ValueError(f"objective.guide is set but objective.loss={loss!r} has no in-batch negatives to guide; "
                         f"use objective.loss={_names(_suggest(lambda s: s.reads_relevant))}")
    if spec.reads_teacher and not {"text_b", "text_n", "teacher"} <= set(fields):
        raise ValueError(
            f"objective.loss={loss!r} distils teacher scores of (query, positive, negatives), but the training "
            f"records have only {fields}. Use data.kind=distill (jsonl with text_a, text_b, text_n and teacher "
            "scores, e.g. written by scripts/mine.py).")
    if "teacher" in fields and not spec.reads_teacher:
        raise ValueError(
            f"the training records carry teacher scores but objective.loss={loss!r} ignores them. Use "
            f"objective.loss={_names(_suggest(lambda s: s.reads_teacher))}, or data.kind=triplets to train on the "
            "texts alone.")
    if objective.aux_losses and not has_score:
        names = [name for name, _, _ in objective.aux_losses]
        raise ValueError(f"objective.aux_losses {names} rank or regress gold scores, but the training records "
                         f"have none {fields}")
    contrastive = ", ".join(f"{s.name} for {s.trains_on}"
                            for s in _suggest(lambda s: not s.reads_scores and not s.reads_teacher))
    if has_score and not spec.reads_scores:
        raise ValueError(
            f"objective.loss={loss!r} ignores scores, but the training records are scored pairs {fields}: every "
            f"pair would count as a positive whatever its score. Use a loss that reads scores "
            f"(objective.loss={_names(_suggest(lambda s: s.reads_scores))}), or unscored data "
            "(data.kind=pairs / triplets).")
    if spec.reads_scores and not has_score:
        raise ValueError(
            f"objective.loss={loss!r} needs a gold score per pair, but the training records have only {fields}. "
            f"Use scored data (data.kind=stsb, sick or scored), or a contrastive loss (objective.loss={contrastive}).")
    if "text_n" in fields and not spec.takes_negatives:
        raise ValueError(
            f"the training records have hard negatives (text_n) but objective.loss={loss!r} ignores them. "
            f"Use objective.loss={_names(_suggest(lambda s: s.takes_negatives and not s.reads_teacher and not s.single_texts))} "
            "(hard negatives as extra candidates), or pairs without negatives.")
    if not spec.single_texts and "text_b" not in fields:
        raise ValueError(
            f"objective.loss={loss!r} needs a positive (text_b) per record, but the records are single texts "
            f"{fields}. For single texts use objective.loss={_names(_suggest(lambda s: s.single_texts))} "
            "(unsupervised SimCSE: each text its own positive under dropout).")
    if spec.single_texts and "text_b" in fields:
        pair_losses = _suggest(lambda s: not s.single_texts and not s.reads_scores and not s.reads_teacher)
        raise ValueError(
            f"objective.loss={loss!r} trains on single sentences, but the records are pairs {fields}. "
            f"Use objective.loss={_names(pair_losses)} for (anchor, positive) pairs, or data.kind=sentences.")
    label_range = None if spec.label_range is None else spec.label_range(dict(objective.loss_kwargs))
    if label_range is not None and has_score:
        try:
            lo, hi = losses.angle.check_label_range(label_range)
        except ValueError as err:
            raise ValueError(f"objective.loss_kwargs.{err}") from None
        if scores is None or len(scores) == 0:
            raise ValueError("check_objective_data needs the records' scores to check the label_range")
        s_min, s_max = float(min(scores)), float(max(scores))
        if s_min < lo or s_max > hi:
            raise ValueError(
                f"objective.loss={loss!r} scales scores to [0, 1] by label_range=({lo:g}, {hi:g}), but the training "
                f"scores lie in [{s_min:g}, {s_max:g}]: they would be mis-scaled. Set "
                f"objective.loss_kwargs.label_range=(lo, hi) to the data's scale, e.g. "
                f"--config.objective.loss_kwargs.label_range=\"({min(lo, s_min):g}, {max(hi, s_max):g})\" "
                "(the dataset's documented range, not just the observed one).")


__all__ = ["AUX_LOSSES", "DISTILL_LOSSES", "INPUTS", "LAYER_MODES", "LOSSES", "LossSpec", "check_objective_data"]
