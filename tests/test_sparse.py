"""SPLADE's pure functions (embedjax/sparse.py) against naive NumPy loops written here, against
sentence-transformers' SpladePooling and FlopsLoss, and the MLM head against transformers'
BertForMaskedLM on a tiny random model; gradients checked numerically."""

import numpy as np
import pytest
import torch
from jax.test_util import check_grads
from sentence_transformers.sparse_encoder.losses import FlopsLoss
from sentence_transformers.sparse_encoder.modules import SpladePooling

from embedjax import sparse
from embedjax.encoders.statedict import CheckpointError

pytestmark = pytest.mark.fast_compile  # checks logic, not speed (conftest.py)


def _logits_and_mask(seed=0, b=4, t=6, v=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2
    mask = np.ones((b, t), np.int32)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    mask[3, :] = 0  # a row with no kept token
    return logits, mask


def naive_splade(logits, mask, pooling, activation):
    b, t, v = logits.shape
    out = np.zeros((b, v), np.float64)
    for i in range(b):
        for j in range(v):
            values = []
            for k in range(t):
                if mask[i, k]:
                    w = np.log1p(max(float(logits[i, k, j]), 0.0))
                    values.append(np.log1p(w) if activation == "log1p_relu" else w)
            if values:
                out[i, j] = max(values) if pooling == "max" else sum(values)
    return out


@pytest.mark.parametrize("pooling", sparse.POOLINGS)
@pytest.mark.parametrize("activation", sparse.ACTIVATIONS)
def test_splade_pool_equals_a_loop_and_sentence_transformers(pooling, activation):
    logits, mask = _logits_and_mask()
    got = np.asarray(sparse.splade_pool(logits, mask, pooling=pooling, activation=activation))
    np.testing.assert_allclose(got, naive_splade(logits, mask, pooling, activation), rtol=1e-6, atol=1e-6)
    assert (got[3] == 0).all() and (got >= 0).all()

    module = SpladePooling(pooling_strategy=pooling, activation_function=activation).eval()
    with torch.no_grad():
        theirs = module({"token_embeddings": torch.from_numpy(logits),
                         "attention_mask": torch.from_numpy(mask)})["sentence_embedding"].numpy()
    np.testing.assert_allclose(got, theirs, rtol=1e-6, atol=1e-6)


def test_splade_pool_refuses_unknown_modes():
    logits, mask = _logits_and_mask()
    with pytest.raises(ValueError, match="unknown SPLADE pooling 'mean'"):
        sparse.splade_pool(logits, mask, pooling="mean")
    with pytest.raises(ValueError, match="unknown SPLADE activation 'gelu'"):
        sparse.splade_pool(logits, mask, activation="gelu")


def test_splade_pool_gradients():
    # Logits away from 0 (ReLU's kink) and distinct per column (max's ties): finite differences hold.
    rng = np.random.default_rng(1)
    logits = ((rng.permutation(3 * 5 * 7).reshape(3, 5, 7) / 20.0) - 2.0 + 0.013).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int32)
    for pooling in sparse.POOLINGS:
        check_grads(lambda x: sparse.splade_pool(x, mask, pooling=pooling), (logits,),
                    order=1, modes=("rev",), atol=1e-2, rtol=1e-2, eps=1e-3)


def naive_flops(w, threshold=None):
    w = np.asarray(w, np.float64).copy()
    if threshold is not None:
        for i in range(w.shape[0]):
            if np.count_nonzero(w[i]) <= threshold:
                w[i] = 0.0
    total = 0.0
    for j in range(w.shape[1]):
        total += (sum(w[i, j] for i in range(w.shape[0])) / w.shape[0]) ** 2
    return total


@pytest.mark.parametrize("threshold", [None, 3])
def test_flops_equals_a_loop_and_sentence_transformers(threshold):
    logits, mask = _logits_and_mask(seed=2, b=5, t=4, v=9)
    weights = np.array(sparse.splade_pool(logits, np.ones_like(mask)))
    weights[0, :7] = 0.0  # 2 active terms: below the threshold
    got = float(sparse.flops(weights, threshold=threshold))
    assert got == pytest.approx(naive_flops(weights, threshold), rel=1e-6)
    theirs = FlopsLoss(model=None, threshold=threshold).compute_loss_from_embeddings(torch.from_numpy(weights))
    assert got == pytest.approx(float(theirs), rel=1e-6)
    if threshold is not None:
        assert got != pytest.approx(naive_flops(weights), rel=1e-3)  # the masked row mattered


def test_flops_gradient_is_twice_the_mean_over_the_batch():
    w = np.abs(np.random.default_rng(3).normal(size=(4, 6)))
    check_grads(sparse.flops, (w,), order=2, modes=("rev",))
    import jax

    grad = np.asarray(jax.grad(sparse.flops)(w))
    np.testing.assert_allclose(grad, np.broadcast_to(2 * w.mean(0) / w.shape[0], w.shape), rtol=1e-6)


def test_top_k_keeps_the_k_largest_of_each_row():
    w = np.abs(np.random.default_rng(4).normal(size=(3, 10))).astype(np.float32)
    w[1, 5:] = 0.0
    got = np.asarray(sparse.top_k(w, 3))
    for i in range(3):
        keep = np.argsort(-w[i], kind="stable")[:3]
        want = np.zeros(10, np.float32)
        want[keep] = w[i, keep]
        np.testing.assert_array_equal(got[i], want)
    assert (np.asarray(sparse.active_terms(got)) == 3).all()
    np.testing.assert_array_equal(np.asarray(sparse.top_k(w, 0)), w)
    np.testing.assert_array_equal(np.asarray(sparse.top_k(w, 10)), w)


@pytest.mark.parametrize("schedule", ["quadratic", "linear"])
def test_regulariser_weight_warms_up_to_its_maximum(schedule):
    power = 2 if schedule == "quadratic" else 1
    for step in range(0, 15):
        want = 5e-3 * (step / 10) ** power if step < 10 else 5e-3
        assert float(sparse.regulariser_weight(step, 5e-3, 10, schedule=schedule)) == pytest.approx(want, rel=1e-6)
    assert float(sparse.regulariser_weight(0, 5e-3, 0)) == pytest.approx(5e-3)
    with pytest.raises(ValueError, match="unknown warm-up schedule 'cosine'"):
        sparse.regulariser_weight(1, 1.0, 10, schedule="cosine")


def test_mlm_head_equals_bert_for_masked_lm():
    """The head over transformers' own last hidden states gives BertForMaskedLM's logits."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    model = BertForMaskedLM(cfg).eval()
    with torch.no_grad():  # a non-zero bias and LayerNorm, so that each term is exercised
        model.cls.predictions.bias.normal_()
        model.cls.predictions.transform.LayerNorm.weight.normal_()
        model.cls.predictions.transform.LayerNorm.bias.normal_()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    t = model.cls.predictions.transform
    head = {"transform": {"kernel": t.dense.weight.detach().numpy().T, "bias": t.dense.bias.detach().numpy()},
            "norm": {"scale": t.LayerNorm.weight.detach().numpy(), "bias": t.LayerNorm.bias.detach().numpy()},
            "bias": model.cls.predictions.bias.detach().numpy()}
    words = model.bert.embeddings.word_embeddings.weight.detach().numpy()
    got = sparse.mlm_logits(head, words, out.hidden_states[-1].numpy(), act=cfg.hidden_act, eps=cfg.layer_norm_eps)
    np.testing.assert_allclose(np.asarray(got), out.logits.numpy(), rtol=1e-5, atol=1e-5)

    fresh = sparse.init_mlm_head(16, 50, __import__("jax").random.PRNGKey(0), kind="random")
    assert fresh["transform"]["kernel"].shape == (16, 16) and fresh["bias"].shape == (50,)
    assert float(np.abs(fresh["bias"]).max()) == 0.0 and float(np.std(fresh["transform"]["kernel"])) == pytest.approx(0.02, rel=0.2)


def test_identity_mlm_head_reads_normalised_states_against_the_word_embeddings():
    """The identity head: a token's logits are its LayerNorm-normalised final state dotted with each
    word embedding, less 4 (NumPy from first principles), so a state equal to a word's embedding
    activates that word most."""
    rng = np.random.default_rng(0)
    words = rng.normal(size=(50, 16)).astype(np.float32)
    hidden = rng.normal(size=(2, 3, 16)).astype(np.float32)
    hidden[0, 0] = words[7]
    head = sparse.init_mlm_head(16, 50, None)
    got = np.asarray(sparse.mlm_logits(head, words, hidden, act="gelu", eps=1e-12))
    centred = hidden - hidden.mean(-1, keepdims=True)
    normalised = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(got, normalised @ words.T - 4.0, rtol=1e-4, atol=1e-4)
    assert int(np.argmax(got[0, 0])) == 7
    with pytest.raises(ValueError, match="unknown MLM-head initialisation 'zeros'"):
        sparse.init_mlm_head(16, 50, None, kind="zeros")


def test_splade_embed_of_a_saved_bert_for_masked_lm_equals_sparse_encoder(tiny_masked_lm):
    """A tiny random BertForMaskedLM saved by transformers (MiniLM's tokenizer): its backbone and
    MLM head loaded from the files encode to sentence-transformers' SparseEncoder vectors (1e-5)."""
    import transformers
    from sentence_transformers import SparseEncoder

    from embedjax import hf, tokenize

    tmp_path = tiny_masked_lm
    model = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    texts = ["A man is playing a flute.", "Two dogs run on the beach in the evening sun.", "Hi"]
    theirs = SparseEncoder(str(tmp_path), device="cpu").encode(texts, convert_to_tensor=True).to_dense().numpy()

    params, cfg, _ = hf.load_checkpoint(tmp_path)
    head = sparse.mlm_head_from_state_dict(hf.load_state_dict(tmp_path), str(tmp_path))
    tok = tokenize.Tokenizer.from_directory(tmp_path, 128, 0)
    batch = tok(texts)
    got = np.asarray(sparse.splade_embed(params, cfg, head, batch.input_ids, batch.attention_mask,
                                         token_type_ids=batch.token_type_ids))[: len(texts)]
    assert 0 < (got > 0).sum(axis=1).min() < got.shape[1]  # sparse, not empty
    np.testing.assert_allclose(got, theirs, rtol=1e-5, atol=1e-5)
    pruned = np.asarray(sparse.splade_embed(params, cfg, head, batch.input_ids, batch.attention_mask,
                                            token_type_ids=batch.token_type_ids, k=5))[: len(texts)]
    assert (np.count_nonzero(pruned, axis=1) == 5).all()

    # the head's names round-trip; a partial head is refused, naming what is missing
    state = sparse.mlm_head_to_state_dict(head)
    np.testing.assert_array_equal(state["cls.predictions.transform.dense.weight"],
                                  model.cls.predictions.transform.dense.weight.detach().numpy())
    assert sparse.mlm_head_from_state_dict({"bert.embeddings.word_embeddings.weight": np.zeros(1)}) is None
    del state["cls.predictions.bias"]
    with pytest.raises(CheckpointError, match=r"incomplete MLM head .*cls\.predictions\.bias"):
        sparse.mlm_head_from_state_dict(state, "x")


def naive_splade_loss(q, d, n, wq, wd):
    q, d, n = (np.asarray(x, np.float64) for x in (q, d, n))
    cands = np.concatenate([d, n.reshape(-1, q.shape[1])])
    total = 0.0
    for i in range(len(q)):
        scores = [float(q[i] @ c) for c in cands]
        top = max(scores)
        total += top + np.log(sum(np.exp(s - top) for s in scores)) - scores[i]
    return total / len(q) + wq * naive_flops(q) + wd * naive_flops(cands)


def test_splade_loss_is_sparse_infonce_plus_weighted_flops():
    from embedjax.losses.splade import splade_loss

    rng = np.random.default_rng(5)
    q, d, n = (np.abs(rng.normal(size=s)).astype(np.float32) * 0.5 for s in ((4, 9), (4, 9), (4, 2, 9)))
    total, parts = splade_loss(q, d, n, query_weight=3e-2, document_weight=5e-2)
    assert float(total) == pytest.approx(naive_splade_loss(q, d, n, 3e-2, 5e-2), rel=1e-5)
    assert float(parts["query_flops"]) == pytest.approx(naive_flops(q), rel=1e-5)
    docs_only, parts = splade_loss(q, d, n, query_weight=None, document_weight=5e-2)
    assert "query_flops" not in parts
    assert float(docs_only) == pytest.approx(naive_splade_loss(q, d, n, 0.0, 5e-2), rel=1e-5)
    check_grads(lambda a, b, c: splade_loss(a, b, c, query_weight=3e-2, document_weight=5e-2)[0], (q, d, n),
                order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_static_query_side_equals_sparse_static_embedding_and_idf_a_loop():
    from sentence_transformers.sparse_encoder.modules import SparseStaticEmbedding

    rng = np.random.default_rng(6)
    vocab = 20
    ids = np.array([[3, 5, 5, 9, 0, 0], [7, 3, 3, 3, 2, 1], [4, 0, 0, 0, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], np.int64)
    weights = rng.uniform(0.1, 2.0, size=vocab).astype(np.float32)
    got = np.asarray(sparse.static_query_weights(weights, ids, mask))
    want = np.zeros((3, vocab), np.float32)
    for i in range(3):
        for t, m in zip(ids[i], mask[i]):
            if m:
                want[i, t] = weights[t]
    np.testing.assert_array_equal(got, want)

    class Tok:  # SparseStaticEmbedding only stores it (and reads its length limit)
        model_max_length = 16

        def get_vocab(self):
            return {str(i): i for i in range(vocab)}

    module = SparseStaticEmbedding(tokenizer=Tok(), weight=torch.from_numpy(weights))
    theirs = module({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    np.testing.assert_allclose(got, theirs["sentence_embedding"].detach().numpy(), rtol=1e-6)

    corpus = [[1, 2, 2, 3], [2, 4], [2], [5, 1]]
    n = len(corpus)
    for term in range(7):
        df = sum(term in doc for doc in corpus)
        assert sparse.idf(corpus, 7)[term] == pytest.approx(np.log(1 + (n - df + 0.5) / (df + 0.5)), rel=1e-6)


def test_tied_logits_gradients_equal_the_plain_matmul():
    """layers.tied_logits (a custom backward for the tied word matrix) against x @ E.T, for token
    states (B, T, H) and pooled ones (B, H): values and both gradients."""
    import jax
    import jax.numpy as jnp

    from embedjax.encoders import layers as L

    rng = np.random.default_rng(0)
    words = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(50,)), jnp.float32)
    for shape in ((3, 7, 16), (4, 16)):
        x = jnp.asarray(rng.normal(size=shape), jnp.float32)

        def loss(fn):
            return lambda x, w: jnp.sum(jnp.tanh(fn(x, w)) * weights)

        plain = lambda x, w: x @ w.T  # noqa: E731
        np.testing.assert_allclose(L.tied_logits(x, words), plain(x, words), rtol=1e-6, atol=1e-6)
        got = jax.grad(loss(L.tied_logits), argnums=(0, 1))(x, words)
        want = jax.grad(loss(plain), argnums=(0, 1))(x, words)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
