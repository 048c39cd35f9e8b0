"""The training objective: which loss, wrapped how, applied to which batch fields.

An ``Objective`` is a frozen (hashable) description built from a config's objective section;
the pure ``batch_loss(params, enc_cfg, objective, batch, key)`` embeds an
``embedjax.data.batch.Batch`` with the shared ``embed`` (``embed_packed`` for packed rows) and
applies the loss. What each loss reads, and which data it refuses, is its row in
``embedjax.train.loss_specs.LOSSES``. A C-STS tri-encoder (``Objective.tri_head``) conditions the
two sentences' embeddings on side n's condition (``condition_embeddings``) before the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from embedjax import gradcache, losses
from embedjax import tri_head as tri_head_lib
from embedjax.data.batch import Batch, Side
from embedjax.embed import embed, embed_packed
from embedjax.train.loss_specs import AUX_LOSSES, DISTILL_LOSSES, LAYER_MODES, LOSSES


@dataclasses.dataclass(frozen=True)
class Objective:
    """Static description of the loss (hashable: a jit static argument)."""

    loss: str = "angle"
    loss_kwargs: tuple = ()          # sorted (name, value) items passed to the loss
    pooling: str = "mean"            # the run's pooling (config.pooling, resolved against the checkpoint)
    dense: str | None = None         # the encoder's Dense head activation (params["dense"]), None without one
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
    guide: bool = False              # the frozen model's embeddings decide the in-batch false negatives (GISTEmbed)
    teacher_cfg: Any = None          # the frozen model's (static) config: distillation teacher and/or guide
    teacher_pooling: str = ""
    teacher_dense: str | None = None
    tri_head: bool = False           # a C-STS tri-encoder: side n is the condition, params["tri_head"] conditions a and b
    mntp: Any = None                 # loss "mntp": its resolved tokens and rates (embedjax.train.mntp_objective.resolve)
    negatives_exchange: str = "gathered"  # "ring": the contrastive loss goes around the batch axes (losses.ring)
    mesh: Any = None                 # the run's mesh, set by ``on_mesh`` (the ring loss's shard_map needs it)

    @property
    def exchange_choice(self) -> str:
        """``negatives_exchange`` where the loss has both forms (a knob the memory check names), else ''."""
        return self.negatives_exchange if self.loss in RING_LOSSES else ""

    def on_mesh(self, mesh) -> "Objective":
        """This objective bound to the run's mesh (``train.step.jit_train_step`` calls it): the ring
        loss computes over that mesh's batch axes; the gathered loss needs no mesh."""
        return dataclasses.replace(self, mesh=mesh) if self.negatives_exchange == "ring" else self

    @property
    def uses_teacher(self) -> bool:
        """Whether the loss reads the run's frozen model (``batch_loss(..., teacher=)``): a
        distillation teacher, a guide, or both (one model)."""
        return bool(self.distill_loss) or self.guide

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], pooling: str, teacher=None, tri_head: bool = False,
                    dense: str | None = None) -> "Objective":
        """From the ``objective`` section of a config (configs/base.py declares every key; a
        missing key raises KeyError, an unknown one ValueError).

        ``pooling`` is the run's resolved pooling mode (the encoder's, after ``config.pooling``
        overrode the checkpoint's): a run has one pooling setting, used by training,
        evaluation and export alike. ``teacher``: the ``Encoder`` named by ``distill.teacher``
        (loaded by the caller), when ``distill.weight`` > 0. ``tri_head``: the encoder is a C-STS
        tri-encoder (its params hold ``embedjax.tri_head``'s head). ``dense``: the encoder's Dense
        head activation (``Encoder.dense``; the head trains with the model).
        """
        fields = cls.check_section(cfg)
        if not pooling:
            raise ValueError("Objective.from_config needs the resolved pooling mode (the encoder's), got ''")
        distill = cfg["distill"]
        frozen = bool(fields["distill_loss"]) or fields["guide"]
        if frozen and teacher is None:
            name = distill["teacher"] if fields["distill_loss"] else cfg["guide"]
            raise ValueError(f"objective reads the frozen model {name!r}: pass the loaded teacher encoder (teacher=)")
        if fields["loss"] == "tsdae":
            from embedjax.train.tsdae_objective import check_options

            check_options(fields)
        if fields["loss"] == "mntp":
            from embedjax.train.mntp_objective import check_options as check_mntp

            check_mntp(fields)
        if tri_head and (fields["layers"] or fields["matryoshka_dims"] or frozen):
            raise ValueError("a tri-encoder scores the conditioned embeddings through its head: objective.layers, "
                             "matryoshka_dims, distill and guide do not apply")
        return cls(pooling=pooling, dense=dense, teacher_cfg=teacher.cfg if frozen else None,
                   teacher_pooling=teacher.pooling if frozen else "",
                   teacher_dense=getattr(teacher, "dense", None) if frozen else None, tri_head=tri_head, **fields)

    @staticmethod
    def check_section(cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The section's own checks (keys, names and their combinations), before any model is
        loaded; returns the ``Objective`` fields it sets (all but the pooling and the teacher's)."""
        unknown = sorted(set(cfg) - OBJECTIVE_KEYS)
        if unknown:
            raise ValueError(f"unknown objective keys {unknown}; the objective section has {sorted(OBJECTIVE_KEYS)}")
        loss = cfg["loss"]
        if loss not in LOSSES:
            raise ValueError(f"unknown objective.loss {loss!r}; choose one of {tuple(LOSSES)}")
        layers = cfg["layers"]
        if layers is not None and layers not in LAYER_MODES:
            raise ValueError(f"unknown objective.layers {layers!r}; choose one of {tuple(LAYER_MODES)}, or None for "
                             "the last layer only")
        if layers in ("2dmse", "espresso") and cfg["matryoshka_dims"]:
            raise ValueError(f"objective.layers={layers!r} truncates dims itself; matryoshka_dims combine with "
                             "layers=None or 'adaptive' (sentence-transformers' Matryoshka2dLoss)")
        if layers and cfg["matryoshka_n_per_step"]:
            raise ValueError("matryoshka_n_per_step cannot be combined with objective.layers (the layer "
                             "wrappers own the step's key); use every dim inside 2D losses")
        items = lambda d: tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(d or {}).items()))  # noqa: E731
        distill = cfg["distill"]
        if distill["teacher"] == "":
            raise ValueError("objective.distill.teacher is '': leave it None for no teacher")
        guide = cfg["guide"]
        if guide is not None and (not isinstance(guide, str) or not guide):
            raise ValueError(f"objective.guide must be a checkpoint directory / hub id, 'initial', or None, got {guide!r}")
        distill_on = distill["teacher"] is not None and float(distill["weight"]) > 0
        exchange = cfg["negatives_exchange"]
        if exchange not in NEGATIVES_EXCHANGES:
            raise ValueError(f"unknown objective.negatives_exchange {exchange!r}; choose one of {NEGATIVES_EXCHANGES}")
        if exchange == "ring" and loss not in RING_LOSSES:
            raise ValueError(f"objective.negatives_exchange='ring' computes the contrastive losses {RING_LOSSES} around "
                             f"the devices; objective.loss={loss!r} has no ring form: use 'gathered'")
        if distill_on and distill["loss"] not in DISTILL_LOSSES:
            raise ValueError(f"unknown objective.distill.loss {distill['loss']!r}; choose one of {tuple(DISTILL_LOSSES)}")
        return dict(
            loss=loss,
            loss_kwargs=items(cfg["loss_kwargs"]),
            matryoshka_dims=tuple(cfg["matryoshka_dims"] or ()),
            matryoshka_weights=tuple(cfg["matryoshka_weights"] or ()),
            matryoshka_n_per_step=int(cfg["matryoshka_n_per_step"] or 0),
            layers=layers or "",
            layer_kwargs=items(cfg["layer_kwargs"]),
            remat=cfg["remat"] if isinstance(cfg["remat"], str) else bool(cfg["remat"]),
            unroll=bool(cfg["unroll"]),
            dropout=bool(cfg["dropout"]),
            gradcache_chunk=int(cfg["gradcache_chunk"] or 0),
            aux_losses=aux_losses_from_config(cfg["aux_losses"]),
            distill_loss=distill["loss"] if distill_on else "",
            distill_weight=float(distill["weight"]) if distill_on else 1.0,
            guide=guide is not None,
            negatives_exchange=exchange,
        )


def dense_only_options(fields: Mapping[str, Any]) -> list[str]:
    """The wrappers set in a checked objective section (``Objective.check_section``'s fields) that
    only a bi-encoder run applies (Matryoshka, layers, GradCache, auxiliary losses, distillation,
    guide, the ring loss): what a cross-encoder or SPLADE run must refuse."""
    used = {"matryoshka_dims": fields["matryoshka_dims"], "layers": fields["layers"],
            "gradcache_chunk": fields["gradcache_chunk"], "aux_losses": fields["aux_losses"],
            "distill.teacher": fields["distill_loss"], "guide": fields["guide"],
            "negatives_exchange='ring'": fields.get("negatives_exchange") == "ring"}
    return sorted(k for k, v in used.items() if v)


def embed_padded_sides(embed_side, params, batch: Batch, key, *, gradcache_chunk: int, run: str):
    """``(za, zb, zn)`` of a padded batch of queries and documents (``zn`` None without negatives):
    ``embed_side(params, side, key)`` per side, each under its own dropout key, chunk by chunk under
    GradCache when ``gradcache_chunk`` (``gradcache.chunked_embed``). ``run`` names the run kind in
    the error a packed batch gets (ColBERT and three-head runs read padded batches)."""
    if batch.packed is not None or batch.b is None:
        raise ValueError(f"{run} reads padded batches of queries and documents: set data.pack_length=0")

    def sides(p, b, k):
        k_a, k_b, k_n = jax.random.split(k, 3)
        return embed_side(p, b.a, k_a), embed_side(p, b.b, k_b), None if b.n is None else embed_side(p, b.n, k_n)

    if gradcache_chunk:
        return gradcache.chunked_embed(sides, gradcache_chunk)(params, batch.token_inputs(), key)
    return sides(params, batch, key)


# The keys of a config's ``objective`` section (configs/base.py).
OBJECTIVE_KEYS = frozenset({"loss", "loss_kwargs", "matryoshka_dims", "matryoshka_weights", "matryoshka_n_per_step",
                            "layers", "layer_kwargs", "remat", "unroll", "dropout", "gradcache_chunk", "aux_losses",
                            "distill", "guide", "negatives_exchange"})
# How in-batch candidates reach every device: all-gathered (GSPMD; a (local x global) logit block per
# device) or passed around a ring (``losses.ring``; (local x local) blocks), for these losses.
NEGATIVES_EXCHANGES = ("gathered", "ring")
RING_LOSSES = ("infonce", "simcse_unsup")


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


def _pair_loss(objective: Objective):
    """The main loss plus the weighted auxiliary losses, all on the same embeddings: one
    ``fn(za, zb, zn, labels, *, a_hash, b_hash, n_hash, teacher_scores)`` that the Matryoshka and
    layer wrappers then apply at every width / depth."""
    main_kwargs = dict(objective.loss_kwargs)
    if objective.negatives_exchange == "ring":
        if objective.mesh is None:
            raise ValueError("objective.negatives_exchange='ring' needs the run's mesh: use objective.on_mesh(mesh)")
        main_kwargs["ring_mesh"] = objective.mesh
    terms = [(LOSSES[objective.loss].bind(main_kwargs), 1.0)]
    terms += [(LOSSES[name].bind(dict(kw)), weight) for name, weight, kw in objective.aux_losses]
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
    if objective.layers:
        fn = LAYER_MODES[objective.layers](fn, **dict(objective.layer_kwargs))
    return fn


def _embed_options(objective: Objective, key) -> dict:
    """``embed`` / ``embed_packed`` keyword arguments for training: raw vectors (the losses
    normalise; AnglE's angle term needs the raw ones), dropout as configured, per-layer stacks
    for the layer wrappers."""
    return dict(pooling=objective.pooling, normalize=False, dropout_key=key if objective.dropout else None,
                per_layer=bool(objective.layers), remat=objective.remat, unroll=objective.unroll,
                dense=objective.dense)


def _drop_embedding_layer(objective: Objective, z):
    """Per-layer stacks start at the embedding-layer output; the layer wrappers see it only
    with ``layer_kwargs.embedding_layer`` (stack entry p is then layer p, else layer p + 1)."""
    if objective.layers and not dict(objective.layer_kwargs).get("embedding_layer", False):
        return z[1:]
    return z


def _embed_side(params, enc_cfg, objective: Objective, side: Side, key):
    lead = side.ids.shape[:-1]  # (B,) or (B, k) for several negatives per anchor
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])  # noqa: E731
    z = embed(params, enc_cfg, flat(side.ids), flat(side.mask), token_type_ids=flat(side.types),
              pool_mask=flat(side.pool), **_embed_options(objective, key))
    z = _drop_embedding_layer(objective, z)
    return z.reshape(*z.shape[:-2], *lead, z.shape[-1])


def _embed_packed_batch(params, enc_cfg, objective: Objective, batch: Batch, key):
    index = {name: side.text_index for name, side in batch.sides.items()}
    if "b" not in index:
        raise ValueError("a packed batch needs side b; for unsupervised SimCSE pack with Packing(views=2) so "
                         "each text is embedded twice under independent dropout")
    rows = batch.packed
    z = embed_packed(params, enc_cfg, rows.ids, rows.segments, rows.positions,
                     num_texts=sum(i.size for i in index.values()),  # static; an upper bound if texts are shared
                     token_type_ids=rows.types, pool_flags=rows.pool, **_embed_options(objective, key))
    z = _drop_embedding_layer(objective, z)
    take = lambda side: jnp.take(z, index[side], axis=-2) if side in index else None  # noqa: E731
    return take("a"), take("b"), take("n")


def embed_batch(params, enc_cfg, objective: Objective, batch: Batch, key):
    """``(za, zb, zn)``: embeddings of the batch's sides (``zn`` None without negatives)."""
    if batch.packed is not None:
        return _embed_packed_batch(params, enc_cfg, objective, batch, key)
    k_a, k_b, k_n = jax.random.split(key, 3)
    za = _embed_side(params, enc_cfg, objective, batch.a, k_a)
    # Unsupervised SimCSE has no side b: the positive is side a under another dropout mask.
    zb = _embed_side(params, enc_cfg, objective, batch.b if batch.b is not None else batch.a, k_b)
    zn = _embed_side(params, enc_cfg, objective, batch.n, k_n) if batch.n is not None else None
    return za, zb, zn


def condition_embeddings(params, za, zb, zn):
    """A tri-encoder's batch (``embedjax.tri_head``): side n holds each example's condition, or its
    two conditions, the higher-scored first (``data.csts_records=tri_quadruplets``); returns the
    conditioned ``(za, zb, zn)``: ``zn`` None, or the pair under the lower-scored condition
    ``(B, 2, D)`` (what ``losses.quadruplet`` takes)."""
    head = params[tri_head_lib.KEY]
    if zn is None:
        raise ValueError("a tri-encoder batch carries each example's condition as side n (data.kind=csts with "
                         "data.csts_records=tri or tri_quadruplets)")
    if zn.ndim == za.ndim + 1:
        high, low = zn[..., 0, :], zn[..., 1, :]
        under_low = jnp.stack([tri_head_lib.condition(head, za, low), tri_head_lib.condition(head, zb, low)], axis=-2)
        return tri_head_lib.condition(head, za, high), tri_head_lib.condition(head, zb, high), under_low
    return tri_head_lib.condition(head, za, zn), tri_head_lib.condition(head, zb, zn), None


def distill_function(objective: Objective):
    """``fn(student, teacher) -> scalar`` for ``objective.distill_loss`` (``loss_specs.DISTILL_LOSSES``):
    student (B, D), or a per-layer stack (L, B, D) whose every layer is taught (the mean over
    layers); teacher (B, D)."""
    base = DISTILL_LOSSES[objective.distill_loss]

    def fn(student, teacher):
        if student.ndim == teacher.ndim + 1:  # (L, B, D): every layer learns from the teacher
            return jnp.mean(jax.vmap(lambda z: base(z, teacher))(student))
        return base(student, teacher)

    return fn


def teacher_embeddings(teacher_params, objective: Objective, batch: Batch):
    """The frozen model's ``(za, zb, zn)`` of a batch (last layer, no dropout, no gradient; ``zn``
    None without negatives). It reads the student's token ids, so the two must share a tokenizer
    (the loop checks)."""
    view = dataclasses.replace(objective, pooling=objective.teacher_pooling, dense=objective.teacher_dense,
                               layers="", dropout=False,
                               gradcache_chunk=0, remat=False, unroll=True, distill_loss="", guide=False)
    return jax.lax.stop_gradient(embed_batch(teacher_params, objective.teacher_cfg, view, batch, jax.random.key(0)))


def batch_loss(params, enc_cfg, objective: Objective, batch: Batch, key, teacher=None):
    """Loss of one batch; ``key`` drives dropout and any sampling (dims, layers).

    With ``objective.gradcache_chunk`` the encoder runs chunk by chunk under
    ``jax.checkpoint`` (GradCache): the same loss and gradient, activation memory bounded
    by the chunk instead of the batch. With ``objective.distill_loss``, ``teacher`` holds the
    teacher encoder's params: ``distill_weight`` x the distillation loss of both sides' student
    embeddings towards the teacher's is added. With ``objective.guide`` the same frozen model's
    embeddings go to the contrastive loss as ``guide`` (its false-negative rule reads them).
    """
    if objective.loss == "tsdae":  # token-level: a decoder reconstructs side b from side a's embedding
        from embedjax.train.tsdae_objective import tsdae_batch_loss

        return tsdae_batch_loss(params, enc_cfg, objective, batch, key)
    if objective.loss == "mntp":  # token-level: masked tokens predicted through the decoder's LM head
        from embedjax.train.mntp_objective import mntp_batch_loss

        return mntp_batch_loss(params, enc_cfg, objective, batch, key)
    k_embed, k_loss = jax.random.split(key)
    if objective.gradcache_chunk and batch.packed is not None:
        raise ValueError("GradCache chunks the batch by examples; it cannot take a packed batch "
                         "(set data.pack_length=0 with objective.gradcache_chunk)")
    if objective.uses_teacher and teacher is None:
        raise ValueError("objective.distill_loss is set: batch_loss needs the teacher's params (teacher=)")
    if objective.gradcache_chunk:
        embed_all = gradcache.chunked_embed(
            lambda p, chunk, k: embed_batch(p, enc_cfg, objective, chunk, k),
            objective.gradcache_chunk,
            batch_axis=1 if objective.layers else 0,  # per-layer stacks are (L, B, D)
        )
        za, zb, zn = embed_all(params, batch.token_inputs(), k_embed)
    else:
        za, zb, zn = embed_batch(params, enc_cfg, objective, batch, k_embed)
    if objective.tri_head:
        za, zb, zn = condition_embeddings(params, za, zb, zn)
    kwargs = dict(a_hash=batch.a.hashes, b_hash=batch.positive_hashes,
                  n_hash=None if batch.n is None or zn is None else batch.n.hashes)
    if batch.teacher is not None:
        kwargs["teacher_scores"] = batch.teacher
    if batch.relevant is not None:
        kwargs["relevant"] = batch.relevant
    if objective.layers in ("2dmse", "adaptive") or objective.matryoshka_n_per_step:
        kwargs["key"] = k_loss
    frozen = teacher_embeddings(teacher, objective, batch) if objective.uses_teacher else None
    if objective.guide:
        kwargs["guide"] = tuple(frozen)  # a tuple: the Matryoshka / layer wrappers leave it whole
    loss = loss_function(objective)(za, zb, zn, batch.labels, **kwargs)
    if objective.distill_loss:
        distill = distill_function(objective)
        loss = loss + objective.distill_weight * (distill(za, frozen[0]) + distill(zb, frozen[1])) / 2
    return loss
