"""TSDAE as a training objective (``objective.loss = "tsdae"``, arXiv:2104.06979): a bi-encoder run
whose loss is the reconstruction of each text by a decoder that sees only the embedding of its
damaged copy (sentence-transformers' ``DenoisingAutoEncoderLoss`` with ``tie_encoder_decoder=True``).

* Data: single texts damaged on the host (``data.noise = "delete"``, ``embedjax.data.noise``): side a
  of a batch is the damaged copy the encoder embeds, side b the original whose token ids the decoder
  reads (shifted right) and predicts; padded batches (``data.pack_length = 0``).
* Params: the decoder's own weights (``embedjax.tsdae.init_decoder``: cross-attention and the LM
  head's transform and bias) live beside the encoder's as ``params["tsdae_decoder"]`` from step 0:
  they train, shard (replicated), checkpoint and resume with the rest; the decoder's other weights
  ARE the encoder's (tied). ``without_decoder`` drops them before evaluation and export, so the
  exported model is the plain bi-encoder.
* The embedding the decoder reads is the run's pooled (and Dense-projected) embedding, normalised as
  the exported model normalises (``loss_kwargs.normalize``, default True: all-MiniLM-L6-v2's pipeline
  ends in a Normalize module, and every embedjax export does).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax

from embedjax import tsdae
from embedjax.data.batch import Batch
from embedjax.embed import embed

DECODER = "tsdae_decoder"  # params[DECODER]: the decoder's own weights
LOSS_KWARGS = frozenset({"normalize"})


def uses_tsdae(sources: Mapping) -> bool:
    """Whether any of a run's sources (``TrainConfig.sources``) trains with TSDAE."""
    return any(spec.objective["loss"] == "tsdae" for spec in sources.values())


def add_decoder(encoder, *, seed: int = 0):
    """``encoder`` with a fresh TSDAE decoder in its params (``params["tsdae_decoder"]``), seeded by
    ``seed``. The decoder is BERT's (``BertLMHeadModel``), tied to the encoder: BERT-family backbones only."""
    from embedjax.encoders import bert

    if not isinstance(encoder.cfg, bert.BertConfig):
        raise ValueError(f"objective.loss='tsdae' ties a BERT decoder (BertLMHeadModel) to the encoder; "
                         f"{encoder.cfg.model_type!r} is not a BERT-family backbone")
    if DECODER in encoder.params:
        return encoder
    decoder = tsdae.init_decoder(encoder.params, encoder.cfg, jax.random.key(seed + 2))
    return dataclasses.replace(encoder, params={**encoder.params, DECODER: decoder})


def without_decoder(params):
    """The params without the TSDAE decoder: the bi-encoder that is evaluated and exported."""
    return {k: v for k, v in params.items() if k != DECODER} if isinstance(params, Mapping) else params


def check_options(fields: Mapping) -> None:
    """A TSDAE objective's section (``Objective.check_section``'s fields): its loss options, and no
    wrapper of embedding losses (Matryoshka, layers, GradCache, auxiliary losses, distillation, guide)."""
    from embedjax.train.objective import dense_only_options

    changed = dense_only_options(fields)
    if changed:
        raise ValueError(f"objective {changed} wrap losses of embeddings; objective.loss='tsdae' reconstructs tokens "
                         "and reads objective.{loss_kwargs.normalize, remat, unroll, dropout}")
    unknown = sorted(set(dict(fields["loss_kwargs"])) - LOSS_KWARGS)
    if unknown:
        raise ValueError(f"unknown objective.loss_kwargs {unknown} for tsdae; it takes {sorted(LOSS_KWARGS)}")


def tsdae_batch_loss(params, enc_cfg, objective, batch: Batch, key):
    """The mean reconstruction cross-entropy of a batch: side b's tokens (every non-pad label of the
    batch counts once) from the embeddings of side a (``objective``: an ``Objective`` with loss "tsdae";
    its pooling, Dense head, dropout, remat and unroll)."""
    if batch.packed is not None or batch.b is None:
        raise ValueError("objective.loss='tsdae' reads padded (damaged, original) batches: set data.pack_length=0 "
                         "and data.noise='delete'")
    if DECODER not in params:
        raise ValueError(f"objective.loss='tsdae' needs the decoder's params (params[{DECODER!r}]: "
                         "embedjax.train.tsdae_objective.add_decoder)")
    k_enc, k_dec = jax.random.split(key)
    use_dropout = objective.dropout
    encoder_params = without_decoder(params)
    z = embed(encoder_params, enc_cfg, batch.a.ids, batch.a.mask, token_type_ids=batch.a.types, pool_mask=batch.a.pool,
              pooling=objective.pooling, dense=objective.dense,
              normalize=bool(dict(objective.loss_kwargs).get("normalize", True)),
              dropout_key=k_enc if use_dropout else None, remat=objective.remat, unroll=objective.unroll)
    return tsdae.reconstruction_loss(encoder_params, params[DECODER], enc_cfg, z, batch.b.ids,
                                     dropout_key=k_dec if use_dropout else None)


__all__ = ["DECODER", "add_decoder", "check_options", "tsdae_batch_loss", "uses_tsdae", "without_decoder"]
