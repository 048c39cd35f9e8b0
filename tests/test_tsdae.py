"""embedjax.tsdae against sentence-transformers' DenoisingAutoEncoderLoss (TSDAE, arXiv:2104.06979)
on the tiny random BERT: loss, gradients (tied and decoder-own weights), logits, and the deletion
noise against ``DenoisingAutoEncoderDataset.delete``."""
import dataclasses
import json
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax import tsdae
from embedjax.encoders import bert

pytestmark = pytest.mark.fast_compile

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "A man is playing a flute while his dog sleeps.",
    "Vitamin D deficiency is associated with higher risk of fractures in elderly patients.",
    "The cat sat.",
    "Protein folding (in vitro) depends on temperature, pH and the solvent's ionic strength!",
]


@pytest.fixture(scope="module")
def setup(tiny_model):
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import DenoisingAutoEncoderLoss

    torch.set_num_threads(2)
    torch.manual_seed(0)  # the decoder's missing (cross-attention, head) weights are drawn from it
    model = SentenceTransformer(str(tiny_model), device="cpu")
    loss = DenoisingAutoEncoderLoss(model, decoder_name_or_path=str(tiny_model), tie_encoder_decoder=True)
    loss.eval()  # dropout off on both sides: the comparison is deterministic
    with torch.no_grad():  # make the head bias and the sentence embedding's path matter
        loss.decoder.cls.predictions.bias.normal_(0.0, 0.5)
        for layer in loss.decoder.bert.encoder.layer:
            layer.crossattention.self.value.weight.normal_(0.0, 0.5)
            layer.crossattention.output.dense.weight.normal_(0.0, 0.5)

    cfg = bert.BertConfig.from_hf(json.loads((tiny_model / "config.json").read_text()))
    enc_state = {k: v.detach().numpy() for k, v in model.transformers_model.state_dict().items()}
    enc_params = jax.tree.map(jnp.asarray, bert.params_from_state_dict(enc_state, cfg))

    dec_state = {k: v.detach().numpy() for k, v in loss.decoder.state_dict().items()}
    decoder = tsdae.init_decoder(enc_params, cfg, jax.random.key(1))
    decoder = jax.tree.map(lambda x: np.array(x, copy=True), decoder)
    for name, theirs in (("query", "self.query"), ("key", "self.key"), ("value", "self.value"),
                         ("output", "output.dense")):
        for i in range(cfg.num_layers):
            base = f"bert.encoder.layer.{i}.crossattention.{theirs}"
            decoder["cross"][name]["kernel"][i] = dec_state[f"{base}.weight"].T
            decoder["cross"][name]["bias"][i] = dec_state[f"{base}.bias"]
    for i in range(cfg.num_layers):
        base = f"bert.encoder.layer.{i}.crossattention.output.LayerNorm"
        decoder["cross"]["norm"]["scale"][i] = dec_state[f"{base}.weight"]
        decoder["cross"]["norm"]["bias"][i] = dec_state[f"{base}.bias"]
    head = decoder["head"]
    head["transform"]["kernel"] = dec_state["cls.predictions.transform.dense.weight"].T
    head["transform"]["bias"] = dec_state["cls.predictions.transform.dense.bias"]
    head["norm"]["scale"] = dec_state["cls.predictions.transform.LayerNorm.weight"]
    head["norm"]["bias"] = dec_state["cls.predictions.transform.LayerNorm.bias"]
    head["bias"] = dec_state["cls.predictions.bias"]
    dec_params = jax.tree.map(jnp.asarray, decoder)

    rng = np.random.default_rng(0)
    noisy = [tsdae.delete_tokens(s, rng) for s in SENTENCES]
    source = model.tokenize(noisy)
    target = model.tokenize(SENTENCES)
    # the model ends in Normalize (MiniLM's modules.json): its sentence_embedding is unit length
    normalize = any(type(m).__name__ == "Normalize" for m in model)
    assert normalize
    return dict(normalize=normalize, model=model, loss=loss, cfg=cfg, enc_params=enc_params, dec_params=dec_params,
                source=source, target=target, noisy=noisy, torch=torch)


def _np(t):
    return np.asarray(t.detach().numpy())


def test_tied_and_own_weights_as_sentence_transformers_shares_them(setup):
    """The decoder reuses every encoder parameter but cross-attention and the LM head (ours: the
    decoder tree holds exactly those); the output matrix is the word embedding matrix."""
    loss, model = setup["loss"], setup["model"]
    enc = {id(p) for p in model.transformers_model.parameters()}
    own = sorted(n for n, p in loss.decoder.named_parameters() if id(p) not in enc)
    assert all(".crossattention." in n or n.startswith("cls.predictions.") for n in own), own
    assert loss.decoder.cls.predictions.decoder.weight is model.transformers_model.embeddings.word_embeddings.weight
    n_own = sum(p.numel() for n, p in loss.decoder.named_parameters() if id(p) not in enc)
    assert n_own == sum(x.size for x in jax.tree.leaves(setup["dec_params"]))
    # init_decoder draws as transformers does: normal(0.02) kernels, zero biases, unit norms.
    fresh = tsdae.init_decoder(setup["enc_params"], setup["cfg"], jax.random.key(0))
    assert abs(float(jnp.std(fresh["cross"]["query"]["kernel"])) - 0.02) < 0.004
    assert float(jnp.abs(fresh["head"]["bias"]).max()) == 0.0
    assert float(jnp.abs(fresh["cross"]["norm"]["scale"] - 1).max()) == 0.0


def test_decoder_logits_equal_bert_lm_head_model_and_are_causal(setup):
    torch, loss, model, cfg = setup["torch"], setup["loss"], setup["model"], setup["cfg"]
    src, tgt = setup["source"], setup["target"]
    with torch.no_grad():
        reps = model(dict(src))["sentence_embedding"]
        theirs = loss.decoder(input_ids=tgt["input_ids"], encoder_hidden_states=reps[:, None],
                              encoder_attention_mask=src["attention_mask"][:, 0:1], use_cache=False).logits
    ids = jnp.asarray(_np(tgt["input_ids"]))
    ours = tsdae.decoder_logits(setup["enc_params"], setup["dec_params"], cfg, jnp.asarray(_np(reps)), ids)
    np.testing.assert_allclose(np.asarray(ours), _np(theirs), rtol=1e-4, atol=1e-4)
    # causal: changing the last column leaves every earlier position's logits unchanged
    changed = ids.at[:, -1].set(1000)
    again = tsdae.decoder_logits(setup["enc_params"], setup["dec_params"], cfg, jnp.asarray(_np(reps)), changed)
    np.testing.assert_array_equal(np.asarray(again[:, :-1]), np.asarray(ours[:, :-1]))
    assert float(jnp.abs(again[:, -1] - ours[:, -1]).max()) > 1e-3


def test_loss_and_gradients_equal_denoising_auto_encoder_loss(setup):
    torch, loss, model, cfg = setup["torch"], setup["loss"], setup["model"], setup["cfg"]
    src, tgt = setup["source"], setup["target"]
    assert any(a != b for a, b in zip(setup["noisy"], SENTENCES))
    loss.zero_grad()
    theirs = loss([dict(src), dict(tgt)], None)
    theirs.backward()
    theirs = float(theirs.detach())

    def ours_fn(enc, dec):
        return tsdae.tsdae_loss(enc, dec, cfg, jnp.asarray(_np(src["input_ids"])), jnp.asarray(_np(src["attention_mask"])),
                                jnp.asarray(_np(tgt["input_ids"])), pooling="mean", normalize=setup["normalize"])

    value, (g_enc, g_dec) = jax.jit(jax.value_and_grad(ours_fn, argnums=(0, 1)))(setup["enc_params"], setup["dec_params"])
    np.testing.assert_allclose(float(value), theirs, rtol=1e-5)
    # the value depends on the embedding: without the model's Normalize it is off by 10x the tolerance
    unnormalized = tsdae.tsdae_loss(setup["enc_params"], setup["dec_params"], cfg, jnp.asarray(_np(src["input_ids"])),
                                    jnp.asarray(_np(src["attention_mask"])), jnp.asarray(_np(tgt["input_ids"])))
    assert abs(float(unnormalized) - theirs) > 1e-4 * theirs  # 10x the tolerance above
    assert float(value) > 1.0  # a real reconstruction loss, not a degenerate 0

    def close(a, b):  # 1e-4 of the tensor's largest gradient (attention key biases: exactly 0 but rounding)
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=max(1e-4 * float(np.abs(b).max()), 1e-9))

    # Tied: the word embeddings get gradient from the encoder input, the decoder input and the output matrix.
    word = model.transformers_model.embeddings.word_embeddings.weight
    close(g_enc["embeddings"]["word"], _np(word.grad))
    # Every other shared weight too (pooler: unused by mean pooling, no gradient).
    grads = {n: _np(p.grad) for n, p in model.transformers_model.named_parameters() if p.grad is not None}
    jax.tree.map(close, g_enc, bert.params_from_state_dict(grads, cfg))
    # The decoder's own: a cross-attention kernel (value: its one-key softmax makes query/key gradients 0).
    layer0 = loss.decoder.bert.encoder.layer[0].crossattention
    close(g_dec["cross"]["value"]["kernel"][0], _np(layer0.self.value.weight.grad).T)
    close(g_dec["cross"]["output"]["kernel"][1], _np(loss.decoder.bert.encoder.layer[1].crossattention.output.dense.weight.grad).T)
    close(g_dec["head"]["bias"], _np(loss.decoder.cls.predictions.bias.grad))
    assert float(jnp.abs(g_dec["cross"]["value"]["kernel"]).max()) > 1e-6
    assert float(jnp.abs(g_dec["cross"]["query"]["kernel"]).max()) < 1e-7


# --------------------------------------------------------------------------- deletion noise


def test_word_tokenize_and_detokenize_match_nltk_documented_outputs():
    s = "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks."
    assert tsdae.word_tokenize(s) == ["Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please",
                                      "buy", "me", "two", "of", "them", ".", "Thanks", "."]
    s = "Good muffins cost $3.88 (roughly 3,36 euros)\nin New York.  Please buy me\ntwo of them.\nThanks."
    assert tsdae.treebank_tokenize(s) == ["Good", "muffins", "cost", "$", "3.88", "(", "roughly", "3,36", "euros",
                                          ")", "in", "New", "York.", "Please", "buy", "me", "two", "of", "them.",
                                          "Thanks", "."]
    assert tsdae.treebank_tokenize("I can't go, they're home.") == ["I", "ca", "n't", "go", ",", "they", "'re", "home", "."]
    toks = ["hello", ",", "i", "ca", "n't", "feel", "my", "feet", "!", "Help", "!", "!"]
    assert tsdae.treebank_detokenize(toks) == "hello, i can't feel my feet! Help!!"
    toks = ["hello", ",", "i", "can't", "feel", ";", "my", "feet", "!", "Help", "!", "!", "He", "said", ":", "Help",
            ",", "help", "?", "!"]
    assert tsdae.treebank_detokenize(toks) == "hello, i can't feel; my feet! Help!! He said: Help, help?!"
    assert (tsdae.treebank_detokenize(tsdae.word_tokenize("Good muffins cost $3.88\nin New York.  Please buy me two of them."))
            == "Good muffins cost $3.88 in New York. Please buy me two of them.")


def _legacy_generator(seed):
    bits = np.random.MT19937(0)
    bits._legacy_seeding(seed)  # the seeding np.random.seed / RandomState(seed) do
    return np.random.Generator(bits)


def test_delete_tokens_equals_sentence_transformers_delete(monkeypatch):
    """sentence-transformers' own ``delete`` (nltk, not installed here, stood in by our port of its
    two functions) under ``np.random.seed(s)`` against ``delete_tokens`` under the same legacy seed."""
    from sentence_transformers.sentence_transformer.datasets.denoising_auto_encoder import DenoisingAutoEncoderDataset

    nltk = types.ModuleType("nltk")
    nltk.word_tokenize = tsdae.word_tokenize
    treebank = types.ModuleType("nltk.tokenize.treebank")
    treebank.TreebankWordDetokenizer = type("TreebankWordDetokenizer", (), {
        "detokenize": lambda self, words: tsdae.treebank_detokenize(list(words))})
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.tokenize", types.ModuleType("nltk.tokenize"))
    monkeypatch.setitem(sys.modules, "nltk.tokenize.treebank", treebank)

    compared = 0
    for seed in range(120):
        text = SENTENCES[seed % len(SENTENCES)]
        np.random.seed(seed)
        theirs = DenoisingAutoEncoderDataset.delete(text)
        np.random.seed(seed)
        forced = not (np.random.rand(len(tsdae.word_tokenize(text))) > 0.6).any()
        ours = tsdae.delete_tokens(text, _legacy_generator(seed))
        if not forced:  # RandomState.choice and Generator.choice draw the forced word differently
            assert ours == theirs, (seed, ours, theirs)
            compared += 1
    assert compared >= 100
    assert DenoisingAutoEncoderDataset.delete("") == tsdae.delete_tokens("", np.random.default_rng(0)) == ""


def test_delete_tokens_first_principles():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    kept = []
    for _ in range(200):
        out = tsdae.delete_tokens(" ".join(words), rng).split()
        positions = [words.index(w) for w in out]
        assert positions == sorted(positions) and len(set(out)) == len(out)  # survivors, in order
        kept.append(len(out) / len(words))
    assert abs(np.mean(kept) - 0.4) < 0.02
    assert all(tsdae.delete_tokens("Hello", np.random.default_rng(s)) == "Hello" for s in range(20))
    assert all(tsdae.delete_tokens("Hello world", np.random.default_rng(s), ratio=0.999) in ("Hello", "world")
               for s in range(20))
    assert tsdae.delete_tokens("   ", rng) == "   "
    assert tsdae.delete_tokens("two words", np.random.default_rng(3), ratio=0.0) == "two words"


# --------------------------------------------------------------------------- TSDAE as a training objective


def test_deletion_noise_records_are_damaged_copies_drawn_per_seed_and_index():
    from embedjax.data.noise import DeletionNoise

    texts = [f"word{i} alpha beta gamma delta epsilon zeta eta theta iota kappa lambda." for i in range(300)]
    noisy = DeletionNoise(texts, 0.6, seed=3)
    again, other = DeletionNoise(texts, 0.6, seed=3), DeletionNoise(texts, 0.6, seed=4)
    kept = []
    for i in range(len(texts)):
        record = noisy[i]
        assert record.text_b == texts[i] and record == again[i]  # the same copy whenever it is read
        words, damaged = tsdae.word_tokenize(texts[i]), tsdae.word_tokenize(record.text_a)
        it = iter(words)
        assert damaged and all(w in it for w in damaged)  # survivors in order: a subsequence
        kept.append(len(damaged) / len(words))
    assert sum(noisy[i] != other[i] for i in range(len(texts))) > 250  # seeds draw different noise
    n = 13 * len(texts)  # words drawn; each kept with probability 0.4
    assert abs(np.mean(kept) - 0.4) < 5 * np.sqrt(0.4 * 0.6 / n) + 1 / 13  # (+ the forced survivor's bias)
    assert noisy[-1] == noisy[len(texts) - 1]
    with pytest.raises(IndexError):
        noisy[len(texts)]
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        DeletionNoise(texts, 1.0)
    with pytest.raises(ValueError, match="single texts"):
        DeletionNoise([("a", "b")])


def test_the_train_step_loss_equals_denoising_auto_encoder_loss_on_a_pipeline_batch(setup, tiny_model):
    """The objective's wiring: the pipeline's side a is the damaged copy, side b the original, the
    embedding is the model's (mean pooled, normalised), and the decoder is the one in params."""
    from embedjax.data import pipeline
    from embedjax.data.noise import DeletionNoise
    from embedjax.model import load_pretrained
    from embedjax.train.objective import Objective, batch_loss
    from embedjax.train.tsdae_objective import DECODER

    torch = setup["torch"]
    encoder = load_pretrained(tiny_model)
    records = DeletionNoise(SENTENCES, 0.6, seed=0)
    it = pipeline.train_pipeline(records, encoder.tokenizer.replace(buckets=(32,)), global_batch_size=len(SENTENCES),
                                 seed=0, common_length=True)
    batch = next(it)
    order = [records[i] for i in range(len(records))]
    objective = Objective.from_config(_objective_section(), encoder.pooling)
    objective = dataclasses.replace(objective, dropout=False)
    params = {**setup["enc_params"], DECODER: setup["dec_params"]}
    got = batch_loss(params, setup["cfg"], objective, jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    # the batch's rows in the pipeline's (shuffled) order, read back from its side-b ids
    vocab = {v: k for k, v in encoder.tokenizer.backend.get_vocab().items()}
    decoded = [encoder.tokenizer.backend.decode([int(t) for t in row if t], skip_special_tokens=True)
               for row in np.asarray(batch.b.ids)]
    by_text = {encoder.tokenizer.backend.decode(encoder.tokenizer.backend.encode(r.text_b).ids,
                                                skip_special_tokens=True): r for r in order}
    rows = [by_text[t] for t in decoded]
    assert vocab and sorted(r.text_b for r in rows) == sorted(SENTENCES)
    model, loss = setup["model"], setup["loss"]
    with torch.no_grad():
        want = loss([model.tokenize([r.text_a for r in rows]), model.tokenize([r.text_b for r in rows])], None)
    np.testing.assert_allclose(float(got), float(want), rtol=2e-5)


def _objective_section(**changes):
    import sys as _sys

    _sys.path.insert(0, str(REPO))
    from configs import base

    section = base.base_config().objective.to_dict()
    section.update({"loss": "tsdae", "loss_kwargs": {}, **changes})
    return section


def test_tsdae_objective_refuses_what_it_cannot_train(tiny_model, tmp_path):
    from embedjax.train.config import DataConfig, TrainConfig
    from embedjax.train.objective import Objective
    from embedjax.train import sources

    with pytest.raises(ValueError, match="wrap losses of embeddings"):
        Objective.from_config(_objective_section(matryoshka_dims=(8,)), "mean")
    with pytest.raises(ValueError, match="unknown objective.loss_kwargs"):
        Objective.from_config(_objective_section(loss_kwargs={"scale": 20.0}), "mean")
    text = tmp_path / "s.txt"
    text.write_text("one two three.\nfour five six.\n")
    plain = sources.train_source(DataConfig(kind="sentences", train=str(text), format="txt"))
    from embedjax.data import pipeline
    from embedjax.train.loss_specs import check_objective_data

    objective = Objective.from_config(_objective_section(), "mean")
    with pytest.raises(ValueError, match="data.noise='delete'"):
        check_objective_data(objective, pipeline.fields_of(plain))
    with pytest.raises(ValueError, match="single texts"):
        sources.train_source(DataConfig(kind="stsb", train=str(text), noise="delete"))
    sys.path.insert(0, str(REPO))
    from configs import tsdae_beir

    c = tsdae_beir.get_config("smoke")
    c.model = str(tiny_model)
    c.data.mixture = {}
    c.data.kind, c.data.train, c.data.format = "sentences", str(text), "txt"
    c.data.pack_length = 64
    from embedjax.train.loop import train_and_evaluate

    with pytest.raises(ValueError, match="pack_length=0"):
        train_and_evaluate(c, tmp_path / "packed")


def test_a_tsdae_run_trains_the_decoder_with_the_encoder_and_exports_the_encoder_alone(tiny_model, small_beir,
                                                                                        tmp_path):
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer

    import embedjax
    from embedjax.train.loop import train_and_evaluate

    sys.path.insert(0, str(REPO))
    from configs import tsdae_beir

    c = tsdae_beir.get_config("smoke=4")
    c.model = str(tiny_model)
    c.data.mixture = {}
    c.data.train = str(small_beir)
    c.evals = {"dev": {"type": "retrieval", "path": str(small_beir), "split": "dev"}}
    c.select_metric = "dev/ndcg@10"
    c.checkpoint.keep = 10
    c.optim.learning_rate = 1e-3
    summary = train_and_evaluate(c, tmp_path / "run")
    assert np.isfinite(summary["after"]["dev/ndcg@10"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # the checkpoints hold the decoder (a resume continues it); the export does not
    metadata = (tmp_path / "run" / "checkpoints" / "4" / "state" / "_METADATA").read_text()
    assert "tsdae_decoder" in metadata and "cross" in metadata
    exported = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert exported and not any("cross" in k or "tsdae" in k for k in exported)
    start = load_file(str(tiny_model / "model.safetensors"))
    texts = ["a damaged copy", "the original text"]
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path / "run"), device="cpu").encode(texts),
                               embedjax.load_pretrained(tmp_path / "run").encode(texts), atol=1e-5)
    assert not np.allclose(exported[next(k for k in exported if k.endswith("word_embeddings.weight"))],
                           start[next(k for k in start if k.endswith("word_embeddings.weight"))])
