"""The encoders of a run: the student it starts from (with LoRA adapters, split into what trains
and what stays frozen), its distillation teacher, and a workdir's trained encoder (its export
or, before the run finished, its best checkpoint).

A run has one pooling, length, attention mode and set of prompts (``ModelConfig``): training,
evaluation and export all use the encoder built here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax

from embedjax import lora, sharding
from embedjax.model import Encoder, load_pretrained
from embedjax.train.config import INITIAL_TEACHER, LoraConfig, ModelConfig, TrainConfig
from embedjax.train.workdir import CONFIG_FILE, legacy_config

log = logging.getLogger(__name__)


def load_model(model: ModelConfig, *, seed: int = 0) -> Encoder:
    """The run's starting encoder: the checkpoint with the run's pooling, length, attention, a
    fresh trainable pooler's or tri-encoder head's initialisation (seeded by ``seed``) and the run's
    prompts."""
    encoder = load_pretrained(model.path, pooling=model.pooling, max_length=model.max_length,
                              attention=model.attention, pooler_init=model.pooler_init or None,
                              tri_head=model.tri_head, seed=seed)
    if model.prompts:  # the run's instructions: trained, evaluated, exported
        encoder = dataclasses.replace(encoder, prompts=dict(model.prompts), include_prompt=model.include_prompt)
    return encoder


def training_cfg(encoder: Encoder, model: ModelConfig):
    """The encoder's static config as the train step runs it: the run's compute dtype and dropout
    rates (None: the checkpoint's own)."""
    cfg = encoder.cfg
    return dataclasses.replace(cfg, dtype=model.dtype,
                               hidden_dropout=cfg.hidden_dropout if model.hidden_dropout is None else model.hidden_dropout,
                               attention_dropout=(cfg.attention_dropout if model.attention_dropout is None
                                                  else model.attention_dropout))


def split_trainable(params, adapters_only: bool):
    """``(trainable, frozen)`` (``lora.partition``): with LoRA, the adapters, the pooler's own
    params (latent attention), a Dense head, a cross-encoder's head and a tri-encoder's head train and the base is
    frozen (and a SPLADE model's MLM head, a ColBERT model's projection, a TSDAE decoder's own weights); without, everything trains.
    An MNTP run's LM head (``params["lm_head"]``) is base model: frozen under LoRA (LLM2Vec trains
    only the adapters)."""
    if not adapters_only:
        return lora.partition(params, jax.tree.map(lambda _: True, params))
    # the pooler, the heads, a ColBERT projection, an inference-free SPLADE model's query weights
    own_params = ("pooler/", "head/", "tri_head/", "dense/", "mlm_head/", "projection/", "query_static", "m3_heads/",
                  "tsdae_decoder/")
    trains = lambda path, _: lora.is_adapter(path) or sharding.param_path(path).startswith(own_params)  # noqa: E731
    return lora.partition(params, jax.tree_util.tree_map_with_path(trains, params))


def add_objective_params(encoder: Encoder, sources, *, seed: int = 0) -> Encoder:
    """``encoder`` with the params only a token-level objective of the run's ``sources``
    (``TrainConfig.sources``) reads: a TSDAE decoder's own weights (``params["tsdae_decoder"]``,
    seeded by ``seed``), an MNTP run's untied LM head (``params["lm_head"]``). The run's
    checkpoints hold them; ``objective_params_dropped`` takes them out again."""
    from embedjax.train import mntp_objective, tsdae_objective

    if tsdae_objective.uses_tsdae(sources):  # its decoder's own weights train beside the encoder's
        encoder = tsdae_objective.add_decoder(encoder, seed=seed)
    if mntp_objective.uses_mntp(sources):  # an untied LM head, read after the backbone (frozen under LoRA)
        encoder = mntp_objective.add_lm_head(encoder)
    return encoder


def objective_params_dropped(params):
    """The params without what ``add_objective_params`` added: the encoder that is evaluated and exported."""
    from embedjax.train import mntp_objective, tsdae_objective

    return mntp_objective.without_lm_head(tsdae_objective.without_decoder(params))


def trainable_params(lora_config: LoraConfig, encoder: Encoder, *, seed: int = 0):
    """``(trainable, frozen, encoder)``: with LoRA (``rank`` > 0, or ``init_from`` a PEFT adapter
    directory to start from) adapters are attached (initialised from ``seed + 1``) and the
    encoder's cfg gets their spec; see ``split_trainable`` for what trains."""
    params, cfg = encoder.params, encoder.cfg
    if lora_config.init_from is not None:
        params, cfg = lora.load_peft(lora_config.init_from, params, cfg)
    elif lora_config.spec() is not None:
        params, cfg = lora.attach(params, cfg, lora_config.spec(), jax.random.key(seed + 1))
    trainable, frozen = split_trainable(params, cfg.lora is not None)
    return trainable, frozen, dataclasses.replace(encoder, params=params, cfg=cfg)


def load_cross_model(model: ModelConfig, *, seed: int = 0):
    """A cross-encoder run's starting model (``embedjax.cross_model.load_cross_encoder``): the
    checkpoint's head, or a fresh one of ``model.num_labels`` logits seeded by ``seed``."""
    from embedjax.cross_model import load_cross_encoder

    return load_cross_encoder(model.path, num_labels=model.num_labels, max_length=model.max_length,
                              template=model.pair_template, seed=seed)


def load_m3_model(model: ModelConfig, *, seed: int = 0):
    """A three-head run's starting model (``embedjax.m3_model.load_m3``): a BGE-M3 checkpoint's heads,
    or fresh ones from ``seed`` on any BERT-family backbone."""
    from embedjax.m3_model import load_m3

    return load_m3(model.path, max_length=model.max_length, seed=seed)


def load_colbert_model(model: ModelConfig, *, seed: int = 0):
    """A ColBERT run's starting model (``embedjax.colbert_model.load_colbert``): a PyLate checkpoint,
    or a fresh model on a plain backbone (its projection seeded by ``seed``), with the run's
    ``colbert`` section's lengths and width."""
    from embedjax.colbert_model import load_colbert

    return load_colbert(model.path, seed=seed, **(model.colbert or {}))


def load_sparse_model(model: ModelConfig, *, seed: int = 0):
    """A SPLADE run's starting model (``embedjax.sparse_model.load_sparse_encoder``) with the run's
    length, pooling and prompts: the checkpoint's MLM head, or a fresh one seeded by ``seed``."""
    from embedjax.sparse_model import load_sparse_encoder

    from embedjax.sparse_model import with_static_queries

    splade = model.splade or {}
    encoder = load_sparse_encoder(model.path, max_length=model.max_length, pooling=splade.get("pooling"),
                                  activation=splade.get("activation"), seed=seed,
                                  head_init=splade.get("head_init", "identity"))
    if encoder.inference_free and not splade.get("inference_free"):
        raise ValueError(f"{model.path} is an inference-free SPLADE model (static query weights): set "
                         "splade.inference_free=True to train it")
    if splade.get("inference_free") and not encoder.inference_free:
        encoder = with_static_queries(encoder)  # ones, as sentence-transformers' SparseStaticEmbedding starts
    if model.prompts:
        encoder = dataclasses.replace(encoder, prompts=dict(model.prompts))
    return encoder


def load_teacher(name: str | None, student: Encoder, model: ModelConfig, *, seed: int = 0) -> Encoder | None:
    """The distillation teacher ``name`` (``objective.distill.teacher``), or None. It reads the
    student's token ids, so it must tokenize exactly like the student.

    ``"initial"`` is the student's own starting model (``load_model(model)``), frozen: distilling
    towards it anchors the fine-tune to what the pretrained model knew (Learning without
    Forgetting, arXiv:1606.09282), which lets a higher learning rate help instead of overfit.
    """
    if name is None:
        return None
    if name == INITIAL_TEACHER:
        return load_model(model, seed=seed)
    teacher = load_pretrained(name, max_length=student.max_length)
    probe = ["A man is playing a guitar on stage.", "Zwei Hunde spielen im Schnee; 42 km/h!", "tokenizer check"]
    same = [e.ids for e in teacher.tokenizer.encode(probe)] == [e.ids for e in student.tokenizer.encode(probe)]
    if not same or teacher.lowercase != student.lowercase:
        raise ValueError(f"objective.distill.teacher={name!r} tokenizes differently from the student "
                         f"{model.path!r}: the teacher reads the student's token ids, so both need one tokenizer")
    return teacher


# ---------------------------------------------------------------------------- a workdir's encoder


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training workdir (it holds the run's ``train_config.json``)."""
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def run_encoder(workdir: str | os.PathLike):
    """``(config, encoder, trainable, frozen)``: the run's encoder before training, as the loop
    builds it from the workdir's ``train_config.json`` (``TrainConfig``), LoRA split included (and
    the params a token-level objective adds: the tree the run's checkpoints hold)."""
    raw = legacy_config(json.loads((Path(workdir) / CONFIG_FILE).read_text()))
    config = TrainConfig.from_config(_as_config(raw))
    encoder = add_objective_params(load_model(config.model, seed=config.seed), config.sources, seed=config.seed)
    trainable, frozen, encoder = trainable_params(config.lora, encoder, seed=config.seed)
    return config, encoder, trainable, frozen


def merged_encoder(encoder: Encoder, trained, frozen) -> Encoder:
    """``encoder`` with the trained params on the frozen ones (without a TSDAE decoder or an MNTP LM
    head), LoRA adapters merged into the weights, normalising like the run's export
    (``save_pretrained(normalize=True)``)."""
    params, cfg = objective_params_dropped(lora.combine(trained, frozen)), encoder.cfg
    if cfg.lora is not None:
        params, cfg = lora.merge(params, cfg)
    return dataclasses.replace(encoder, params=params, cfg=cfg, normalize=True)


@dataclasses.dataclass(frozen=True)
class BestCheckpoint:
    """An unfinished run's best checkpoint so far: its encoder, step and selection score."""

    encoder: Encoder
    step: int
    metric: str     # the run's select_metric
    value: float    # its score at that step

    def describe(self) -> str:
        return f"best checkpoint (step {self.step}, {self.metric} {self.value:.4g})"


def best_checkpoint_encoder(workdir: str | os.PathLike) -> BestCheckpoint:
    """An unfinished run's best checkpoint so far on the run's encoder (``merged_encoder``: LoRA
    merged, normalising like the export). Raises FileNotFoundError when it has saved no best step."""
    from embedjax.checkpoint import Checkpointer, abstract_like

    config, encoder, trainable, frozen = run_encoder(workdir)
    ckpt = Checkpointer(Path(workdir).absolute(), best_metric=config.select_metric)
    try:
        shardings = jax.tree.map(lambda x: x.sharding, trainable)
        params, metrics, step = ckpt.restore_best(abstract_like(trainable, shardings))
    finally:
        ckpt.close()
    return BestCheckpoint(merged_encoder(encoder, params, frozen), step, config.select_metric,
                          float(metrics.get(config.select_metric, float("nan"))))


def _as_config(raw: dict):
    import ml_collections

    return ml_collections.ConfigDict(raw)
