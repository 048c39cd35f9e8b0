"""A Dense (projection) head after pooling: loaded from and exported to sentence-transformers'
Dense module (their encodings equal, 1e-5), trained in the loop; PCA whitening as such a head
against the BERT-whitening formula; first-last-layer average pooling against transformers' hidden
states."""

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import embedjax
from embedjax import dense_head, whitening
from embedjax.encoders.statedict import CheckpointError
from embedjax.export import save_pretrained

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["A man is playing a guitar.", "Stocks fell sharply today", "", "a cat", "The weather is lovely in May."]


@pytest.fixture(scope="module")
def st_with_dense(tiny_model, tmp_path_factory):
    """tiny_model as a SentenceTransformer with a tanh Dense (32 -> 16, bias) before its Normalize."""
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    base = SentenceTransformer(str(tiny_model), device="cpu")
    dense = models.Dense(32, 16, bias=True, activation_function=torch.nn.Tanh())
    model = SentenceTransformer(modules=[base[0], base[1], dense, base[2]], device="cpu")
    path = tmp_path_factory.mktemp("st_dense")
    model.save(str(path))
    return path, model


def test_a_sentence_transformers_dense_module_loads_encodes_and_exports_the_same(st_with_dense, tmp_path):
    from sentence_transformers import SentenceTransformer

    path, st = st_with_dense
    encoder = embedjax.load_pretrained(path)
    assert encoder.dense == "tanh" and encoder.dim == 16
    want = st.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(encoder.encode(TEXTS), want, atol=1e-5)
    out = save_pretrained(encoder, tmp_path / "export")
    np.testing.assert_allclose(SentenceTransformer(str(out), device="cpu").encode(TEXTS), want, atol=1e-5)
    np.testing.assert_allclose(embedjax.load_pretrained(out).encode(TEXTS), want, atol=1e-5)

    bad = tmp_path / "two_dense"
    shutil.copytree(path, bad)
    modules = json.loads((bad / "modules.json").read_text())
    dense = next(m for m in modules if m["type"].endswith("Dense"))
    modules.insert(3, {**dense, "idx": 3, "name": "3b", "path": dense["path"]})
    (bad / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="one Dense after the pooling"):
        embedjax.load_pretrained(bad)
    config = json.loads((path / dense["path"] / "config.json").read_text())
    (bad / "modules.json").write_text(json.dumps([m for m in modules if m["name"] != "3b"]))
    (bad / dense["path"] / "config.json").write_text(json.dumps({**config, "activation_function": "my.Swish"}))
    with pytest.raises(CheckpointError, match="activation_function 'my.Swish'"):
        embedjax.load_pretrained(bad)


def test_whitening_matches_the_bert_whitening_formula_and_exports(tiny_model, stsb_dev_sentences, tmp_path):
    from sentence_transformers import SentenceTransformer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 3.0
    head = whitening.fit(x, dim=5)
    y = x @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(5), atol=1e-4)
    # Su et al.'s code: u, s, _ = svd(cov); W = u / sqrt(s); y = (x - mu) W[:, :k] (columns up to sign)
    mu = x.mean(0)
    u, s, _ = np.linalg.svd(np.cov((x - mu).T, bias=True))
    reference = (x - mu) @ (u / np.sqrt(s))[:, :5]
    np.testing.assert_allclose(np.abs(y), np.abs(reference), atol=1e-3)
    assert whitening.fit(x[:5])["kernel"].shape == (12, 4)  # 5 points span 4 directions
    with pytest.raises(ValueError, match="span 4 dimensions, fewer than dim=6"):
        whitening.fit(x[:5], dim=6)

    encoder = embedjax.load_pretrained(tiny_model)
    white = whitening.whiten(encoder, stsb_dev_sentences[:400], dim=16)
    assert white.dense == "identity" and white.dim == 16
    raw = white.encode(stsb_dev_sentences[:400], normalize=False)
    np.testing.assert_allclose(np.cov(raw.T, bias=True), np.eye(16), atol=2e-3)
    out = save_pretrained(white, tmp_path / "white")
    np.testing.assert_allclose(SentenceTransformer(str(out), device="cpu").encode(TEXTS), white.encode(TEXTS),
                               atol=1e-5)
    with pytest.raises(ValueError, match="already has a Dense head"):
        whitening.whiten(white, TEXTS)


def test_first_last_average_pooling_equals_transformers_hidden_states(tiny_model, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    encoder = embedjax.load_pretrained(tiny_model, pooling="first_last_avg")
    got = encoder.encode(TEXTS, normalize=False)
    model, tok = AutoModel.from_pretrained(str(tiny_model)).eval(), AutoTokenizer.from_pretrained(str(tiny_model))
    with torch.no_grad():
        batch = tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
        states = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).float()
    want = (((states[1] + states[-1]) / 2) * mask).sum(1) / mask.sum(1)  # SimCSE's avg_first_last
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="has no sentence-transformers equivalent"):
        save_pretrained(encoder, tmp_path / "fla")
    save_pretrained(encoder, tmp_path / "fla", sentence_transformers=False)
    np.testing.assert_allclose(embedjax.load_pretrained(tmp_path / "fla").encode(TEXTS, normalize=False), got,
                               atol=1e-6)


def test_a_run_trains_the_dense_head_and_exports_it(st_with_dense, small_dev, tmp_path):
    from sentence_transformers import SentenceTransformer

    from embedjax.train.loop import train_and_evaluate

    sys.path.insert(0, str(REPO))
    from configs import stsb_angle

    path, _ = st_with_dense
    c = stsb_angle.get_config("smoke")
    c.model, c.evals.dev.path, c.num_steps, c.batch_size = str(path), str(small_dev), 2, 16
    c.eval_every, c.checkpoint.every, c.optim.learning_rate = 2, 2, 1e-2
    train_and_evaluate(c, tmp_path / "run")
    start = dense_head.read_sentence_transformers(path / "2_Dense")[0]
    trained, activation = dense_head.read_sentence_transformers(tmp_path / "run" / "2_Dense")
    assert activation == "tanh" and not np.allclose(trained["kernel"], start["kernel"])
    reloaded = embedjax.load_pretrained(tmp_path / "run")
    st = SentenceTransformer(str(tmp_path / "run"), device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), reloaded.encode(TEXTS), atol=1e-5)
    assert reloaded.dim == 16 and jax.tree.leaves(reloaded.params[dense_head.KEY])
