"""Losses as pure functions of embeddings (and labels); all jit-able and differentiable.

Every loss takes embeddings first, so the wrappers compose:
``matryoshka(infonce, dims)``, ``adaptive_layer(matryoshka(cosent, dims))``, ...
"""
from embedjax.losses.angle import (
    ANGLE_NLI_BERT,
    ANGLE_README_STSB,
    ANGLE_V03,
    ANGLE_V06,
    ANGLE_V06_TRIPLET,
    angle_loss,
    angle_triplet_loss,
    ibn_pair_weights,
    in_batch_pair_loss,
)
from embedjax.losses import rerank  # cross-encoder losses of logits (margin_mse, listwise_kl of groups)
from embedjax.losses.cosent import cosent, ranking_loss
from embedjax.losses.correlation import pearson_loss, rank_consistency_loss
from embedjax.losses.cosine import cosine_mse, quadruplet
from embedjax.losses.distill import (
    embedding_cosine,
    embedding_mse,
    listwise_kl,
    margin_mse,
    similarity_mse,
)
from embedjax.losses.infonce import infonce, simcse_supervised, simcse_unsupervised
from embedjax.losses.matryoshka import matryoshka, sample_dims
from embedjax.losses.m3 import m3_loss
from embedjax.losses.splade import splade_loss
from embedjax.losses.matryoshka2d import (
    adaptive_layer,
    espresso,
    kl_divergence,
    layer_weights,
    matryoshka_2d,
    pca_target,
    prefix_dims,
    sample_2dmse,
    sample_layers,
)

__all__ = [
    "ANGLE_NLI_BERT",
    "ANGLE_README_STSB",
    "ANGLE_V03",
    "ANGLE_V06",
    "ANGLE_V06_TRIPLET",
    "adaptive_layer",
    "angle_loss",
    "angle_triplet_loss",
    "cosent",
    "cosine_mse",
    "embedding_cosine",
    "embedding_mse",
    "espresso",
    "ibn_pair_weights",
    "in_batch_pair_loss",
    "infonce",
    "kl_divergence",
    "layer_weights",
    "listwise_kl",
    "margin_mse",
    "matryoshka",
    "matryoshka_2d",
    "pca_target",
    "pearson_loss",
    "prefix_dims",
    "rank_consistency_loss",
    "ranking_loss",
    "sample_2dmse",
    "sample_dims",
    "sample_layers",
    "simcse_supervised",
    "simcse_unsupervised",
    "similarity_mse",
    "m3_loss",
    "splade_loss",
]
