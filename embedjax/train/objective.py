"""The training objective: which loss, wrapped how, applied to which batch fields.

An ``Objective`` is a frozen (hashable) description built from a config; the pure
``batch_loss(params, enc_cfg, objective, batch, key)`` embeds the batch with the
shared ``embed`` and applies the loss. Batches are dicts of arrays:

    a_ids, a_mask, a_types      first texts        (B, T)
    b_ids, b_mask, b_types      second texts       (B, T)   (absent: unsupervised SimCSE)
    n_ids, n_mask, n_types      hard negatives     (B, T) or (B, k, T)   (optional)
    a_pool, b_pool, n_pool      pooling masks      like the side's mask   (optional: 0 on an instruction
                                                   prefix that pooling skips, include_prompt=False)
    labels                      gold scores        (B,)     (scored pairs)
    teacher                     teacher scores     (B, 1 + k)  [s(a, b), s(a, n_1), ...] (distillation data)
    a_hash, b_hash, n_hash      int32 text hashes: equal texts are not each other's negatives

or, packed (``embedjax.data.Packing``: every text of the batch in shared rows, much less
padding), instead of the ``*_ids / *_mask / *_types``:

    p_ids, p_types, p_segments, p_positions     (R, L)
    p_pool                      (R, L) optional: 1 on the tokens pooling reads (prompts skipped)
    a_text, b_text, n_text      index of each example's text among the packed ones (B,) / (B, k)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from embedjax import gradcache, losses
from embedjax.embed import embed, embed_packed

LOSSES = ("angle", "cosent", "cosine_mse", "pearson", "rank_consistency", "infonce", "simcse_unsup",
          "margin_mse", "listwise_kl")
LAYER_MODES = ("", "2dmse", "adaptive", "espresso")
# What each loss reads from the data (check_objective_data):
SCORED_LOSSES = ("angle", "cosent", "cosine_mse", "pearson", "rank_consistency")  # regress / rank gold scores
CONTRASTIVE_LOSSES = ("infonce", "simcse_unsup")         # positives + in-batch negatives: no scores
TEACHER_LOSSES = ("margin_mse", "listwise_kl")           # teacher scores of (a, b) and (a, n_j) stored with the data
NEGATIVE_LOSSES = ("infonce", *TEACHER_LOSSES)           # the ones that use hard negatives (text_n)
# Scored-pair losses that may be added to the main one (objective.aux_losses), on the same embeddings.
AUX_LOSSES = SCORED_LOSSES
# Embedding distillation from a teacher encoder (objective.distill.loss).
DISTILL_LOSSES = ("mse", "cosine", "similarity_mse")


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static description of the loss (hashable: a jit static argument)."""

    loss: str = "angle"
    loss_kwargs: tuple = ()          # sorted (name, value) items passed to the loss
    pooling: str = "mean"            # the run's pooling (config.pooling, resolved against the checkpoint)
    matryoshka_dims: tuple = ()      # () = off
    matryoshka_weights: tuple = ()
    matryoshka_n_per_step: int = 0   # 0 = every dim every step
    layers: str = ""                 # '' = last layer only; else one of LAYER_MODES
    layer_kwargs: tuple = ()
    remat: bool | str = False        # True, or a jax.checkpoint_policies name (decoder backbones)
    unroll: bool = True              # unroll the layer scan (False: one compiled layer; deep LLMs compile fast)
    dropout: bool = True             # the encoder's dropout during training (SimCSE needs it)
    gradcache_chunk: int = 0         # > 0: GradCache, embedding this many rows at a time
    aux_losses: tuple = ()           # ((name, weight, kwargs items), ...) added to the main loss
    distill_loss: str = ""           # '' = no teacher; else one of DISTILL_LOSSES
    distill_weight: float = 1.0
    teacher_cfg: Any = None          # the teacher encoder's (static) config, with distill_loss
    teacher_pooling: str = ""

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss reads a teacher encoder's embeddings (``batch_loss(..., teacher=)``)."""
        return bool(self.distill_loss)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], pooling: str, teacher=None) -> "Objective":
        """From the ``objective`` section of a config (configs/base.py declares every key; a
        missing key raises KeyError, an unknown one ValueError).

        ``pooling`` is the run's resolved pooling mode (the encoder's, after ``config.pooling``
        overrode the checkpoint's): a run has one pooling setting, used by training,
        evaluation and export alike. ``teacher``: the ``Encoder`` named by ``distill.teacher``
        (loaded by the caller), when ``distill.weight`` > 0.
        """
        unknown = sorted(set(cfg) - OBJECTIVE_KEYS)
        if unknown:
            raise ValueError(f"unknown objective keys {unknown}; the objective section has {sorted(OBJECTIVE_KEYS)}")
        if not pooling:
            raise ValueError("Objective.from_config needs the resolved pooling mode (the encoder's), got ''")
        loss = cfg["loss"]
        if loss not in LOSSES:
            raise ValueError(f"unknown objective.loss {loss!r}; choose one of {LOSSES}")
        layers = cfg["layers"] or ""
        if layers not in LAYER_MODES:
            raise ValueError(f"unknown objective.layers {layers!r}; choose one of {LAYER_MODES}")
        if layers in ("2dmse", "espresso") and cfg["matryoshka_dims"]:
            raise ValueError(f"objective.layers={layers!r} truncates dims itself; matryoshka_dims combine with "
                             "layers='' or 'adaptive' (sentence-transformers' Matryoshka2dLoss)")
        if layers and cfg["matryoshka_n_per_step"]:
            raise ValueError("matryoshka_n_per_step cannot be combined with objective.layers (the layer "
                             "wrappers own the step's key); use every dim inside 2D losses")
        items = lambda d: tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(d or {}).items()))
        distill = cfg["distill"]
        distill_on = bool(distill["teacher"]) and float(distill["weight"]) > 0
        if distill_on and distill["loss"] not in DISTILL_LOSSES:
            raise ValueError(f"unknown objective.distill.loss {distill['loss']!r}; choose one of {DISTILL_LOSSES}")
        if distill_on and teacher is None:
            raise ValueError(f"objective.distill.teacher={distill['teacher']!r}: pass the loaded teacher encoder")
        return cls(
            loss=loss,
            loss_kwargs=items(cfg["loss_kwargs"]),
            pooling=pooling,
            matryoshka_dims=tuple(cfg["matryoshka_dims"] or ()),
            matryoshka_weights=tuple(cfg["matryoshka_weights"] or ()),
            matryoshka_n_per_step=int(cfg["matryoshka_n_per_step"] or 0),
            layers=layers,
            layer_kwargs=items(cfg["layer_kwargs"]),
            remat=cfg["remat"] if isinstance(cfg["remat"], str) else bool(cfg["remat"]),
            unroll=bool(cfg["unroll"]),
            dropout=bool(cfg["dropout"]),
            gradcache_chunk=int(cfg["gradcache_chunk"] or 0),
            aux_losses=aux_losses_from_config(cfg["aux_losses"]),
            distill_loss=distill["loss"] if distill_on else "",
            distill_weight=float(distill["weight"]) if distill_on else 1.0,
            teacher_cfg=teacher.cfg if distill_on else None,
            teacher_pooling=teacher.pooling if distill_on else "",
        )


# The keys of a config's ``objective`` section (configs/base.py).
OBJECTIVE_KEYS = frozenset({"loss", "loss_kwargs", "matryoshka_dims", "matryoshka_weights", "matryoshka_n_per_step",
                            "layers", "layer_kwargs", "remat", "unroll", "dropout", "gradcache_chunk", "aux_losses",
                            "distill"})


def aux_losses_from_config(aux: Mapping[str, Any] | None) -> tuple:
    """``objective.aux_losses`` -> ``((name, weight, kwargs items), ...)`` sorted by name.

    Each entry is ``name: weight`` or ``name: {"weight": w, **the loss's keyword arguments}``,
    e.g. ``{"pearson": 1.0}`` or ``{"rank_consistency": {"weight": 0.5, "scale": 20.0}}``.
    """
    out = []
    for name, value in sorted(dict(aux or {}).items()):
        if name not in AUX_LOSSES:
            raise ValueError(f"unknown objective.aux_losses entry {name!r}; choose among {AUX_LOSSES}")
        kwargs = dict(value) if isinstance(value, Mapping) else {"weight": value}
        try:
            weight = float(kwargs.pop("weight"))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"objective.aux_losses.{name} must be a weight or a dict with a 'weight', got {value!r}") from None
        if weight:
            out.append((name, weight, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))))
    return tuple(out)


def _label_range(objective: Objective) -> tuple[float, float] | None:
    """The (lo, hi) the loss scales scores by, or None when it does not read it (e.g. AnglE with
    ibn_w=0 or ibn_rule='angle_emb': only the order of the scores matters then)."""
    kw = dict(objective.loss_kwargs)
    if objective.loss == "angle":
        defaults = {k: p.default for k, p in inspect.signature(losses.angle_loss).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        if not kw.get("ibn_w", defaults["ibn_w"]) or kw.get("ibn_rule", defaults["ibn_rule"]) == "angle_emb":
            return None
        return tuple(kw.get("label_range", defaults["label_range"]))
    if objective.loss == "cosine_mse":
        default = inspect.signature(losses.cosine_mse).parameters["label_range"].default
        return tuple(kw.get("label_range", default))
    return None


def check_objective_data(objective: Objective, fields: Sequence[str], scores: Sequence[float] | None = None) -> None:
    """Refuses training data the objective would silently misuse (ValueError naming the fix).

    ``fields``: the training records' fields (``embedjax.data.pipeline.fields_of(source)``,
    some of text_a, text_b, text_n, score); ``scores``: every record's score
    (``embedjax.train.sources.scores_of(source)``), or None when the records have none.

    * InfoNCE / SimCSE on scored pairs: the scores would be ignored (every pair a positive).
    * angle / cosent / cosine_mse on records without scores: nothing to regress or rank.
    * AnglE (in-batch term) / cosine_mse with a ``label_range`` that does not cover the
      observed scores: they would be mis-scaled (AnglE's positives, cosine_mse's targets).
    * hard negatives (text_n) with a loss that ignores them (every loss but infonce).
    * infonce without a second text (use simcse_unsup), simcse_unsup on pairs (use infonce).
    * margin_mse / listwise_kl without teacher scores and hard negatives; teacher scores with a
      loss that ignores them; scored auxiliary losses on unscored records.
    """
    fields = tuple(fields)
    loss = objective.loss
    has_score = "score" in fields
    if loss in TEACHER_LOSSES and not {"text_b", "text_n", "teacher"} <= set(fields):
        raise ValueError(
            f"objective.loss={loss!r} distils teacher scores of (query, positive, negatives), but the training "
            f"records have only {fields}. Use data.kind=distill (jsonl with text_a, text_b, text_n and teacher "
            "scores, e.g. written by scripts/mine.py).")
    if "teacher" in fields and loss not in TEACHER_LOSSES:
        raise ValueError(
            f"the training records carry teacher scores but objective.loss={loss!r} ignores them. Use "
            "objective.loss=margin_mse or listwise_kl, or data.kind=triplets to train on the texts alone.")
    if objective.aux_losses and not has_score:
        names = [name for name, _, _ in objective.aux_losses]
        raise ValueError(f"objective.aux_losses {names} rank or regress gold scores, but the training records "
                         f"have none {fields}")
    if loss in CONTRASTIVE_LOSSES and has_score:
        raise ValueError(
            f"objective.loss={loss!r} ignores scores, but the training records are scored pairs {fields}: every "
            "pair would count as a positive whatever its score. Use a loss that reads scores "
            "(objective.loss=cosent, angle or cosine_mse), or unscored data (data.kind=pairs / triplets).")
    if loss in SCORED_LOSSES and not has_score:
        raise ValueError(
            f"objective.loss={loss!r} needs a gold score per pair, but the training records have only {fields}. "
            "Use scored data (data.kind=stsb, sick or scored), or a contrastive loss "
            "(objective.loss=infonce for pairs/triplets, simcse_unsup for sentences).")
    if "text_n" in fields and loss not in NEGATIVE_LOSSES:
        raise ValueError(
            f"the training records have hard negatives (text_n) but objective.loss={loss!r} ignores them. "
            "Use objective.loss=infonce (hard negatives as extra candidates), or pairs without negatives.")
    if loss == "infonce" and "text_b" not in fields:
        raise ValueError(
            "objective.loss='infonce' needs a positive (text_b) per record, but the records are single texts "
            f"{fields}. For unsupervised SimCSE (each text its own positive under dropout) use "
            "objective.loss=simcse_unsup.")
    if loss == "simcse_unsup" and "text_b" in fields:
        raise ValueError(
            f"objective.loss='simcse_unsup' trains on single sentences, but the records are pairs {fields}. "
            "Use objective.loss=infonce for (anchor, positive) pairs, or data.kind=sentences.")
    label_range = _label_range(objective)
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


def _named_loss(name: str, kw: Mapping[str, Any]):
    """``fn(za, zb, zn, labels, *, a_hash, b_hash, n_hash, teacher_scores)`` for the loss called ``name``."""
    def fn(za, zb, zn=None, labels=None, *, a_hash=None, b_hash=None, n_hash=None, teacher_scores=None):
        if name == "angle":
            return losses.angle_loss(za, zb, labels, a_ids=a_hash, b_ids=b_hash, **kw)
        if name == "cosent":
            return losses.cosent(za, zb, labels, **kw)
        if name == "cosine_mse":  # no in-batch interaction: accumulation is exactly the large batch
            return losses.cosine_mse(za, zb, labels, **kw)
        if name == "pearson":
            return losses.pearson_loss(za, zb, labels, **kw)
        if name == "rank_consistency":
            return losses.rank_consistency_loss(za, zb, labels, **kw)
        if name == "margin_mse":
            return losses.margin_mse(za, zb, zn, teacher_scores, **kw)
        if name == "listwise_kl":
            return losses.listwise_kl(za, zb, zn, teacher_scores, **kw)
        # infonce, and unsupervised SimCSE (two dropout views of the same texts)
        return losses.infonce(za, zb, zn, anchor_ids=a_hash, positive_ids=b_hash, negative_ids=n_hash, **kw)

    return fn


def _pair_loss(objective: Objective):
    """The main loss plus the weighted auxiliary losses, all on the same embeddings: one
    ``fn(za, zb, zn, labels, *, a_hash, b_hash, n_hash, teacher_scores)`` that the Matryoshka and
    layer wrappers then apply at every width / depth."""
    terms = [(_named_loss(objective.loss, dict(objective.loss_kwargs)), 1.0)]
    terms += [(_named_loss(name, dict(kw)), weight) for name, weight, kw in objective.aux_losses]
    if len(terms) == 1:
        return terms[0][0]

    def fn(*args, **kwargs):
        return sum(weight * term(*args, **kwargs) for term, weight in terms)

    return fn


def loss_function(objective: Objective):
    """The configured loss, with its Matryoshka and layer wrappers, over embeddings."""
    fn = _pair_loss(objective)
    if objective.matryoshka_dims:
        fn = losses.matryoshka(fn, objective.matryoshka_dims, objective.matryoshka_weights or None,
                               n_dims_per_step=objective.matryoshka_n_per_step or None)
    layer_kw = dict(objective.layer_kwargs)
    if objective.layers == "2dmse":
        fn = losses.matryoshka_2d(fn, **layer_kw)
    elif objective.layers == "adaptive":
        fn = losses.adaptive_layer(fn, **layer_kw)
    elif objective.layers == "espresso":
        fn = losses.espresso(fn, **layer_kw)
    return fn


def _embed_side(params, enc_cfg, objective, batch, side, key):
    ids, mask = batch[f"{side}_ids"], batch[f"{side}_mask"]
    types, pool_mask = batch.get(f"{side}_types"), batch.get(f"{side}_pool")
    lead = ids.shape[:-1]  # (B,) or (B, k) for several negatives per anchor
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])
    z = embed(
        params,
        enc_cfg,
        flat(ids),
        flat(mask),
        token_type_ids=flat(types),
        pool_mask=flat(pool_mask),
        pooling=objective.pooling,
        normalize=False,  # the losses normalise (AnglE's angle term needs the raw vectors)
        dropout_key=key if objective.dropout else None,
        per_layer=bool(objective.layers),
        remat=objective.remat,
        unroll=objective.unroll,
    )
    if objective.layers and not dict(objective.layer_kwargs).get("embedding_layer", False):
        z = z[1:]  # drop the embedding-layer output: stack entry p is layer p + 1
    return z.reshape(*z.shape[:-2], *lead, z.shape[-1])


def _embed_packed_batch(params, enc_cfg, objective: Objective, batch, key):
    index = {side: batch[f"{side}_text"] for side in "abn" if f"{side}_text" in batch}
    z = embed_packed(
        params,
        enc_cfg,
        batch["p_ids"],
        batch["p_segments"],
        batch["p_positions"],
        num_texts=sum(i.size for i in index.values()),  # static; an upper bound if texts are shared
        token_type_ids=batch.get("p_types"),
        pool_flags=batch.get("p_pool"),
        pooling=objective.pooling,
        normalize=False,
        dropout_key=key if objective.dropout else None,
        per_layer=bool(objective.layers),
        remat=objective.remat,
        unroll=objective.unroll,
    )
    if objective.layers and not dict(objective.layer_kwargs).get("embedding_layer", False):
        z = z[1:]
    take = lambda side: jnp.take(z, index[side], axis=-2) if side in index else None
    if "b" not in index:
        raise ValueError("a packed batch needs b_text; for unsupervised SimCSE pack with Packing(views=2) so "
                         "each text is embedded twice under independent dropout")
    return take("a"), take("b"), take("n")


def embed_batch(params, enc_cfg, objective: Objective, batch: Mapping[str, jax.Array], key):
    """``(za, zb, zn)``: embeddings of the batch's sides (``zn`` None without negatives)."""
    if "p_ids" in batch:
        return _embed_packed_batch(params, enc_cfg, objective, batch, key)
    k_a, k_b, k_n = jax.random.split(key, 3)
    za = _embed_side(params, enc_cfg, objective, batch, "a", k_a)
    # Unsupervised SimCSE has no side b: the positive is side a under another dropout mask.
    zb = _embed_side(params, enc_cfg, objective, batch, "b" if "b_ids" in batch else "a", k_b)
    zn = _embed_side(params, enc_cfg, objective, batch, "n", k_n) if "n_ids" in batch else None
    return za, zb, zn


def distill_function(objective: Objective):
    """``fn(student, teacher) -> scalar`` for ``objective.distill_loss``: student (B, D), or a
    per-layer stack (L, B, D) whose every layer is taught (the mean over layers); teacher (B, D).
    ``mse`` compares L2-normalised embeddings (what the exported, normalising model outputs)."""
    base = {"mse": lambda s, t: losses.embedding_mse(_unit(s), _unit(t)),
            "cosine": losses.embedding_cosine,
            "similarity_mse": losses.similarity_mse}[objective.distill_loss]

    def fn(student, teacher):
        if student.ndim == teacher.ndim + 1:  # (L, B, D): every layer learns from the teacher
            return jnp.mean(jax.vmap(lambda z: base(z, teacher))(student))
        return base(student, teacher)

    return fn


def _unit(x):
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def teacher_embeddings(teacher_params, objective: Objective, batch: Mapping[str, jax.Array]):
    """The teacher's ``(za, zb)`` of a batch (last layer, no dropout, no gradient). The teacher
    reads the student's token ids, so the two must share a tokenizer (the loop checks)."""
    view = dataclasses.replace(objective, pooling=objective.teacher_pooling, layers="", dropout=False,
                               gradcache_chunk=0, remat=False, unroll=True, distill_loss="")
    za, zb, _ = embed_batch(teacher_params, objective.teacher_cfg, view, batch, jax.random.key(0))
    return jax.lax.stop_gradient(za), jax.lax.stop_gradient(zb)


def batch_loss(params, enc_cfg, objective: Objective, batch: Mapping[str, jax.Array], key, teacher=None):
    """Loss of one batch; ``key`` drives dropout and any sampling (dims, layers).

    With ``objective.gradcache_chunk`` the encoder runs chunk by chunk under
    ``jax.checkpoint`` (GradCache): the same loss and gradient, activation memory bounded
    by the chunk instead of the batch. With ``objective.distill_loss``, ``teacher`` holds the
    teacher encoder's params: ``distill_weight`` x the distillation loss of both sides' student
    embeddings towards the teacher's is added.
    """
    k_embed, k_loss = jax.random.split(key)
    if objective.gradcache_chunk and "p_ids" in batch:
        raise ValueError("GradCache chunks the batch by examples; it cannot take a packed batch "
                         "(set data.pack_length=0 with objective.gradcache_chunk)")
    if objective.uses_teacher and teacher is None:
        raise ValueError("objective.distill_loss is set: batch_loss needs the teacher's params (teacher=)")
    if objective.gradcache_chunk:
        inputs = {k: v for k, v in batch.items() if k.endswith(("_ids", "_mask", "_types", "_pool"))}
        embed_all = gradcache.chunked_embed(
            lambda p, chunk, k: embed_batch(p, enc_cfg, objective, chunk, k),
            objective.gradcache_chunk,
            batch_axis=1 if objective.layers else 0,  # per-layer stacks are (L, B, D)
        )
        za, zb, zn = embed_all(params, inputs, k_embed)
    else:
        za, zb, zn = embed_batch(params, enc_cfg, objective, batch, k_embed)
    fn = loss_function(objective)
    b_hash = batch.get("b_hash") if ("b_ids" in batch or "b_text" in batch) else batch.get("a_hash")
    kwargs = dict(a_hash=batch.get("a_hash"), b_hash=b_hash, n_hash=batch.get("n_hash"))
    if "teacher" in batch:
        kwargs["teacher_scores"] = batch["teacher"]
    if objective.layers in ("2dmse", "adaptive") or objective.matryoshka_n_per_step:
        kwargs["key"] = k_loss
    loss = fn(za, zb, zn, batch.get("labels"), **kwargs)
    if objective.uses_teacher:
        ta, tb = teacher_embeddings(teacher, objective, batch)
        distill = distill_function(objective)
        loss = loss + objective.distill_weight * (distill(za, ta) + distill(zb, tb)) / 2
    return loss
