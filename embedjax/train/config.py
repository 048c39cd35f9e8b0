"""A training config parsed once into typed sections, and the ``--config.KEY`` checks.

Configs stay ``ml_collections`` files (``configs/*.py`` with ``get_config(arg)``, ``:variant``
syntax, ``--config.KEY=VALUE`` overrides; ``configs/base.py`` declares every key).
``TrainConfig.from_config`` turns one into frozen dataclasses, one per section, with every
check in one place, and each builder takes the section it uses:

    ModelConfig       model, pooling, max_length, dtype, dropout rates,   embedjax.train.encoders
                      attention, pooler_init, prompts, include_prompt
    LoraConfig        lora.*                                              embedjax.train.encoders
    SourceConfig      data.* (or one data.mixture entry over it) and      embedjax.train.sources / tasks
                      its objective section (objective.*, the entry's
                      overrides)
    OptimConfig       optim.*                                             embedjax.train.optim
    CheckpointConfig  checkpoint.*                                        embedjax.checkpoint

``None`` says "the checkpoint's own" (pooling, max_length, dropout rates, attention) or "not
set" (num_steps: train by epochs; memory_limit_gib: the device's limit; data.format: from the
file suffix; lora.targets: every projection; objective.layers: the last layer only;
objective.distill.teacher: no teacher). No key encodes either with -1, "" or 0.

``check_override_keys`` / ``override_keys_from_argv``: a mistyped ``--config.KEY`` is one line
naming the closest declared keys, before any flag parsing.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Iterable, Mapping, Sequence

# Free-form dicts (keyword arguments, column maps, evaluator entries): any key may appear below them, but
# ``--config.a.b.key`` only overrides a key the config already has.
OPEN_SECTIONS = ("objective.loss_kwargs", "objective.layer_kwargs", "objective.aux_losses", "data.columns", "data.mixture",
                 "data.prompts", "evals", "pooler_init")
MIXTURE_KEYS = ("mixture", "mixture_mode")  # data keys that describe the mixture itself, not a source
MIXTURE_MODES = ("sampled", "round_robin")
DTYPES = ("float32", "bfloat16")
ATTENTION = ("causal", "bidirectional")
DECAYS = ("linear", "cosine", "constant")
EMA_SELECT = ("best", "ema", "raw")
SHARDING_RULES = ("replicated", "fsdp")
MODEL_KINDS = ("bi_encoder", "cross_encoder", "tri_encoder", "splade", "colbert", "m3")
INITIAL_TEACHER = "initial"  # objective.distill.teacher: the run's own starting model, frozen


def as_dict(config: Any) -> dict:
    """A ConfigDict or (nested) mapping as plain dicts."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in dict(config).items()}


def _optional(value, kind: type, name: str):
    """``value`` as ``kind``, or None: how a config says "not set" (never "", -1 or 0)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        what = "a number" if kind in (int, float) else f"a {kind.__name__}"
        raise ValueError(f"{name} must be {what} or None, got {value!r}")
    if value == "":
        raise ValueError(f"{name} is '': leave it None (unset) instead")
    return kind(value)


def _choice(value, choices: Sequence[str], name: str, *, optional: bool = False):
    if value is None and optional:
        return None
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}{' or None' if optional else ''}, got {value!r}")
    return value


def _integer(value, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _number(value, name: str, *, lo: float | None = None, hi: float | None = None, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and (value >= hi if hi_open else value > hi)):
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")
    return float(value)


def _rate(value, name: str) -> float | None:
    rate = _optional(value, float, name)
    if rate is not None and not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), or None for the checkpoint's own rate, got {rate}")
    return rate


# ---------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The checkpoint a run starts from and the run's settings over it (None: the checkpoint's own)."""

    path: str
    pooling: str | None = None
    max_length: int | None = None
    dtype: str = "float32"
    hidden_dropout: float | None = None
    attention_dropout: float | None = None
    attention: str | None = None
    pooler_init: dict = dataclasses.field(default_factory=dict)
    prompts: dict = dataclasses.field(default_factory=dict)  # {"query": ..., "document": ...}, the set ones
    include_prompt: bool = True
    kind: str = "bi_encoder"          # or "cross_encoder": a head scores (text_a, text_b) read together
    num_labels: int = 1               # cross_encoder: logits per pair
    pair_template: str | None = None  # cross_encoder on decoders: "...{first}...{second}..."; None: the tokenizer's pairs
    tri_head: str | None = None       # tri_encoder: embedjax.tri_head.KINDS (a bi-encoder plus a condition head)
    splade: dict | None = None        # splade: the run's splade section (pooling, FLOPS regulariser; sparse_objective.py)
    colbert: dict | None = None       # colbert: the run's colbert section (dim, query / document length; colbert_model.py)

    @property
    def cross_encoder(self) -> bool:
        return self.kind == "cross_encoder"

    @property
    def sparse(self) -> bool:
        """A SPLADE run (``embedjax.sparse_model.SparseEncoder``)."""
        return self.kind == "splade"

    @property
    def multi_head(self) -> bool:
        """A three-head (BGE-M3) run (``embedjax.m3_model.M3Encoder``)."""
        return self.kind == "m3"

    @property
    def late(self) -> bool:
        """A ColBERT (late-interaction) run (``embedjax.colbert_model.ColbertEncoder``)."""
        return self.kind == "colbert"

    @classmethod
    def from_config(cls, config) -> ModelConfig:
        """From a config's top-level model keys and its ``prompts`` section."""
        from embedjax import pooling as pooling_lib

        if not config.model:
            raise ValueError("model must name a checkpoint directory or hub id")
        rates = {"hidden_dropout": _rate(config.hidden_dropout, "hidden_dropout"),
                 "attention_dropout": _rate(config.attention_dropout, "attention_dropout")}
        max_length = _optional(config.max_length, int, "max_length")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, or None for the checkpoint's own, got {max_length}")
        unknown = sorted(set(config.prompts) - {"query", "document"})
        if unknown:
            raise ValueError(f"prompts has unknown keys {unknown}; it takes 'query' and 'document'")
        prompts = {side: text for side, text in (("query", config.prompts.query), ("document", config.prompts.document))
                   if text}
        kind = _choice(config.get("model_kind", "bi_encoder"), MODEL_KINDS, "model_kind")
        by_kind = {}
        if kind == "cross_encoder":
            if prompts or config.pooling is not None:
                raise ValueError("prompts and pooling apply to bi-encoders; a cross-encoder reads the pair whole "
                                 "(decoders: pair_template)")
            by_kind = dict(num_labels=_integer(config.get("num_labels", 1), "num_labels", minimum=1),
                           pair_template=_optional(config.get("pair_template"), str, "pair_template"))
        elif kind == "tri_encoder":
            from embedjax import tri_head

            by_kind = dict(tri_head=_choice(config.get("tri_head", "hadamard"), tri_head.KINDS, "tri_head"))
        elif kind == "splade":
            if config.pooling is not None:
                raise ValueError("pooling is a dense encoder's; a SPLADE run pools with splade.pooling")
            by_kind = dict(splade=_splade_section(config.splade))
        elif kind == "colbert":
            if config.pooling is not None or prompts:
                raise ValueError("pooling and prompts apply to single-vector encoders; a ColBERT run keeps every "
                                 "token (its markers [Q] / [D] tell queries from documents)")
            if max_length is not None:
                raise ValueError("max_length: a ColBERT run sets colbert.query_length and colbert.document_length")
            by_kind = dict(colbert=_colbert_section(config.colbert))
        elif kind == "m3":
            if config.pooling is not None or prompts:
                raise ValueError("pooling and prompts: a three-head (m3) run pools [CLS] for its dense head and takes "
                                 "no prompts")
        return cls(path=str(config.model), pooling=_choice(config.pooling, pooling_lib.MODES, "pooling", optional=True),
                   max_length=max_length, dtype=_choice(config.dtype, DTYPES, "dtype"),
                   attention=_choice(config.attention, ATTENTION, "attention", optional=True),
                   pooler_init=dict(config.pooler_init or {}), prompts=prompts,
                   include_prompt=bool(config.include_prompt), kind=kind, **by_kind, **rates)


def _colbert_section(section) -> dict:
    """A ColBERT run's ``colbert`` section as a plain dict: None keeps the checkpoint's value (a fresh
    model on a plain backbone: 128 wide, queries of 32 tokens, documents of 180, as PyLate)."""
    out = {"dim": section.dim, "query_length": section.query_length, "document_length": section.document_length}
    for name, value in out.items():
        out[name] = _optional(value, int, f"colbert.{name}")
        if out[name] is not None and out[name] < 2:
            raise ValueError(f"colbert.{name} must be >= 2, or None, got {value}")
    return out


def _splade_section(splade) -> dict:
    """A SPLADE run's ``splade`` section as a plain dict (checked by ``SparseObjective.from_config``)."""
    return {"pooling": splade.pooling, "activation": splade.activation, "query_weight": splade.query_weight,
            "document_weight": splade.document_weight, "warmup": splade.warmup, "schedule": splade.schedule,
            "query_threshold": splade.query_threshold, "document_threshold": splade.document_threshold,
            "inference_free": bool(splade.inference_free), "head_init": splade.head_init}


def by_side(prompts: Mapping[str, str]) -> dict[str, str]:
    """``{"query": q, "document": d}`` as the batch sides ``{"a": q, "b": d, "n": d}`` (the form
    ``embedjax.data.pipeline.side_prompts`` completes): the first text of a record is the query;
    its positive and hard negatives are documents."""
    document = prompts.get("document", "")
    return {"a": prompts.get("query", ""), "b": document, "n": document}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (``embedjax.lora``); ``rank`` 0 trains every parameter instead."""

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | None = None      # None: every attention and MLP projection
    rslora: bool = False
    save_peft: bool = True
    init_from: str | None = None    # a PEFT adapter directory to start from (its own rank and targets)

    @classmethod
    def from_config(cls, lora) -> LoraConfig:
        return cls(rank=_integer(lora["rank"], "lora.rank", minimum=0), alpha=_number(lora["alpha"], "lora.alpha"),
                   dropout=_number(lora["dropout"], "lora.dropout", lo=0.0, hi=1.0, hi_open=True),
                   targets=_optional(lora["targets"], str, "lora.targets"), rslora=bool(lora["rslora"]),
                   save_peft=bool(lora["save_peft"]), init_from=_optional(lora["init_from"], str, "lora.init_from"))

    def spec(self):
        """The ``embedjax.lora.LoraSpec`` to attach, or None (rank 0: full fine-tuning)."""
        if not self.rank:
            return None
        from embedjax import lora

        return lora.LoraSpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                             targets=self.targets or "^layers/", rslora=self.rslora)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """One training source's data: what its file holds (``kind``) and how its batches are laid out."""

    kind: str
    train: str
    format: str | None = None                 # None: from the file's suffix
    streaming: bool = False                   # read tsv/csv/jsonl/txt through an index (parquet / arrow always do)
    index_dir: str | None = None              # streaming: where indexes go; None = beside the file, else the cache
    columns: dict = dataclasses.field(default_factory=dict)  # {field: column}; {} = the defaults
    score_range: tuple | None = None          # (lo, hi) every score must lie in; None = any finite score
    tfds_name: str | None = None
    tfds_split: str = "train"
    tfds_data_dir: str | None = None          # None: TFDS's default
    skip_bad: bool = False
    split: str = "train"                      # kind=beir: the qrels split
    min_grade: int = 1                        # kind=beir: relevance >= min_grade is a positive
    positives: int | str = 1                  # kind=beir: positives per query and step (m, or "all")
    hard_negatives: str | None = None         # kind=beir: a mined jsonl (scripts/mine.py --beir)
    num_negatives: int = 0                    # kind=beir: mined negatives per query and step
    prompts: dict = dataclasses.field(default_factory=dict)  # {"query", "document"}: this source's; {} = the run's
    task: str | None = None                   # fills "{task}" in the prompts
    buckets: tuple = (16, 32, 64, 128, 256)
    pack_length: int = 64                     # 0: pad each side instead of packing
    pack_rows_multiple: int = 2
    in_batch_negatives: int = 0               # cross_encoder: other rows' positives added to each candidate group
    csts_records: str = "conditioned"         # kind=csts: embedjax.data.csts.RECORDS
    split_sentences: bool = False             # single texts: each cut into its sentences (embedjax.tsdae.split_sentences)
    noise: str | None = None                  # "delete": each text -> (damaged, original) pairs (embedjax.data.noise)
    noise_ratio: float = 0.6                  # noise="delete": each word's deletion probability

    @classmethod
    def from_config(cls, data) -> DataConfig:
        from embedjax.data.csts import RECORDS as CSTS_RECORDS
        from embedjax.data import streaming
        from embedjax.train import sources

        kind = _choice(data["kind"], sources.DATA_KINDS, "data.kind")
        fmt = _optional(data["format"], str, "data.format")
        if fmt is not None:
            _choice(fmt, streaming.FORMATS, "data.format")
        score_range = tuple(data["score_range"]) if data["score_range"] is not None else None
        if score_range is not None and len(score_range) != 2:
            raise ValueError(f"data.score_range must be (lo, hi) or None, got {score_range}")
        tfds_name = _optional(data["tfds_name"], str, "data.tfds_name")
        if kind == "tfds" and not tfds_name:
            raise ValueError("data.kind='tfds' needs data.tfds_name (e.g. --config.data.tfds_name=glue/stsb)")
        positives = _integer(data.get("positives", 1), "data.positives", minimum=1)
        if data.get("every_positive", False):
            positives = "all"
        hard_negatives = _optional(data.get("hard_negatives"), str, "data.hard_negatives")
        num_negatives = _integer(data.get("num_negatives", 0), "data.num_negatives", minimum=0)
        if num_negatives and hard_negatives is None:
            raise ValueError(f"data.num_negatives={num_negatives} needs data.hard_negatives, a file of mined negatives "
                             "(scripts/mine.py --beir writes one)")
        prompts = {k: v for k, v in dict(data.get("prompts") or {}).items() if v}
        unknown = sorted(set(prompts) - {"query", "document"})
        if unknown or not all(isinstance(v, str) for v in prompts.values()):
            raise ValueError(f"data.prompts takes 'query' and 'document' strings, got {dict(data.get('prompts'))!r}")
        task = _optional(data.get("task"), str, "data.task")
        noise = _optional(data.get("noise"), str, "data.noise")
        if noise is not None:
            from embedjax.data.noise import NOISES

            _choice(noise, NOISES, "data.noise")
        noise_ratio = data.get("noise_ratio", 0.6)
        if isinstance(noise_ratio, bool) or not isinstance(noise_ratio, (int, float)) or not 0 <= noise_ratio < 1:
            raise ValueError(f"data.noise_ratio is each word's deletion probability, in [0, 1); got {noise_ratio!r}")
        buckets = tuple(data["buckets"])
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"data.buckets must be positive token lengths, got {buckets}")
        return cls(kind=kind, train=str(data["train"]), format=fmt, columns=dict(data["columns"] or {}),
                   streaming=_flag(data.get("streaming", False), "data.streaming"),
                   index_dir=_optional(data.get("index_dir"), str, "data.index_dir"),
                   score_range=score_range, tfds_name=tfds_name, tfds_split=str(data["tfds_split"]),
                   tfds_data_dir=_optional(data["tfds_data_dir"], str, "data.tfds_data_dir"),
                   skip_bad=bool(data["skip_bad"]), buckets=buckets, split=str(data.get("split", cls.split)),
                   min_grade=_integer(data.get("min_grade", 1), "data.min_grade", minimum=1), positives=positives,
                   hard_negatives=hard_negatives, num_negatives=num_negatives, prompts=prompts, task=task,
                   pack_length=_integer(data["pack_length"], "data.pack_length", minimum=0),
                   pack_rows_multiple=_integer(data["pack_rows_multiple"], "data.pack_rows_multiple", minimum=1),
                   in_batch_negatives=_integer(data.get("in_batch_negatives", 0), "data.in_batch_negatives",
                                               minimum=0),
                   csts_records=_choice(data.get("csts_records", "conditioned"), CSTS_RECORDS, "data.csts_records"),
                   split_sentences=bool(data.get("split_sentences", False)), noise=noise,
                   noise_ratio=float(noise_ratio))


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One training source: its data, its objective section (parsed into an ``Objective`` once the
    run's pooling and teacher are known) and its weight in a mixture."""

    name: str
    data: DataConfig
    objective: Mapping[str, Any]
    weight: float = 1.0

    @property
    def teacher(self) -> str | None:
        """The frozen model this source reads: its distillation teacher (with a weight > 0) and/or
        its guide, one model (None: neither)."""
        distill = self.objective["distill"]
        names = {distill["teacher"] if distill["teacher"] and float(distill["weight"]) > 0 else None,
                 self.objective.get("guide")} - {None}
        if len(names) > 1:
            raise ValueError(f"one frozen model per run: objective.distill.teacher and objective.guide name "
                             f"{sorted(names)}")
        return next(iter(names), None)


def source_sections(data: Mapping[str, Any], objective: Mapping[str, Any]) -> dict[str, tuple[dict, dict, float]]:
    """``name -> (data section, objective section, weight)``: ``{"train": data}`` alone, or each
    ``data.mixture`` entry over ``data`` / ``objective`` (an entry overrides data keys at its top
    level and objective keys under ``"objective"``; unknown keys are refused)."""
    base_data = {k: v for k, v in as_dict(data).items() if k not in MIXTURE_KEYS}
    base_objective = as_dict(objective)
    mixture = as_dict(data["mixture"] or {})
    if not mixture:
        return {"train": (base_data, base_objective, 1.0)}
    _choice(data["mixture_mode"], MIXTURE_MODES, "data.mixture_mode")
    out = {}
    for name, entry in mixture.items():
        entry = dict(entry)
        weight = float(entry.pop("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data.mixture.{name}.weight must be > 0, got {weight}")
        overrides = dict(entry.pop("objective", {}) or {})
        unknown = sorted(set(entry) - set(base_data))
        if unknown:
            raise ValueError(f"data.mixture.{name}: unknown keys {unknown}; an entry takes 'weight', 'objective' "
                             f"and data keys {sorted(base_data)}")
        bad = sorted(set(overrides) - set(base_objective))
        if bad:
            raise ValueError(f"data.mixture.{name}.objective: unknown keys {bad}; objective keys are "
                             f"{sorted(base_objective)}")
        merged = {**base_objective, **overrides}
        if "distill" in overrides:  # a partial distill section keeps the other defaults
            merged["distill"] = {**base_objective["distill"], **dict(overrides["distill"])}
        out[name] = ({**base_data, **entry}, merged, weight)
    return out


def parse_sources(data: Mapping[str, Any], objective: Mapping[str, Any], *, num_labels: int | None = None,
                  splade: Mapping[str, Any] | None = None, colbert: bool = False,
                  multi_head: bool = False) -> dict[str, SourceConfig]:
    """Every training source of a config, parsed: the one of ``data`` / ``objective``, or each
    ``data.mixture`` entry over them (``source_sections``); an entry's errors name it. ``num_labels``: a
    cross-encoder run's head width (its objectives are checked as cross-encoder losses); ``splade``:
    a SPLADE run's section (its objectives are checked as SPLADE losses); ``colbert``: a ColBERT run
    (its objectives are checked as ColBERT losses); ``multi_head``: a three-head (m3) run."""
    sections = source_sections(data, objective)
    if not data["mixture"]:
        return {"train": _source("train", data, objective, 1.0, num_labels, splade, colbert, multi_head)}
    out = {}
    for name, (entry_data, entry_objective, weight) in sections.items():
        try:
            out[name] = _source(name, entry_data, entry_objective, weight, num_labels, splade, colbert, multi_head)
        except ValueError as err:
            raise ValueError(f"data.mixture.{name}: {err}") from None
    return out


def _source(name: str, data: Mapping[str, Any], objective: Mapping[str, Any], weight: float,
            num_labels: int | None = None, splade: Mapping[str, Any] | None = None,
            colbert: bool = False, multi_head: bool = False) -> SourceConfig:
    if multi_head:
        from embedjax.train.m3_objective import M3Objective

        M3Objective.check_section(objective)
    elif colbert:
        from embedjax.train.colbert_objective import ColbertObjective

        ColbertObjective.check_section(objective)
    elif splade is not None:
        from embedjax.train.sparse_objective import SparseObjective

        SparseObjective.from_config(objective, splade)
    elif num_labels is None:
        from embedjax.train.objective import Objective

        Objective.check_section(objective)
    else:
        from embedjax.cross_encoder import HeadSpec
        from embedjax.train.cross_objective import CrossObjective

        CrossObjective.from_config(objective, HeadSpec("first_token", num_labels))
    return SourceConfig(name, DataConfig.from_config(data), as_dict(objective), weight)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW, its schedule, clipping, accumulation and the EMA (``embedjax.train.optim``)."""

    learning_rate: float
    warmup: float
    decay: str
    weight_decay: float
    clip_norm: float
    accumulate: int
    b1: float
    b2: float
    eps: float
    ema: float = 0.0
    ema_select: str = "best"

    @classmethod
    def from_config(cls, optim) -> OptimConfig:
        """From the ``optim`` section (every optimizer key required: a missing one is a KeyError;
        the EMA keys, which the optimizer itself does not read, default to off)."""
        accumulate = optim["accumulate"]
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"optim.accumulate must be >= 1 (1 = no accumulation), got {accumulate!r}")
        return cls(learning_rate=_number(optim["learning_rate"], "optim.learning_rate", lo=0.0),
                   warmup=_number(optim["warmup"], "optim.warmup", lo=0.0),
                   decay=_choice(optim["decay"], DECAYS, "optim.decay"),
                   weight_decay=_number(optim["weight_decay"], "optim.weight_decay", lo=0.0),
                   clip_norm=_number(optim["clip_norm"], "optim.clip_norm", lo=0.0), accumulate=accumulate,
                   b1=_number(optim["b1"], "optim.b1", lo=0.0, hi=1.0, hi_open=True),
                   b2=_number(optim["b2"], "optim.b2", lo=0.0, hi=1.0, hi_open=True),
                   eps=_number(optim["eps"], "optim.eps", lo=0.0),
                   ema=_number(optim.get("ema", cls.ema), "optim.ema", lo=0.0, hi=1.0, hi_open=True),
                   ema_select=_choice(optim.get("ema_select", cls.ema_select), EMA_SELECT, "optim.ema_select"))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How often the state is saved and how many checkpoints are kept."""

    every: int = 50
    keep: int = 2
    keep_best: int = 1
    asynchronous: bool = True  # False: a save is on disk before the next step runs

    @classmethod
    def from_config(cls, checkpoint) -> CheckpointConfig:
        return cls(every=_integer(checkpoint["every"], "checkpoint.every", minimum=1),
                   keep=_integer(checkpoint["keep"], "checkpoint.keep", minimum=1),
                   keep_best=_integer(checkpoint["keep_best"], "checkpoint.keep_best", minimum=1),
                   asynchronous=bool(checkpoint.get("asynchronous", True)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training config, parsed and checked (``from_config``); ``raw`` is the config as
    plain JSON-able dicts, what a workdir's ``train_config.json`` and every checkpoint store."""

    model: ModelConfig
    lora: LoraConfig
    sources: dict                 # name -> SourceConfig: {"train": ...}, or one per mixture entry
    mixture_mode: str | None      # None: one source
    optim: OptimConfig
    seed: int
    batch_size: int
    num_epochs: float
    num_steps: int | None         # None: num_epochs epochs
    mesh: dict
    sharding_rules: str
    memory_limit_gib: float | None  # None: the device's own limit
    log_every: int
    eval_every: int
    eval_batch_size: int
    eval_start: bool              # evaluate (and offer as "best") the start
    eval_export: bool             # evaluate the exported files again; False: "after" = the best step's figures
    evals: dict
    select_metric: str
    checkpoint: CheckpointConfig
    raw: dict

    @classmethod
    def from_config(cls, config) -> TrainConfig:
        """Every section of ``config`` (an ``ml_collections.ConfigDict`` or nested mapping with the
        keys of configs/base.py) parsed and checked; a ValueError names the key and what it takes."""
        model = ModelConfig.from_config(config)
        sources = parse_sources(config.data, config.objective,
                                num_labels=model.num_labels if model.cross_encoder else None, splade=model.splade,
                                colbert=model.late, multi_head=model.multi_head)
        teachers = {s.teacher for s in sources.values()} - {None}
        if len(teachers) > 1:
            raise ValueError(f"one frozen model (distillation teacher / guide) per run; the sources name "
                             f"{sorted(teachers)}")
        num_steps = _optional(config.num_steps, int, "num_steps")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, or None to train num_epochs epochs, got {num_steps}")
        memory = _optional(config.memory_limit_gib, float, "memory_limit_gib")
        if memory is not None and memory <= 0:
            raise ValueError(f"memory_limit_gib must be > 0, or None for the device's own limit, got {memory}")
        mesh = {"data": _integer(config.mesh.data, "mesh.data", minimum=-1),
                "fsdp": _integer(config.mesh.fsdp, "mesh.fsdp", minimum=1),
                "model": _integer(config.mesh.model, "mesh.model", minimum=1)}
        if not config.select_metric:
            raise ValueError("select_metric must name a metric the evaluators report, e.g. dev/cosine_spearman")
        from embedjax.train.selection import parse_select_metric

        parse_select_metric(str(config.select_metric))  # its form, before any model loads
        return cls(model=model, lora=LoraConfig.from_config(config.lora), sources=sources,
                   mixture_mode=config.data.mixture_mode if config.data.mixture else None,
                   optim=OptimConfig.from_config(config.optim), seed=_integer(config.seed, "seed", minimum=0),
                   batch_size=_integer(config.batch_size, "batch_size", minimum=1),
                   num_epochs=_number(config.num_epochs, "num_epochs", lo=0.0), num_steps=num_steps,
                   mesh=mesh, sharding_rules=_choice(config.sharding_rules, SHARDING_RULES, "sharding_rules"),
                   memory_limit_gib=memory, log_every=_integer(config.log_every, "log_every", minimum=1),
                   eval_every=_integer(config.eval_every, "eval_every", minimum=1),
                   eval_batch_size=_integer(config.eval_batch_size, "eval_batch_size", minimum=1),
                   eval_start=_flag(config.get("eval_start", True), "eval_start"),
                   eval_export=_flag(config.get("eval_export", True), "eval_export"),
                   evals=as_dict(config.evals), select_metric=str(config.select_metric),
                   checkpoint=CheckpointConfig.from_config(config.checkpoint), raw=as_dict(config))

    @property
    def teacher(self) -> str | None:
        """The distillation teacher the sources name (one per run), or None."""
        return next((s.teacher for s in self.sources.values() if s.teacher), None)


# ---------------------------------------------------------------------------- --config.KEY checks


def config_paths(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Every dotted path of a nested dict, sections included: ``{"optim": {...}, "optim.eps": 1e-6, ...}``."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out[path] = value
        if isinstance(value, Mapping):
            out.update(config_paths(value, path + "."))
    return out


def override_keys_from_argv(argv: Sequence[str]) -> list[str]:
    """The dotted keys of ``--config.KEY=value`` / ``--config.KEY value`` / ``--noconfig.KEY``
    arguments, in order (up to a bare ``--``)."""
    keys = []
    for arg in argv:
        if arg == "--":
            break
        m = re.match(r"^--?(?:no)?config\.([^=\s]+)", arg)
        if m:
            keys.append(m.group(1))
    return keys


def _suggest(key: str, candidates: Iterable[str]) -> list[str]:
    """Up to 3 close matches, best first: by the whole dotted path or by its last part
    (``learning_rate`` -> ``optim.learning_rate``); only those nearly as close as the best."""
    ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()  # noqa: E731
    last = key.rsplit(".", 1)[-1]
    scored = sorted(((max(ratio(key, c), ratio(last, c.rsplit(".", 1)[-1]) - 0.05), c) for c in set(candidates)),
                    key=lambda sc: (-sc[0], sc[1]))
    if not scored or scored[0][0] < 0.6:
        return []
    return [c for score, c in scored if score >= max(0.6, scored[0][0] - 0.08)][:3]


def _or_list(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def check_override_keys(config: Any, keys: Iterable[str]) -> None:
    """Raises ValueError (one line) for the first ``--config.KEY`` that is not a key of ``config``:

        --config.optim.learning_rat: no such key; did you mean optim.learning_rate?

    Sections (``--config.optim="{...}"``) are keys too. Below a free-form dict
    (``OPEN_SECTIONS``) a key must already be in this config's dict: the message says to set
    the whole dict instead.
    """
    paths = config_paths(as_dict(config))
    for key in keys:
        if key in paths:
            continue
        section = next((s for s in OPEN_SECTIONS if key.startswith(s + ".")), None)
        if section is not None and section in paths:
            have = sorted(paths[section]) if isinstance(paths[section], Mapping) else []
            close = _suggest(key, [f"{section}.{k}" for k in have])
            hint = f"did you mean {_or_list(close)}? or " if close else ""
            raise ValueError(
                f"--config.{key}: {section} has no key {key[len(section) + 1:]!r} in this config (it has {have}); {hint}"
                f"set the whole dict instead, e.g. --config.{section}=\"{{'name': value, ...}}\"")
        close = _suggest(key, paths)
        hint = f"did you mean {_or_list(close)}?" if close else "see configs/base.py for the declared keys"
        raise ValueError(f"--config.{key}: no such key; {hint}")
