"""One backbone, three heads (BGE-M3, arXiv:2402.03216) as pure functions: a dense vector, a
lexical (sparse) vector and multi-vector (ColBERT) token vectors from one forward pass, and the
metrics that score each head, or their weighted ensemble, on one row per text.

The heads follow BGE-M3 (FlagEmbedding's ``BGEM3`` model):

* dense: the [CLS] state, L2-normalised; scored by the dot product;
* lexical: ``relu(sparse_linear(h_t))`` per token (a weight per position), the vocabulary vector
  taking each token id's largest weight, special tokens ([CLS], [SEP], [PAD], [UNK]) zeroed; scored
  by the sparse dot product (the shared terms' weight products);
* multi-vector: ``colbert_linear(h_t)`` for every token but [CLS], masked, L2-normalised; scored by
  MaxSim averaged over the query's tokens (``similarity.TokenMaxSim(query_mean=True)``).

``rows`` lays a text out as ``[dense (H) | lexical (V) | tokens (T * H)]``, so the heads' metrics
(``HeadSum``: each head's slice, or a weighted sum of them, BGE-M3's ``s_dense + 0.3 s_lex + s_mul``)
are metrics of the similarity core and every loss of ``embedjax.losses`` takes them
(``embedjax.losses.m3_loss`` trains the three heads with self-knowledge distillation).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax import similarity as sim
from embedjax.encoders import registry

ENSEMBLE_WEIGHTS = (1.0, 0.3, 1.0)  # dense, lexical, multi-vector: BGE-M3's s_inter


def init_heads(hidden_size: int, key=None) -> dict:
    """Fresh ``{"sparse": Linear(H, 1), "colbert": Linear(H, H)}`` heads, initialised as
    ``torch.nn.Linear`` (uniform in +-1/sqrt(H), weights and biases)."""
    key = jax.random.key(0) if key is None else key
    keys = jax.random.split(key, 4)
    bound = 1.0 / np.sqrt(hidden_size)
    uniform = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -bound, bound)  # noqa: E731
    return {"sparse": {"kernel": uniform(keys[0], (hidden_size, 1)), "bias": uniform(keys[1], (1,))},
            "colbert": {"kernel": uniform(keys[2], (hidden_size, hidden_size)), "bias": uniform(keys[3], (hidden_size,))}}


def lexical_weights(hidden, heads, input_ids, attention_mask, vocab_size: int, special_ids: Sequence[int]):
    """The lexical head: (B, T, H) states -> (B, V) vocabulary weights, each id's largest
    ``relu(h_t . w + b)`` over the text's positions, special ids and padding zeroed."""
    weights = jax.nn.relu(hidden @ heads["sparse"]["kernel"] + heads["sparse"]["bias"])[..., 0]  # (B, T)
    weights = jnp.where(attention_mask.astype(bool), weights, 0.0)
    b = input_ids.shape[0]
    lexical = jnp.zeros((b, vocab_size), weights.dtype).at[jnp.arange(b)[:, None], input_ids].max(weights)
    if len(special_ids):
        lexical = lexical.at[:, jnp.asarray(list(special_ids))].set(0.0)
    return lexical


def token_vectors(hidden, heads, attention_mask):
    """The multi-vector head: (B, T, H) states -> (B, T - 1, H) unit vectors of every token but
    [CLS], zero on padding."""
    vectors = hidden[:, 1:] @ heads["colbert"]["kernel"] + heads["colbert"]["bias"]
    vectors = vectors * attention_mask[:, 1:, None].astype(vectors.dtype)
    return sim.l2_normalize(vectors)


def outputs(params, cfg, heads, input_ids, attention_mask, *, special_ids: Sequence[int], token_type_ids=None,
            dropout_key=None, remat: bool | str = False, unroll: bool | int = True):
    """``(dense (B, H), lexical (B, V), tokens (B, T - 1, H))`` float32 of one forward pass."""
    hidden = registry.of(cfg).apply(params, cfg, input_ids, attention_mask, token_type_ids=token_type_ids,
                                    all_layers=False, dropout_key=dropout_key, remat=remat, unroll=unroll)
    hidden = hidden.astype(jnp.float32)
    vocab = params["embeddings"]["word"].shape[0]
    return (sim.l2_normalize(hidden[:, 0]), lexical_weights(hidden, heads, input_ids, attention_mask, vocab, special_ids),
            token_vectors(hidden, heads, attention_mask))


def rows(dense, lexical, tokens):
    """One row per text, ``[dense (H) | lexical (V) | tokens flattened (T * H)]``: what the heads'
    metrics (``metrics``) read."""
    return jnp.concatenate([dense, lexical, tokens.reshape(*tokens.shape[:-2], -1)], axis=-1)


@dataclasses.dataclass(frozen=True)
class HeadSum:
    """A metric of ``rows``: ``sum_i weight_i * metric_i(a[start_i:stop_i], b[start_i:stop_i])``
    over ``parts = ((metric, start, stop, weight), ...)`` (``stop`` None: to the row's end, the
    token slice, whose width differs between queries and documents). Hashable."""

    parts: tuple

    def _apply(self, fn, a, b):
        total = 0.0
        for metric, start, stop, weight in self.parts:
            total = total + weight * fn(a[..., start:stop], b[..., start:stop], metric)
        return total

    def matrix(self, a, b):
        return self._apply(sim.matrix, a, b)

    def pairwise(self, a, b):
        return self._apply(sim.pairwise, a, b)


def metrics(hidden_size: int, vocab_size: int, weights: Sequence[float] = ENSEMBLE_WEIGHTS) -> dict[str, HeadSum]:
    """``{"dense", "lexical", "multi_vector", "ensemble"}``: each head's metric of ``rows`` and their
    weighted sum (``weights``: dense, lexical, multi-vector)."""
    h, v = hidden_size, vocab_size
    parts = {"dense": ("dot", 0, h), "lexical": ("dot", h, h + v),
             "multi_vector": (sim.TokenMaxSim(h, query_mean=True), h + v, None)}
    out = {name: HeadSum(((*part, 1.0),)) for name, part in parts.items()}
    out["ensemble"] = HeadSum(tuple((*parts[name], float(w)) for name, w in zip(parts, weights)))
    return out


__all__ = ["ENSEMBLE_WEIGHTS", "HeadSum", "init_heads", "lexical_weights", "metrics", "outputs", "rows",
           "token_vectors"]
