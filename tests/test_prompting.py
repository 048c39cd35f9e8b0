"""Training-free sentence embeddings from decoder LLMs (embedjax/prompting.py and the decoder's
``token_prepending`` / ``contrastive_prompting`` options) against transformers, on tiny random
Llama and Qwen3 decoders (4 layers, tests/test_decoders.py's weights) saved with a small BPE
tokenizer (embedjax.tiny.train_tokenizer, as the tiny checkpoints of the LLM tests):

* PromptEOL (arXiv:2307.16645): the final-norm state of the templated text's last real token;
* MetaEOL (arXiv:2402.18458): the mean of the eight templates' PromptEOL references;
* Token Prepending (arXiv:2412.11556): transformers with forward pre-hooks on ``model.layers[i]``
  applying the rule of fuyuchenIfyw/token_prepending (senllm/modeling_llama.py) step by step;
* Contrastive Prompting (arXiv:2505.12831): transformers with hooks on ``self_attn.o_proj``
  applying the rule of zifengcheng/CP (activation_intervention/__init__.py): capture the auxiliary
  prompt's input at the last token, replace the prompt's.
"""

import copy
import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

import embedjax
from embedjax import prompting, tiny
from embedjax.encoders import decoder
from test_decoders import FAMILIES, _randomize

pytestmark = pytest.mark.fast_compile  # tiny models against references: compile-bound (conftest.py)

LAYERS = 4
TEXTS = ["A man is playing a flute.", 'He said "hello" to the dog?', "Rain", "Two kids ride bikes along the river bank"]
CORPUS = [prompting.PROMPTEOL, prompting.CP_AUXILIARY, *prompting.METAEOL, *TEXTS] * 4


def _official_clean(s):
    """The official batchers' preprocessing, as written there (kongds/scaling_sentemb evaluation.py)."""
    if len(s) > 0 and s[-1] not in '.?"\'':
        s += '.'
    s = s.replace('"', '\'')
    if len(s) > 0 and '?' == s[-1]:
        s = s[:-1] + '.'
    return s


def _official_prompts(template, texts=TEXTS):
    return [template.replace("{text}", _official_clean(s)).strip() for s in texts]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family(request, tmp_path_factory):
    """(name, torch model, checkpoint directory, the tokenizers.Tokenizer saved there)."""
    name = request.param
    tok = tiny.train_tokenizer(CORPUS, vocab_size=400, add_bos=name == "llama")
    fields = FAMILIES[name]().to_dict()
    fields.pop("layer_types", None)
    fields.update(num_hidden_layers=LAYERS, vocab_size=tok.get_vocab_size(), max_position_embeddings=512,
                  eos_token_id=tok.token_to_id(tiny.EOS), pad_token_id=tok.token_to_id(tiny.PAD),
                  bos_token_id=tok.token_to_id(tiny.BOS))
    cfg = type(FAMILIES[name]())(**fields)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModel._model_mapping[type(cfg)](cfg).eval()
    _randomize(model, gemma=False)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    return name, model, path, tok


@pytest.fixture(scope="module")
def encoder(family):
    return embedjax.load_pretrained(family[2], pooling="last_token")


def _pad(id_lists, pad):
    t = max(map(len, id_lists))
    ids = torch.full((len(id_lists), t), pad, dtype=torch.long)
    mask = torch.zeros((len(id_lists), t), dtype=torch.long)
    for i, row in enumerate(id_lists):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask, torch.tensor([len(r) for r in id_lists]) - 1


def _torch_last(model, id_lists, layer=None, hooks=()):
    """transformers' state of each text's last real token (right padding, one batch): after the
    final norm, or layer ``layer``'s output; ``hooks``: (module, pre-hook) pairs registered meanwhile."""
    ids, mask, last = _pad(id_lists, model.config.pad_token_id)
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    states = out.last_hidden_state if layer is None else out.hidden_states[layer]
    return states[torch.arange(len(id_lists)), last].numpy()


def _ids(tok, prompts):
    return [e.ids for e in tok.encode_batch(prompts)]


def test_prompteol_is_the_last_real_tokens_final_state(family, encoder):
    name, model, _, tok = family
    assert encoder.tokenizer.appends_eos  # load_pretrained appends an EOS for last_token: PromptEOL drops it
    got = prompting.encode_with_template(encoder, TEXTS, normalize=False)
    ids = _ids(tok, _official_prompts(prompting.PROMPTEOL))
    want = _torch_last(model, ids)
    assert got.shape == (len(TEXTS), 64) and len(set(map(len, ids))) > 2  # a batch of different lengths
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    one = prompting.encode_with_template(encoder, TEXTS[1], normalize=False)
    np.testing.assert_allclose(one, want[1], atol=1e-5, rtol=0)
    assert prompting.clean_text('He said "hello" to the dog?') == "He said 'hello' to the dog."
    assert prompting.PROMPTEOL == 'This sentence : "{text}" means in one word:"'
    # The template matters: the plain text's last token is another state.
    plain = encoder.encode(TEXTS, normalize=False)
    assert np.abs(plain - got).max() > 1e-2


@pytest.mark.parametrize("family", ["llama"], indirect=True)  # one family: an average of checked embeddings
def test_metaeol_is_the_mean_of_the_templates_references(family, encoder):
    _, model, _, tok = family
    assert len(prompting.METAEOL) == 8
    texts = TEXTS[:3]
    got = prompting.encode_averaged(encoder, texts, normalize=False)
    refs = np.stack([_torch_last(model, _ids(tok, _official_prompts(t, texts))) for t in prompting.METAEOL])
    np.testing.assert_allclose(got, refs.mean(axis=0), atol=1e-5, rtol=0)
    assert np.abs(refs[0] - refs.mean(axis=0)).max() > 1e-2  # the templates differ: the mean is not one of them


def _tp_hook(pst, last):
    """The official rule before a layer: ``hidden_states[arange(B), pst] = hidden_states[:, -1]``
    (-1: the last real token, left padding there, right padding here)."""
    rows = torch.arange(len(pst))

    def hook(module, args):
        h = args[0].clone()
        h[rows, pst] = h[rows, last]
        return (h, *args[1:])

    return hook


@pytest.mark.parametrize("start, stop, num_layers", [(1, 3, None), (0, None, 3)])
def test_token_prepending_matches_hooked_transformers(family, encoder, start, stop, num_layers):
    name, model, path, _ = family
    tp = prompting.add_placeholder(encoder, seed=1)
    pst = tp.tokenizer.backend.token_to_id(prompting.PLACEHOLDER)
    # The official setup: the placeholder added to the tokenizer, the embeddings resized, its row random
    # (ours copied, so that both models hold the same one).
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    hf_tok.add_tokens([prompting.PLACEHOLDER])
    assert hf_tok.convert_tokens_to_ids(prompting.PLACEHOLDER) == pst
    ref = copy.deepcopy(model)  # its config too (resizing changes vocab_size)
    ref.resize_token_embeddings(len(hf_tok))
    table = np.asarray(tp.params["embed"])
    assert table.shape[0] == len(hf_tok) and tp.cfg.vocab_size == len(hf_tok)
    np.testing.assert_array_equal(table[:-1], ref.embed_tokens.weight.detach().numpy()[:-1])
    with torch.no_grad():
        ref.embed_tokens.weight[pst] = torch.tensor(table[pst])

    prompts = _official_prompts(prompting.PROMPTEOL_TP)
    ids = hf_tok(prompts)["input_ids"]
    ours = prompting.last_token_encoder(tp).tokenizer.encode(prompts)  # what encode_token_prepending runs
    assert ids == [e.ids for e in ours] and all(row.count(pst) == 1 for row in ids)
    _, _, last = _pad(ids, 0)
    slots = torch.tensor([row.index(pst) for row in ids])
    layers = range(start, LAYERS if stop is None else stop)
    want = _torch_last(ref, ids, layer=num_layers, hooks=[(ref.layers[i], _tp_hook(slots, last)) for i in layers])

    got = prompting.encode_token_prepending(tp, TEXTS, start=start, stop=stop, num_layers=num_layers, normalize=False)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # The edit matters: the same prompts without it are another embedding.
    off = prompting.encode_with_template(tp, TEXTS, prompting.PROMPTEOL_TP, num_layers=num_layers, normalize=False)
    np.testing.assert_allclose(off, _torch_last(ref, ids, layer=num_layers), atol=1e-4, rtol=0)
    assert np.abs(off - got).max() > 1e-2


def test_token_prepending_off_or_without_placeholder_is_prompteol(family, encoder):
    tp = prompting.add_placeholder(encoder)
    pst = tp.tokenizer.backend.token_to_id(prompting.PLACEHOLDER)
    plain = prompting.encode_with_template(encoder, TEXTS, normalize=False)
    # Adding the placeholder changes nothing else; rows without it are left alone by the option.
    np.testing.assert_allclose(prompting.encode_with_template(tp, TEXTS, normalize=False), plain, atol=1e-6)
    spec = decoder.TokenPrepending(pst, 1, 3)
    np.testing.assert_allclose(
        prompting.encode_with_template(tp, TEXTS, token_prepending=spec, normalize=False), plain, atol=1e-6)
    assert encoder.params["embed"].shape[0] == tp.params["embed"].shape[0] - 1  # the source is not changed
    assert encoder.tokenizer.backend.token_to_id(prompting.PLACEHOLDER) is None
    assert prompting.prepend_placeholder(prompting.PROMPTEOL) == prompting.PROMPTEOL_TP


def _official_steer(a, b, strategy, coeff, num_heads):
    """activation_intervention/__init__.py's hooks at the last token (A: prompt, B: auxiliary prompt)."""
    diff = a - b
    if strategy == "scaled":
        return coeff * diff
    if strategy == "sub_head_norm":
        ah, dh = a.view(len(a), num_heads, -1), diff.view(len(a), num_heads, -1)
        return (dh * ah.norm(dim=-1, keepdim=True) / (dh.norm(dim=-1, keepdim=True) + 1e-7)).reshape(a.shape)
    out = diff * a.norm(dim=-1, keepdim=True) / (diff.norm(dim=-1, keepdim=True) + 1e-7)
    return coeff * out if strategy == "scaled_norm" else out


@pytest.mark.parametrize("family, strategy, num_layers", [
    ("llama", "scaled", None), ("llama", "norm", 3), ("qwen3", "scaled_norm", None), ("qwen3", "sub_head_norm", 3)],
    indirect=["family"])
def test_contrastive_prompting_matches_hooked_transformers(family, encoder, strategy, num_layers):
    _, model, _, tok = family
    layer, coeff = 1, 0.5
    o_proj = model.layers[layer].self_attn.o_proj
    aux_ids = _ids(tok, _official_prompts(prompting.CP_AUXILIARY))
    _, _, aux_last = _pad(aux_ids, 0)
    captured = []

    def capture(module, args):  # get_o_proj_input: the auxiliary prompts' o_proj input
        captured.append(args[0][torch.arange(len(aux_ids)), aux_last].clone())

    _torch_last(model, aux_ids, hooks=[(o_proj, capture)])
    ids = _ids(tok, _official_prompts(prompting.PROMPTEOL))
    _, _, last = _pad(ids, 0)

    def intervene(module, args):  # get_activation_modification_hook, at the last real token
        x = args[0].clone()
        rows = torch.arange(len(ids))
        x[rows, last] = _official_steer(x[rows, last], captured[0], strategy, coeff, model.config.num_attention_heads)
        return (x,)

    want = _torch_last(model, ids, layer=num_layers, hooks=[(o_proj, intervene)])
    got = prompting.encode_contrastive(encoder, TEXTS, layer=layer, coeff=coeff, strategy=strategy,
                                       num_layers=num_layers, normalize=False)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    plain = prompting.encode_with_template(encoder, TEXTS, num_layers=num_layers, normalize=False)
    assert np.abs(plain - got).max() > 1e-2


def test_bad_input_is_refused_clearly(family, encoder):
    with pytest.raises(ValueError, match=r"must contain '\{text\}'"):
        prompting.encode_with_template(encoder, TEXTS, "This sentence means in one word:")
    with pytest.raises(ValueError, match=r"must contain '\{text\}'"):
        prompting.encode_averaged(encoder, TEXTS, [prompting.PROMPTEOL, "no slot"])
    with pytest.raises(ValueError, match="add_placeholder"):
        prompting.encode_token_prepending(encoder, TEXTS)
    tp = prompting.add_placeholder(encoder)
    with pytest.raises(ValueError, match=r"stop=99 must satisfy 0 <= start < stop <= 4"):
        prompting.encode_token_prepending(tp, TEXTS, stop=99)
    with pytest.raises(ValueError, match=r"start=4, stop=None must satisfy"):
        prompting.encode_token_prepending(tp, TEXTS, start=4)
    with pytest.raises(ValueError, match="has no placeholder"):
        prompting.encode_token_prepending(tp, TEXTS, prompting.PROMPTEOL)
    with pytest.raises(ValueError, match="already a token"):
        prompting.add_placeholder(tp)
    with pytest.raises(ValueError, match=r"layer 4 must be in 0\.\.3"):
        prompting.encode_contrastive(encoder, TEXTS, layer=4)
    with pytest.raises(ValueError, match=r"layer 3 must be in 0\.\.2 \(the 3 layers run\)"):
        prompting.encode_contrastive(encoder, TEXTS, layer=3, num_layers=3)
    with pytest.raises(ValueError, match="unknown strategy 'mean'"):
        prompting.encode_contrastive(encoder, TEXTS, layer=1, strategy="mean")
    with pytest.raises(ValueError, match="auxiliary_texts are read only with contrastive_prompting"):
        encoder.encode(TEXTS, auxiliary_texts=TEXTS)
    with pytest.raises(ValueError, match="one auxiliary prompt per text"):
        encoder.encode(TEXTS, contrastive_prompting=decoder.ContrastivePrompting(1), auxiliary_texts=TEXTS[:1])

    # The backbone refuses packed rows (segment_ids), and the two options together.
    pst = tp.tokenizer.backend.token_to_id(prompting.PLACEHOLDER)
    ids = np.ones((2, 8), np.int32)
    mask, segments = np.ones_like(ids), np.tile(np.repeat([1, 2], 4), (2, 1)).astype(np.int32)
    tp_spec, cp_spec = decoder.TokenPrepending(pst), decoder.ContrastivePrompting(1)
    for kw in ({"token_prepending": tp_spec}, {"contrastive_prompting": cp_spec}):
        with pytest.raises(ValueError, match=r"cannot run on packed rows \(segment_ids given\)"):
            decoder.apply(tp.params, tp.cfg, ids, mask, segment_ids=segments, **kw)
    with pytest.raises(ValueError, match="together are not supported"):
        decoder.apply(tp.params, tp.cfg, ids, mask, token_prepending=tp_spec, contrastive_prompting=cp_spec)
    with pytest.raises(ValueError, match="must be even, got 3"):
        decoder.apply(tp.params, tp.cfg, ids[:1].repeat(3, 0), mask[:1].repeat(3, 0), contrastive_prompting=cp_spec)
    with pytest.raises(ValueError, match="outside the embedding"):
        decoder.apply(encoder.params, encoder.cfg, ids, mask, token_prepending=tp_spec)
    # last_token_encoder copies the tokenizer it changes: the encoder still appends its EOS.
    eos = encoder.tokenizer.eos_token_id
    assert prompting.last_token_encoder(encoder).tokenizer.encode(["a b"])[0].ids[-1] != eos
    assert encoder.tokenizer.encode(["a b"])[0].ids[-1] == eos
    with pytest.raises(ValueError, match="not a decoder"):
        prompting.encode_with_template(dataclasses.replace(encoder, cfg=embedjax.BertConfig()), TEXTS)


def test_every_layer_with_the_options(family, encoder):
    """``all_layers`` (embed's ``per_layer``) with either option: the stack's last entry is the
    single-output run's, and a layer's edit shows only where the method says it does."""
    apply = jax.jit(decoder.apply, static_argnums=1, static_argnames=("all_layers", "token_prepending",
                                                                      "contrastive_prompting"))
    enc = prompting.last_token_encoder(prompting.add_placeholder(encoder))
    pst = enc.tokenizer.backend.token_to_id(prompting.PLACEHOLDER)
    batch = enc.tokenizer(prompting.fill(prompting.PROMPTEOL_TP, TEXTS[:2]) + prompting.fill(prompting.CP_AUXILIARY,
                                                                                              TEXTS[:2]))
    ids, mask = batch.input_ids, batch.attention_mask
    plain = np.asarray(apply(enc.params, enc.cfg, ids[:2], mask[:2]))
    cp = decoder.ContrastivePrompting(layer=2, coeff=0.5)
    steered = np.asarray(apply(enc.params, enc.cfg, ids, mask, contrastive_prompting=cp))
    assert steered.shape == plain.shape == (LAYERS + 1, 2, ids.shape[1], 64)
    np.testing.assert_allclose(steered[-1], apply(enc.params, enc.cfg, ids, mask, all_layers=False,
                                                  contrastive_prompting=cp), atol=1e-6)
    real = mask[:2] > 0
    depth, position = np.arange(LAYERS + 1)[:, None, None], np.arange(ids.shape[1])[None, None]
    moved = (np.abs(steered - plain).max(-1) > 1e-5) & real  # (layers + 1, rows, T), on real tokens
    # From layer 2's output on (index 3), at the last token only.
    np.testing.assert_array_equal(moved, (depth >= 3) & (position == real.sum(1)[None, :, None] - 1) & real)
    tp = decoder.TokenPrepending(pst, start=1, stop=3)
    prepended = np.asarray(apply(enc.params, enc.cfg, ids[:2], mask[:2], token_prepending=tp))
    np.testing.assert_allclose(prepended[-1], apply(enc.params, enc.cfg, ids[:2], mask[:2], all_layers=False,
                                                    token_prepending=tp), atol=1e-6)
    slot = list(ids[0]).index(pst)
    assert list(ids[1]).index(pst) == slot
    moved = (np.abs(prepended - plain).max(-1) > 1e-5) & real
    # Layer 1's input is edited: from its output on (index 2), the placeholder and the tokens after it.
    np.testing.assert_array_equal(moved, (depth >= 2) & (position >= slot) & real)
