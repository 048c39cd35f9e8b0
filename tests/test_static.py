"""Static embeddings (embedjax/static.py, embedjax/encoders/static.py) against model2vec and
sentence-transformers: the distilled table equals ``model2vec.distill``'s on a tiny random BERT
(MiniLM's WordPiece tokenizer) and on a tiny random Qwen3 (a byte-level BPE); encoding equals
``StaticModel.encode`` (special tokens, the unknown token, truncation, the character cut,
normalisation) and ``SentenceTransformer`` with a ``StaticEmbedding`` module; our export loads in
both and scores the same; sentence-transformers' own StaticEmbedding layout loads here; the mean's
gradient w.r.t. the table against its closed form and finite differences; a smoke run of the
training loop on a distilled table; the script; bad input."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

import embedjax
from embedjax import hf, sharding, static

pytestmark = pytest.mark.fast_compile

REPO = Path(__file__).resolve().parents[1]
DIM = 16
# Plain texts (no unknown token, short): every implementation agrees on them.
PLAIN = ["A man is playing a flute.", "Someone plays music in the park!", "", "UPPER case, punctuation: naive cafe",
         "the cat " * 400]  # 800 tokens: cut to 512 everywhere
# model2vec's own rules: a snowman and an emoji are [UNK] (dropped), and a long text of long words is cut
# to max_length x the median token length in characters before tokenizing (fewer than 512 tokens remain).
MODEL2VEC_ONLY = ["a snowman \u2603 and \U0001F600 here", "internationalization " * 200]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """model2vec's distillation runs thousands of tiny forward passes: one thread is ~10x faster than two
    on a shared 2-core machine (the threads wait on each other). Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sign_aligned(ours, theirs):
    """``ours`` with each column's sign flipped to agree with ``theirs`` (a PCA component's sign is a convention)."""
    signs = np.sign(np.sum(ours * theirs, axis=0))
    return ours * np.where(signs == 0, 1, signs)


@pytest.fixture(scope="module")
def teacher(tiny_model):
    return embedjax.load_pretrained(tiny_model)


@pytest.fixture(scope="module")
def distilled(teacher):
    return static.distill(teacher, dim=DIM)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from model2vec.distill import distill

    return distill(str(tiny_model), pca_dims=DIM, quantize_to="float32", device="cpu")


@pytest.fixture(scope="module")
def exported(distilled, tmp_path_factory):
    return embedjax.save_pretrained(distilled, tmp_path_factory.mktemp("static") / "model")


def _tokens(encoder) -> list[str]:
    return [t for t, _ in sorted(encoder.tokenizer.backend.get_vocab().items(), key=lambda item: item[1])]


def test_distilled_table_equals_model2vec(distilled, reference, teacher, tiny_model):
    from model2vec.distill import distill

    assert _tokens(distilled) == list(reference.tokens)  # [MASK] / [CLS] / [SEP] / [unused*] gone, ids renumbered
    ours, theirs = np.asarray(distilled.params["embeddings"]), np.asarray(reference.embedding)
    assert ours.shape == theirs.shape == (len(reference.tokens), DIM)
    np.testing.assert_allclose(_sign_aligned(ours, theirs), theirs, atol=1e-4)  # their PCA is float32
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # and the same sign convention
    # without PCA and weighting: each token's vector through the transformer, to float32 round-off
    plain = static.distill(teacher, dim=None, sif_coefficient=None)
    want = distill(str(tiny_model), pca_dims=None, sif_coefficient=None, quantize_to="float32", device="cpu")
    np.testing.assert_allclose(np.asarray(plain.params["embeddings"]), want.embedding, atol=2e-6)


def test_distilled_table_equals_model2vec_on_a_byte_level_bpe_decoder(tmp_path):
    from model2vec.distill import distill

    from embedjax import tiny

    corpus = ["The quick brown fox jumps over the lazy dog.", "A man is playing a flute.",
              "Someone plays music in the park.", "Two dogs run on the beach."] * 4
    path = tiny.write_random_checkpoint(tmp_path / "qwen3", "qwen3", texts=corpus, vocab_size=300)
    ours = static.distill(embedjax.load_pretrained(path), dim=8)
    theirs = distill(str(path), pca_dims=8, quantize_to="float32", device="cpu")
    assert _tokens(ours) == list(theirs.tokens)
    np.testing.assert_allclose(np.asarray(ours.params["embeddings"]), theirs.embedding, atol=1e-5)
    texts = ["The dog plays in the park.", "music", ""]  # model2vec adds a prefix space to byte-level BPE: so do we
    np.testing.assert_allclose(ours.encode(texts), theirs.encode(texts), atol=1e-5)


def test_encode_equals_model2vec_and_sentence_transformers(distilled, reference, exported):
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer

    texts = PLAIN + MODEL2VEC_ONLY
    ours = distilled.encode(texts)
    np.testing.assert_allclose(ours, reference.encode(texts), atol=1e-4)  # model2vec's own distillation
    saved = StaticModel.from_pretrained(exported)
    np.testing.assert_allclose(ours, saved.encode(texts), atol=1e-5)  # the same table
    np.testing.assert_allclose(np.linalg.norm(ours[[0, 1, 3]], axis=1), 1, atol=1e-6)
    assert not ours[2].any()  # no tokens: zeros, as model2vec
    st = SentenceTransformer(str(exported), device="cpu")
    np.testing.assert_allclose(ours[: len(PLAIN)], st.encode(PLAIN), atol=1e-5)
    # the functional form, on our tokenizer's ids, over every device
    batch = distilled.tokenizer(texts)
    z = jax.jit(static.static_embed)(distilled.params["embeddings"], batch.input_ids, batch.attention_mask)
    np.testing.assert_allclose(np.asarray(z), saved.encode(texts), atol=1e-5)
    np.testing.assert_allclose(distilled.encode(texts, mesh=sharding.local_mesh()), ours, atol=1e-6)


def test_export_loads_in_model2vec_and_sentence_transformers_and_scores_the_same(exported, distilled, small_dev):
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer

    from embedjax.data import read_stsb

    pairs = read_stsb(small_dev)
    a, b = [p.text_a for p in pairs], [p.text_b for p in pairs]
    gold = [p.score for p in pairs]
    reloaded = embedjax.load_pretrained(exported)
    assert (reloaded.pooling, reloaded.normalize, reloaded.dim) == ("mean", True, DIM)
    models = {"ours": reloaded.encode, "model2vec": StaticModel.from_pretrained(exported).encode,
              "sentence-transformers": SentenceTransformer(str(exported), device="cpu").encode}
    spearman = {}
    for name, encode in models.items():
        za, zb = encode(a), encode(b)
        spearman[name] = spearmanr(np.sum(za * zb, axis=1), gold).statistic
        np.testing.assert_allclose(za, distilled.encode(a), atol=1e-6)
    assert spearman["ours"] == pytest.approx(spearman["model2vec"], abs=1e-6)
    assert spearman["ours"] == pytest.approx(spearman["sentence-transformers"], abs=1e-6)
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "model2vec" and config["normalize"] is True


def test_sentence_transformers_static_embedding_layout_loads(exported, tmp_path):
    """A directory sentence-transformers writes for a StaticEmbedding model (no model2vec config): its
    tokenization keeps the unknown token in the mean, and so does ours when reading it."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(exported), device="cpu")
    SentenceTransformer(modules=[st[0]], device="cpu").save(str(tmp_path / "st"))
    assert not (tmp_path / "st" / "config.json").exists()
    ours = embedjax.load_pretrained(tmp_path / "st")
    texts = PLAIN + MODEL2VEC_ONLY
    want = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(texts)
    np.testing.assert_allclose(ours.encode(texts), want, atol=1e-5)
    assert not ours.normalize and ours.cfg.tokenize_as == "sentence_transformers"


def test_static_embed_gradient_against_closed_form_and_finite_differences():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(7, 3)).astype(np.float32)
    ids = np.array([[1, 4, 4, 0], [2, 6, 1, 5], [3, 3, 3, 3]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.int32)
    w = rng.normal(size=(3, 3)).astype(np.float32)
    grad = jax.grad(lambda t: jnp.sum(w * static.static_embed(t, ids, mask, normalize=False)))(table)
    want = np.zeros_like(table)  # d/dT[v] sum_b w_b . mean_b = sum_b w_b * (count of v in text b) / len_b
    for b in range(3):
        for t in range(4):
            if mask[b, t]:
                want[ids[b, t]] += w[b] / mask[b].sum()
    np.testing.assert_allclose(np.asarray(grad), want, atol=1e-6)

    def loss(t):  # normalised, in float64 numpy
        rows = t[ids] * mask[..., None]
        mean = rows.sum(1) / mask.sum(1, keepdims=True)
        return float(np.sum(w * mean / np.linalg.norm(mean, axis=1, keepdims=True)))

    grad = np.asarray(jax.grad(lambda t: jnp.sum(w * static.static_embed(t, ids, mask)))(table))
    eps, numeric = 1e-4, np.zeros_like(table, dtype=np.float64)
    for v, h in np.ndindex(*table.shape):
        step = np.zeros_like(table, dtype=np.float64)
        step[v, h] = eps
        numeric[v, h] = (loss(table + step) - loss(table - step)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-4)
    assert not grad[0].any() and grad[[1, 3, 4]].any()  # row 0 only under the mask (padding) gets nothing


def test_a_training_run_fine_tunes_the_table_and_exports_it(exported, small_dev, tmp_path):
    from model2vec import StaticModel
    from sentence_transformers import SentenceTransformer

    from embedjax.train.loop import train_and_evaluate

    sys.path.insert(0, str(REPO))
    from configs import stsb_angle

    c = stsb_angle.get_config("smoke")
    c.model, c.evals.dev.path, c.num_steps, c.batch_size = str(exported), str(small_dev), 4, 16
    c.eval_every, c.checkpoint.every, c.optim.learning_rate = 2, 2, 1e-2
    c.sharding_rules = "fsdp"  # the table's width over the 8 devices
    c.mesh.data, c.mesh.fsdp = 1, 8
    summary = train_and_evaluate(c, tmp_path / "run")
    assert summary["steps"] == 4
    start = embedjax.load_pretrained(exported).params["embeddings"]
    trained = embedjax.load_pretrained(tmp_path / "run")
    assert np.abs(np.asarray(trained.params["embeddings"]) - np.asarray(start)).max() > 1e-3
    texts = PLAIN[:4]
    np.testing.assert_allclose(StaticModel.from_pretrained(tmp_path / "run").encode(texts), trained.encode(texts),
                               atol=1e-6)
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "run"), device="cpu").encode(texts),
                               trained.encode(texts), atol=1e-6)


def test_the_script_distils_a_trimmed_table(tiny_model, tmp_path, capsys):
    from model2vec import StaticModel

    sys.path.insert(0, str(REPO / "scripts"))
    import distill_static

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A man is playing a flute.\nThe cat sat on the mat.\n")
    out = distill_static.main(["--model", str(tiny_model), "--output", str(tmp_path / "out"), "--dim", "8",
                               "--trim-to", str(corpus)])
    model = StaticModel.from_pretrained(out)
    assert set(model.tokens) == {"[PAD]", "[UNK]", "a", "man", "is", "playing", "flute", ".", "the", "cat", "sat",
                                 "on", "mat"}
    np.testing.assert_allclose(embedjax.load_pretrained(out).encode(["the cat is playing"]),
                               model.encode(["the cat is playing"]), atol=1e-6)
    with pytest.raises(SystemExit) as exit_info:
        from embedjax import cli

        cli.run(distill_static.main, ["--model", str(tiny_model), "--output", str(tmp_path / "bad"), "--dim", "64"])
    assert exit_info.value.code == 2 and "dim must be in 1..32" in capsys.readouterr().err


def test_bad_input(teacher, distilled, tmp_path):
    with pytest.raises(ValueError, match=r"dim must be in 1\.\.32"):
        static.distill(teacher, dim=33)
    with pytest.raises(ValueError, match="smaller than the vocabulary"):
        static.distill(teacher, dim=8, keep_tokens={"a", "the"})  # 4 tokens with [PAD] and [UNK]
    with pytest.raises(ValueError, match="sif_coefficient"):
        static.distill(teacher, dim=8, sif_coefficient=1.5)
    with pytest.raises(ValueError, match="not a regular expression"):
        static.distill(teacher, dim=8, token_remove_pattern="[")
    with pytest.raises(ValueError, match="vocabulary is empty"):
        static.distill(teacher, dim=8, token_remove_pattern=".*")
    with pytest.raises(ValueError, match="already a static table"):
        static.distill(distilled, dim=8)
    with pytest.raises(ValueError, match="num_layers"):
        distilled.encode(["a"], num_layers=1)
    path = embedjax.save_pretrained(distilled, tmp_path / "model")
    with pytest.raises(ValueError, match="pools by mean"):
        embedjax.save_pretrained(embedjax.load_pretrained(path, pooling="cls"), tmp_path / "cls")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "model2vec", "hidden_dim": DIM}))
    from safetensors.numpy import save_file

    save_file({"vectors": np.zeros((3, DIM), np.float32)}, str(tmp_path / "broken" / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match="no static table"):
        embedjax.load_pretrained(tmp_path / "broken")
