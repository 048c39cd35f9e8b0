"""Cross-encoders (embedjax/cross_encoder.py, embedjax/cross_model.py) against transformers'
``*ForSequenceClassification`` and sentence-transformers' ``CrossEncoder`` on tiny random models
created here: BERT (1 and 3 labels) and a Qwen3 decoder scoring the last token."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from sentence_transformers import CrossEncoder as STCrossEncoder

from conftest import write_tiny_cross_encoder
from embedjax import cross_encoder as ce
from embedjax import sharding, tiny
from embedjax.cross_model import load_cross_encoder, save_cross_encoder

pytestmark = pytest.mark.fast_compile  # small models against references: compile-bound (conftest.py)

PAIRS = [
    ("A man is playing a guitar.", "A person plays an instrument on stage."),
    ("The cat sleeps.", "A dog barks loudly at the mailman every single morning before breakfast."),
    ("", "An empty first text."),
    ("Stocks fell sharply on Monday as investors worried about rates and the outlook for growth "
     "in the second half of the year, traders said.", "Markets dropped."),  # truncated longest-first
    ("Short.", "Short too."),
]
MAX_LENGTH = 32


@pytest.fixture(scope="module", params=[1, 3], ids=["one_label", "three_labels"])
def bert_classifier(request, tmp_path_factory, minilm_path):
    if request.param == 1:
        return request.getfixturevalue("tiny_cross_encoder")
    return write_tiny_cross_encoder(tmp_path_factory.mktemp(f"bert{request.param}"), minilm_path, request.param)


@pytest.fixture(scope="module")
def qwen3_classifier(tmp_path_factory):
    """A tiny Qwen3ForSequenceClassification (one label) with a BPE tokenizer that encodes a pair
    by concatenation, as Qwen's does."""
    texts = [t for pair in PAIRS for t in pair] * 4
    base = tiny.write_random_checkpoint(tmp_path_factory.mktemp("qwen3_base"), "qwen3", texts=texts)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    d = tmp_path_factory.mktemp("qwen3_cls")
    model.eval().save_pretrained(d, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(base / name, d / name)
    return d


@pytest.fixture(scope="module")
def xlmr_classifier(tmp_path_factory):
    """A tiny XLMRobertaForSequenceClassification (3 labels: the classifier.dense / out_proj head,
    RoBERTa positions) with a BPE tokenizer that writes pairs as <s> a </s></s> b </s>, as bge-reranker's."""
    from tokenizers import processors

    tok = tiny.train_tokenizer([t for pair in PAIRS for t in pair] * 4, 300)
    tok.add_special_tokens(["<s>", "</s>"])  # the pad token is tiny.PAD, id 1 as XLM-R's
    cls, sep = ("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))
    tok.post_processor = processors.RobertaProcessing(sep, cls)
    d = tmp_path_factory.mktemp("xlmr_cls")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                                                         "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
                                                         "pad_token": tiny.PAD, "model_max_length": 128}))
    torch.manual_seed(0)
    config = transformers.XLMRobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=130,
                                           type_vocab_size=1, pad_token_id=tok.token_to_id(tiny.PAD), num_labels=3,
                                           initializer_range=0.2)
    transformers.XLMRobertaForSequenceClassification(config).eval().save_pretrained(d, safe_serialization=True)
    return d


def test_xlm_roberta_head_scores_like_pytorch_and_exports_its_layout(xlmr_classifier, tmp_path):
    model = load_cross_encoder(xlmr_classifier, max_length=MAX_LENGTH)
    assert model.head.kind == "first_token" and model.num_labels == 3
    expected = torch_logits(xlmr_classifier, [a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert np.ptp(expected) > 0.5
    np.testing.assert_allclose(model.predict(PAIRS, activation=False), expected, atol=1e-5, rtol=1e-5)
    out = save_cross_encoder(model, tmp_path / "export")
    _, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert {"classifier.dense.weight", "classifier.out_proj.bias"} <= set(load_file(str(out / "model.safetensors")))
    np.testing.assert_allclose(torch_logits(out, [a for a, _ in PAIRS], [b for _, b in PAIRS]), expected, atol=1e-5)


def torch_logits(directory, texts_a, texts_b=None):
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    enc = tok(texts_a, texts_b, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


def test_bert_cross_encoder_scores_pairs_like_pytorch_and_sentence_transformers(bert_classifier):
    model = load_cross_encoder(bert_classifier, max_length=MAX_LENGTH)
    labels = model.num_labels
    expected = torch_logits(bert_classifier, [a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert expected.shape == (len(PAIRS), labels) and np.ptp(expected) > 0.5
    logits = model.predict(PAIRS, batch_size=2, activation=False)
    np.testing.assert_allclose(logits.reshape(len(PAIRS), labels), expected, atol=1e-5, rtol=1e-5)

    st = STCrossEncoder(str(bert_classifier), max_length=MAX_LENGTH, device="cpu")
    ours = model.predict(PAIRS)
    np.testing.assert_allclose(ours, st.predict(PAIRS, batch_size=2), atol=1e-5, rtol=1e-5)
    assert model.activation == ("sigmoid" if labels == 1 else "identity")


def test_export_loads_in_sentence_transformers_and_transformers_and_scores_the_same(bert_classifier, tmp_path):
    model = load_cross_encoder(bert_classifier, max_length=MAX_LENGTH)
    # a changed head and backbone, so the export cannot be the source copied through
    params = jax.tree.map(lambda x: x * 1.1, model.params)
    out = save_cross_encoder(model, tmp_path / "export", params=params)
    _, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    reloaded = load_cross_encoder(out)
    assert reloaded.max_length == MAX_LENGTH and reloaded.num_labels == model.num_labels
    ours = reloaded.predict(PAIRS)
    st = STCrossEncoder(str(out), max_length=MAX_LENGTH, device="cpu")
    np.testing.assert_allclose(ours, st.predict(PAIRS), atol=1e-5, rtol=1e-5)
    assert not np.allclose(ours, model.predict(PAIRS), atol=1e-3)  # the new params were exported


def test_decoder_cross_encoder_scores_the_last_token_like_pytorch(qwen3_classifier, tmp_path):
    model = load_cross_encoder(qwen3_classifier, max_length=MAX_LENGTH)
    assert model.head.kind == "last_token"
    expected = torch_logits(qwen3_classifier, [a for a, _ in PAIRS], [b for _, b in PAIRS])[:, 0]
    assert np.ptp(expected) > 0.1
    np.testing.assert_allclose(model.predict(PAIRS, batch_size=2, activation=False), expected, atol=1e-5, rtol=1e-5)
    st = STCrossEncoder(str(qwen3_classifier), max_length=MAX_LENGTH, device="cpu")
    np.testing.assert_allclose(model.predict(PAIRS), st.predict(PAIRS), atol=1e-5, rtol=1e-5)

    template = "Query: {first}\nDocument: {second}"
    templated = load_cross_encoder(qwen3_classifier, max_length=MAX_LENGTH, template=template)
    texts = [template.format(first=a, second=b) for a, b in PAIRS]
    np.testing.assert_allclose(templated.predict(PAIRS, activation=False), torch_logits(qwen3_classifier, texts)[:, 0],
                               atol=1e-5, rtol=1e-5)
    out = save_cross_encoder(templated, tmp_path / "export")
    state = load_file(str(out / "model.safetensors"))
    assert "score.weight" in state and all(k == "score.weight" or k.startswith("model.") for k in state)
    assert load_cross_encoder(out).template == template
    np.testing.assert_allclose(load_cross_encoder(out).predict(PAIRS), templated.predict(PAIRS), atol=1e-6)


@pytest.mark.parametrize("which", ["bert", "qwen3"])
def test_packed_pairs_score_as_padded_ones(which, request):
    directory = request.getfixturevalue("tiny_cross_encoder" if which == "bert" else "qwen3_classifier")
    model = load_cross_encoder(directory, max_length=MAX_LENGTH)
    encodings = model.encode_pairs(PAIRS)
    if which == "bert":
        assert any(1 in e.type_ids for e in encodings)  # the second text's token types are read
    packed = model.tokenizer.pack(encodings, 48)
    assert packed.input_ids.shape[0] < len(PAIRS)  # several pairs share a row
    logits = ce.score_packed(model.params, model.cfg, model.head, packed.input_ids, packed.segment_ids,
                             packed.positions, num_pairs=len(PAIRS), token_type_ids=packed.token_type_ids)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], model.predict(PAIRS, activation=False), atol=1e-5)


def test_a_plain_backbone_gets_a_fresh_head_and_keeps_its_pooler(minilm_path):
    model = load_cross_encoder(minilm_path, max_length=MAX_LENGTH, num_labels=2, seed=1)
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    np.testing.assert_array_equal(np.asarray(model.params["head"]["dense"]["kernel"]),
                                  reference.bert.pooler.dense.weight.detach().numpy().T)
    assert model.params["head"]["out"]["kernel"].shape == (384, 2) and model.activation == "identity"
    again = load_cross_encoder(minilm_path, max_length=MAX_LENGTH, num_labels=2, seed=1)
    np.testing.assert_array_equal(model.params["head"]["out"]["kernel"], again.params["head"]["out"]["kernel"])


def test_predict_on_eight_devices_and_rank(bert_classifier):
    model = load_cross_encoder(bert_classifier, max_length=MAX_LENGTH)
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(model.predict(PAIRS, batch_size=3, mesh=sharding.local_mesh()),
                               model.predict(PAIRS, batch_size=3), atol=1e-6)
    if model.num_labels != 1:
        with pytest.raises(ValueError, match="one-logit"):
            model.rank("q", ["a"])
        return
    documents = [b for _, b in PAIRS]
    scores = model.predict([("A man is playing a guitar.", d) for d in documents])
    ranked = model.rank("A man is playing a guitar.", documents, top_k=3, return_documents=True)
    assert [r["corpus_id"] for r in ranked] == list(np.argsort(-scores)[:3])
    assert ranked[0]["text"] == documents[ranked[0]["corpus_id"]]
    np.testing.assert_allclose([r["score"] for r in ranked], np.sort(scores)[::-1][:3], rtol=1e-6)


def test_bad_input_is_a_clear_error(bert_classifier, tmp_path):
    model = load_cross_encoder(bert_classifier, max_length=MAX_LENGTH)
    with pytest.raises(TypeError, match=r"pairs\[1\] is 'lonely'"):
        model.predict([("a", "b"), "lonely"])
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        model.predict([("a", 3)])
    with pytest.raises(ValueError, match="labels"):
        load_cross_encoder(bert_classifier, num_labels=model.num_labels + 1)
    with pytest.raises(ValueError, match="template"):
        load_cross_encoder(bert_classifier, template="{query} {document}")
    with pytest.raises(ValueError, match="max_length"):
        load_cross_encoder(bert_classifier, max_length=10_000)
    config = json.loads((bert_classifier / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(bert_classifier, bad)
    (bad / "config.json").write_text(json.dumps({**config, "sentence_transformers": {"activation_fn": "my.Softplus"}}))
    with pytest.raises(ValueError, match="Softplus"):
        load_cross_encoder(bad)
