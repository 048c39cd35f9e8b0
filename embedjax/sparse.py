"""Learned sparse (SPLADE) representations as pure functions: the MLM head, SPLADE pooling over
the vocabulary, top-k pruning, the FLOPS regulariser with its warm-up, and the inference-free
query side (a term-weight lookup, IDF to start).

A SPLADE model (arXiv:2107.05720, SPLADE v2 arXiv:2109.10086) scores every vocabulary term for a
text: the backbone's token states go through the masked-language-model head to per-token logits
(B, T, V), and pooling over tokens keeps, per term j,

    w_j = max_i log(1 + ReLU(logit_ij))      (``pooling="max"``, SPLADE v2 and later)
    w_j = sum_i log(1 + ReLU(logit_ij))      (``pooling="sum"``, the first SPLADE)

over the tokens i the mask keeps. The head is BERT's ``BertForMaskedLM`` one
(``cls.predictions.*``): a dense layer, the backbone's activation and a layer norm, then the
word-embedding matrix (tied) and a bias. Its params are ``{"transform": {"kernel", "bias"},
"norm": {"scale", "bias"}, "bias"}``; the decoder kernel is ``params["embeddings"]["word"]``.

The FLOPS regulariser (arXiv:2004.05665) is sum_j (mean over the batch of w_j)^2, the
expected number of floating-point operations of a sparse dot product, made differentiable;
SPLADE weights it separately for queries and documents and warms the weights up
quadratically from 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.encoders import layers as L
from embedjax.encoders import registry
from embedjax.encoders.statedict import CheckpointError

POOLINGS = ("max", "sum")
ACTIVATIONS = ("relu", "log1p_relu")  # log1p_relu: a second log1p (OpenSearch's SPLADE models)


HEAD_INITS = ("identity", "random")
# The identity head's constants (a probe of all-MiniLM-L6-v2 on SciFact dev, benchmarks/README.md):
# the shift puts the transform's pre-activations in GELU's linear range (GELU(x) = x Phi(x), Phi(10) = 1),
# and the LayerNorm's centring removes it again; the logit bias leaves a few hundred terms per text.
IDENTITY_SHIFT = 10.0
IDENTITY_LOGIT_BIAS = -4.0


def init_mlm_head(hidden_size: int, vocab_size: int, key, *, kind: str = "identity") -> dict:
    """MLM-head params for a checkpoint that carries none (a plain ``BertModel``).

    ``kind="identity"``: the transform starts as the identity (kernel I, bias ``IDENTITY_SHIFT``,
    unit LayerNorm), so a token's logits are its normalised final state against the tied word
    embeddings, less ``IDENTITY_LOGIT_BIAS``: each token starts by activating itself and its
    neighbours in the embedding space, a lexical start that is sparse from the first step
    (all-MiniLM-L6-v2: SciFact dev nDCG@10 0.47 before training). ``kind="random"``: as
    transformers initialises ``BertOnlyMLMHead`` (normal(0, 0.02) kernel, zero biases): every
    vocabulary term starts active, and the FLOPS regulariser must prune some 30,000 terms per text.
    ``key`` seeds the random kernel (the identity head ignores it).
    """
    if kind not in HEAD_INITS:
        raise ValueError(f"unknown MLM-head initialisation {kind!r}; choose one of {HEAD_INITS}")
    norm = {"scale": jnp.ones((hidden_size,), jnp.float32), "bias": jnp.zeros((hidden_size,), jnp.float32)}
    if kind == "random":
        return {"transform": {"kernel": 0.02 * jax.random.normal(key, (hidden_size, hidden_size), jnp.float32),
                              "bias": jnp.zeros((hidden_size,), jnp.float32)},
                "norm": norm, "bias": jnp.zeros((vocab_size,), jnp.float32)}
    return {"transform": {"kernel": jnp.eye(hidden_size, dtype=jnp.float32),
                          "bias": jnp.full((hidden_size,), IDENTITY_SHIFT, jnp.float32)},
            "norm": norm, "bias": jnp.full((vocab_size,), IDENTITY_LOGIT_BIAS, jnp.float32)}


# BertForMaskedLM's names for the head (``cls.predictions.decoder.weight`` is the tied word matrix).
_HEAD_NAMES = {("transform", "kernel"): "cls.predictions.transform.dense.weight",
               ("transform", "bias"): "cls.predictions.transform.dense.bias",
               ("norm", "scale"): "cls.predictions.transform.LayerNorm.weight",
               ("norm", "bias"): "cls.predictions.transform.LayerNorm.bias",
               ("bias",): "cls.predictions.bias"}


def mlm_head_from_state_dict(state: dict[str, np.ndarray], where: str = "the checkpoint") -> dict | None:
    """The MLM head of a ``BertForMaskedLM`` state dict (``cls.predictions.*``, PyTorch names), or
    None when it carries none; ``CheckpointError`` naming the missing tensors when it carries part."""
    aliases = {"cls.predictions.bias": "cls.predictions.decoder.bias"}  # older checkpoints name the bias there
    found = {path: state.get(name, state.get(aliases.get(name, name))) for path, name in _HEAD_NAMES.items()}
    if all(v is None for v in found.values()):
        return None
    missing = [_HEAD_NAMES[p] for p, v in found.items() if v is None]
    if missing:
        raise CheckpointError(f"{where}: an incomplete MLM head (cls.predictions.*): missing {missing}")
    head: dict = {}
    for path, value in found.items():
        value = np.asarray(value, np.float32)
        node = head
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.T if path == ("transform", "kernel") else value
    return head


def mlm_head_to_state_dict(head: dict) -> dict[str, np.ndarray]:
    """``mlm_head_from_state_dict``'s inverse (the tied decoder weight is the backbone's to write)."""
    out = {}
    for path, name in _HEAD_NAMES.items():
        value = head
        for key in path:
            value = value[key]
        value = np.asarray(value, np.float32)
        out[name] = np.ascontiguousarray(value.T) if path == ("transform", "kernel") else value
    return out


def mlm_logits(head: dict, word_embeddings, hidden, *, act: str = "gelu", eps: float = 1e-12):
    """Per-token vocabulary logits (B, T, V) float32 from token states (B, T, H):
    ``LayerNorm(act(hidden @ W + b)) @ word_embeddings.T + bias``."""
    x = hidden.astype(jnp.float32) @ head["transform"]["kernel"] + head["transform"]["bias"]
    x = L.layer_norm(head["norm"], L.activation(act)(x), eps)
    return L.tied_logits(x, word_embeddings.astype(jnp.float32)) + head["bias"]


def splade_pool(logits, mask, *, pooling: str = "max", activation: str = "relu"):
    """SPLADE term weights (B, V) from MLM logits (B, T, V) and the (B, T) 0/1 mask.

    Masked tokens contribute 0 (every kept token's weight is >= 0, so 0 never wins a max it
    should not); a row with no kept token is all 0.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown SPLADE pooling {pooling!r}; choose one of {POOLINGS}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown SPLADE activation {activation!r}; choose one of {ACTIVATIONS}")
    w = jnp.log1p(jax.nn.relu(logits.astype(jnp.float32) * mask[..., None].astype(jnp.float32)))
    if activation == "log1p_relu":
        w = jnp.log1p(w)
    return w.max(axis=1) if pooling == "max" else w.sum(axis=1)


def splade_embed(params, cfg, head: dict, input_ids, attention_mask, *, token_type_ids=None,
                 pooling: str = "max", activation: str = "relu", k: int = 0, dropout_key=None,
                 remat: bool | str = False, unroll: bool | int = True):
    """Token ids (B, T) -> SPLADE term weights (B, V) float32: the backbone (``params``, any BERT-family
    ``cfg``), the MLM head tied to its word embeddings, SPLADE pooling, then ``top_k`` (``k`` > 0)."""
    hidden = registry.of(cfg).apply(params, cfg, input_ids, attention_mask, token_type_ids=token_type_ids,
                                    all_layers=False, dropout_key=dropout_key, remat=remat, unroll=unroll)
    logits = mlm_logits(head, params["embeddings"]["word"], hidden, act=cfg.hidden_act, eps=cfg.layer_norm_eps)
    return top_k(splade_pool(logits, attention_mask, pooling=pooling, activation=activation), k)


def top_k(weights, k: int):
    """Keeps each row's ``k`` largest weights and zeroes the rest (ties at the k-th value: the
    lower vocabulary ids win, as ``jax.lax.top_k``); ``k <= 0`` or ``k >= V`` keeps all."""
    if k <= 0 or k >= weights.shape[-1]:
        return weights
    _, idx = jax.lax.top_k(weights, k)
    keep = jnp.zeros(weights.shape, bool).at[jnp.arange(weights.shape[0])[:, None], idx].set(True)
    return jnp.where(keep, weights, 0.0)


def flops(weights, *, threshold: int | None = None):
    """The FLOPS regulariser: sum over terms of the squared batch-mean weight.

    ``threshold``: only rows with more than this many non-zero terms count (the others are
    zeroed, still dividing the mean by the whole batch), as sentence-transformers' ``FlopsLoss``
    (arXiv:2504.14839's l0 masking).
    """
    w = weights.astype(jnp.float32)
    if threshold is not None:
        active = jnp.sum(w != 0, axis=-1)
        w = w * (active > threshold)[:, None].astype(w.dtype)
    return jnp.sum(jnp.mean(w, axis=0) ** 2)


def regulariser_weight(step, max_weight: float, warmup_steps: int, *, schedule: str = "quadratic"):
    """The regulariser's weight at ``step``: ``max_weight * (step / warmup_steps) ** 2`` (or
    linear) before ``warmup_steps``, ``max_weight`` from then on (SPLADE's quadratic warm-up,
    as sentence-transformers' ``SpladeRegularizerWeightSchedulerCallback``). Traceable in ``step``."""
    if schedule not in ("quadratic", "linear"):
        raise ValueError(f"unknown warm-up schedule {schedule!r}; choose 'quadratic' or 'linear'")
    if warmup_steps <= 0:
        return jnp.asarray(max_weight, jnp.float32)
    ratio = jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)
    return max_weight * (ratio ** 2 if schedule == "quadratic" else ratio)


def static_query_weights(term_weights, input_ids, attention_mask):
    """The inference-free query side (SPLADE-doc, sentence-transformers' ``SparseStaticEmbedding``):
    no transformer, a query's vector is ``term_weights`` (V,) on the vocabulary ids it contains
    (each id once, however often it occurs) and 0 elsewhere; (B, V) float32 from (B, T) ids.
    ``term_weights`` may be trained (its gradient flows) or fixed, e.g. ``idf``."""
    b = input_ids.shape[0]
    present = jnp.zeros((b, term_weights.shape[-1]), jnp.float32).at[
        jnp.arange(b)[:, None], input_ids].max(attention_mask.astype(jnp.float32))
    return present * term_weights.astype(jnp.float32)


def idf(token_ids, vocab_size: int) -> np.ndarray:
    """BM25's inverse document frequency per vocabulary id, ``log(1 + (N - df + 0.5) / (df + 0.5))``,
    from a corpus's token-id lists (``df``: documents containing the id); a start for the static
    query weights."""
    df = np.zeros(vocab_size, np.float64)
    for ids in token_ids:
        df[np.unique(np.asarray(ids, np.int64))] += 1
    n = len(token_ids)
    return np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)


def active_terms(weights) -> jax.Array:
    """Non-zero terms per row (B,): the per-text cost a sparse index pays."""
    return jnp.sum(weights != 0, axis=-1)
