"""embedjax.mntp (LLM2Vec's masked next-token prediction, arXiv:2404.05961) against transformers:

* the LM head (untied ``lm_head.weight``, tied to ``embed_tokens``, Gemma 2's logit soft-capping)
  loaded beside the backbone gives ``*ForCausalLM``'s logits;
* the MNTP loss of a tiny random Llama run bidirectionally equals ``LlamaForCausalLM``'s own
  ``labels=`` loss (the causal-LM shift LLM2Vec's ``LlamaBiForMNTP`` inherits) given a padding-only
  4D mask, chunked or not, and its gradients equal torch autograd's (untied and tied heads);
* the shifted cross-entropy equals a NumPy loop over positions (soft-capping, chunks, packed rows);
* masking: ``mask_tokens_np`` equals ``DataCollatorForLanguageModeling``'s NumPy path draw for draw;
  ``mask_tokens`` (jax.random) has its 80/10/10 split and mask probability, within 5 sigma of the
  rates and of the torch collator's on the same batch, and never touches padding or special tokens;
* the mask token chosen as ``run_mntp.py`` chooses it (``tokenizer.mask_token = "_"``).
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from embedjax import hf, mntp, tiny
from embedjax.encoders import decoder

pytestmark = pytest.mark.fast_compile  # tiny models against references: compile-bound (conftest.py)

V, H, T = 96, 64, 12
LENGTHS = (12, 9, 5)
MASK_ID = 3
COMMON = dict(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager", pad_token_id=0)


def _randomize(model):
    """Weights large enough that every term matters (tests/test_decoders.py's recipe)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"untied" | "tied": (torch LlamaForCausalLM, params, cfg, lm_head, softcap, directory)}."""
    torch.set_num_threads(2)
    out = {}
    for name, tied in (("untied", False), ("tied", True)):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=tied)).eval()
        _randomize(model)
        path = _save(model, tmp_path_factory.mktemp(name))
        params, cfg, _ = hf.load_checkpoint(path)
        lm_head, softcap = mntp.load_lm_head(path)
        out[name] = (model, params, cfg, lm_head, softcap, path)
    return out


def _masked_batch(seed=0):
    """Padded ids, mask, and MNTP inputs / labels made here (not by mntp): ~30% of the real tokens
    predicted (position 0 of row 0 and a row's last real token among them), most replaced by MASK_ID."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(4, V, (len(LENGTHS), T)), 0).astype(np.int32)
    chosen = (rng.random(ids.shape) < 0.3) & (mask > 0)
    chosen[0, 0] = chosen[1, LENGTHS[1] - 1] = chosen[2, 2] = True
    labels = np.where(chosen, ids, -100).astype(np.int32)
    inputs = np.where(chosen & (rng.random(ids.shape) < 0.8), MASK_ID, ids).astype(np.int32)
    return inputs, mask, labels


def _padding_only_4d(mask):
    """transformers' additive 4D mask for bidirectional attention: every query sees every real key."""
    keys = torch.tensor(mask, dtype=torch.bool)[:, None, None, :]
    b, t = mask.shape
    return torch.zeros(b, 1, t, t).masked_fill(~keys, torch.finfo(torch.float32).min)


def _torch_ce_shifted(logits, labels):
    """The causal-LM rule written out: logits[:, :-1] against labels[:, 1:], -100 ignored, mean."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.as_tensor(labels[:, 1:], dtype=torch.long).reshape(-1),
                                             ignore_index=-100)


_jit_loss = jax.jit(mntp.mntp_loss, static_argnums=1,
                    static_argnames=("softcap", "chunk_size", "return_metrics", "remat", "unroll"))


# --------------------------------------------------------------------------- the LM head


def test_lm_head_tied_and_untied_give_transformers_logits(models):
    inputs, mask, _ = _masked_batch()
    apply = jax.jit(decoder.apply, static_argnums=1, static_argnames=("all_layers",))
    logits = jax.jit(mntp.lm_logits, static_argnames=("softcap",))
    for name in ("untied", "tied"):
        model, params, cfg, lm_head, softcap, path = models[name]
        stored = load_file(str(path / "model.safetensors"))
        assert softcap is None
        if name == "tied":
            assert lm_head is None and "lm_head.weight" not in stored
        else:
            np.testing.assert_array_equal(lm_head["weight"], model.lm_head.weight.detach().numpy())
            assert not np.allclose(lm_head["weight"], params["embed"])
        with torch.no_grad():
            want = model(input_ids=torch.tensor(inputs, dtype=torch.long), attention_mask=torch.tensor(mask)).logits
        hidden = apply(params, cfg, inputs, mask, all_layers=False)
        got = np.asarray(logits(params, lm_head, hidden))
        real = mask[..., None] > 0
        np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want.numpy(), 0), atol=2e-5, rtol=1e-5)
    # the other head gives other logits: the comparison above can tell them apart
    _, params, _, untied_head, _, _ = models["untied"]
    assert not np.allclose(np.asarray(logits(params, None, hidden)), np.asarray(logits(params, untied_head, hidden)))


def test_lm_head_errors_and_round_trip(models, tmp_path):
    model, params, cfg, lm_head, _, path = models["untied"]
    state = load_file(str(path / "model.safetensors"))
    assert set(mntp.lm_head_to_state_dict(lm_head)) == {"lm_head.weight"}
    np.testing.assert_array_equal(mntp.lm_head_to_state_dict(lm_head)["lm_head.weight"], state["lm_head.weight"])
    assert mntp.lm_head_to_state_dict(None) == {}
    # an untied config without the head (a base-model save) is refused, naming the tensor
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file({k: v for k, v in state.items() if not k.startswith("lm_head.")}, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match="lm_head.weight"):
        mntp.load_lm_head(tmp_path)
    with pytest.raises(hf.CheckpointError, match="shape"):
        mntp.lm_head_from_state_dict({"lm_head.weight": np.zeros((V + 1, H), np.float32)}, cfg, tied=False)
    # config.json defaults: Llama / Qwen untied, Gemma tied; Gemma 2's soft-capping default
    assert not mntp.tie_word_embeddings({"model_type": "llama"})
    assert mntp.tie_word_embeddings({"model_type": "gemma2"})
    assert mntp.tie_word_embeddings({"model_type": "qwen2", "tie_word_embeddings": True})
    assert mntp.final_logit_softcap({"model_type": "gemma2"}) == 30.0
    assert mntp.final_logit_softcap({"model_type": "gemma2", "final_logit_softcapping": None}) is None
    assert mntp.final_logit_softcap({"model_type": "llama"}) is None


def test_gemma2_final_logit_softcapping_matches_transformers(tmp_path):
    config = transformers.Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                       attn_logit_softcapping=5.0, final_logit_softcapping=2.0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    _save(model, tmp_path)
    params, cfg, _ = hf.load_checkpoint(tmp_path)
    lm_head, softcap = mntp.load_lm_head(tmp_path)
    assert lm_head is None and softcap == 2.0
    inputs, mask, _ = _masked_batch()
    with torch.no_grad():
        want = model(input_ids=torch.tensor(inputs, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    hidden = jax.jit(decoder.apply, static_argnums=1, static_argnames=("all_layers",))(params, cfg, inputs, mask,
                                                                                      all_layers=False)
    got = np.asarray(mntp.lm_logits(params, lm_head, hidden, softcap=softcap))
    real = mask[..., None] > 0
    assert np.abs(want[real[..., 0]]).max() > 1.5  # the cap binds
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the loss


def test_mntp_loss_equals_llama_for_causal_lm_bidirectional_loss(models):
    model, params, cfg, lm_head, _, _ = models["untied"]
    inputs, mask, labels = _masked_batch()
    assert labels[0, 0] != -100  # a label with no predicting position: both sides must drop it
    tids = torch.tensor(inputs, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=tids, attention_mask=_padding_only_4d(mask),
                    labels=torch.tensor(labels, dtype=torch.long))
        causal = model(input_ids=tids, attention_mask=torch.tensor(mask)).logits
    want = out.loss.item()
    assert want == pytest.approx(_torch_ce_shifted(out.logits, labels).item(), rel=1e-6)
    predicted = labels[:, 1:] != -100
    want_acc = (out.logits[:, :-1].argmax(-1).numpy() == labels[:, 1:])[predicted].mean()
    for chunk in (None, 4):
        got, metrics = _jit_loss(params, cfg, lm_head, inputs, mask, labels, chunk_size=chunk, return_metrics=True)
        assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-6), chunk
        assert int(metrics["predictions"]) == predicted.sum()
        assert float(metrics["accuracy"]) == pytest.approx(want_acc, abs=1e-6)
    # what the comparison tells apart: causal attention, unshifted labels
    assert abs(_torch_ce_shifted(causal, labels).item() - want) > 1e-2
    unshifted = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), torch.tensor(labels.reshape(-1),
                                                  dtype=torch.long), ignore_index=-100).item()
    assert abs(unshifted - want) > 1e-2


def _numpy_loss(hidden, labels, w, softcap=None, segment_ids=None):
    """The shifted cross-entropy, one position at a time, in float64."""
    total, count = 0.0, 0
    b, t, _ = hidden.shape
    for i in range(b):
        for j in range(1, t):
            if labels[i, j] == -100 or (segment_ids is not None and segment_ids[i, j] != segment_ids[i, j - 1]):
                continue
            z = w.astype(np.float64) @ hidden[i, j - 1].astype(np.float64)
            if softcap:
                z = softcap * np.tanh(z / softcap)
            z = z - z.max()
            total += -(z[labels[i, j]] - np.log(np.exp(z).sum()))
            count += 1
    return total / count


def test_shifted_loss_equals_a_numpy_loop():
    rng = np.random.default_rng(1)
    b, t, h, v = 3, 11, 16, 50
    hidden = rng.normal(size=(b, t, h)).astype(np.float32)
    w = rng.normal(size=(v, h)).astype(np.float32)
    labels = np.where(rng.random((b, t)) < 0.35, rng.integers(0, v, (b, t)), -100).astype(np.int32)
    labels[2] = -100  # a row predicting nothing
    labels[0, 0] = 7  # never predicted
    labels[1, -1] = 5  # the last position is predicted by the one before
    loss = jax.jit(mntp.shifted_lm_loss, static_argnames=("softcap", "chunk_size", "return_metrics"))
    want = _numpy_loss(hidden, labels, w)
    for chunk in (None, 1, 3, 64):
        assert float(loss(hidden, labels, w, chunk_size=chunk)) == pytest.approx(want, rel=1e-5), chunk
    want_cap = _numpy_loss(hidden, labels, w, softcap=3.0)
    assert abs(want_cap - want) > 0.1
    for chunk in (None, 3):
        assert float(loss(hidden, labels, w, softcap=3.0, chunk_size=chunk)) == pytest.approx(want_cap, rel=1e-5)
    # packed rows: a text's first token is not predicted from the previous text's last
    seg = np.repeat(np.array([[1] * 4 + [2] * 5 + [0] * 2]), b, axis=0).astype(np.int32)
    labels_seg = labels.copy()
    labels_seg[:, 4] = 9
    want_seg = _numpy_loss(hidden, labels_seg, w, segment_ids=seg)
    assert abs(want_seg - _numpy_loss(hidden, labels_seg, w)) > 1e-3
    for chunk in (None, 3):
        got = mntp.shifted_lm_loss(hidden, labels_seg, w, segment_ids=seg, chunk_size=chunk)
        assert float(got) == pytest.approx(want_seg, rel=1e-5)
    assert float(mntp.shifted_lm_loss(hidden, np.full((b, t), -100), w, chunk_size=3)) == 0.0


def _torch_grads(model, inputs, mask, labels, names):
    model.zero_grad()
    out = model(input_ids=torch.tensor(inputs, dtype=torch.long), attention_mask=_padding_only_4d(mask),
                labels=torch.tensor(labels, dtype=torch.long))
    out.loss.backward()
    got = dict(model.named_parameters())
    return {n: got[n].grad.numpy().copy() for n in names}


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_gradients_equal_torch_autograd(models, name):
    model, params, cfg, lm_head, _, _ = models[name]
    inputs, mask, labels = _masked_batch(seed=2)
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.mlp.down_proj.weight", "model.norm.weight"] + (["lm_head.weight"] if lm_head else [])
    want = _torch_grads(model, inputs, mask, labels, names)
    grad = jax.jit(jax.grad(mntp.mntp_loss, argnums=(0, 2)), static_argnums=1, static_argnames=("chunk_size",))
    for chunk in ((None, 5) if name == "untied" else (5,)):
        gp, gh = grad(params, cfg, lm_head, inputs, mask, labels, chunk_size=chunk)
        got = {"model.embed_tokens.weight": gp["embed"],
               "model.layers.0.self_attn.q_proj.weight": gp["layers"]["attention"]["q"]["kernel"][0].T,
               "model.layers.1.mlp.down_proj.weight": gp["layers"]["mlp"]["down"]["kernel"][1].T,
               "model.norm.weight": gp["final_norm"]["scale"]}
        if lm_head is not None:
            got["lm_head.weight"] = gh["weight"]
        for n in names:
            scale = np.abs(want[n]).max()
            assert scale > 1e-4, n
            np.testing.assert_allclose(np.asarray(got[n]), want[n], atol=1e-5 * max(scale, 1.0), rtol=1e-4,
                                       err_msg=f"{n} chunk={chunk}")


def test_mntp_loss_with_lora_equals_peft_and_trains_only_the_adapters(models, tmp_path):
    """LLM2Vec's MNTP trains LoRA adapters on the base model: our adapters (B made non-zero), saved
    as a PEFT directory, loaded by PEFT onto the torch model's base model and merged there."""
    import peft

    from embedjax import lora

    model, params, cfg, lm_head, _, _ = models["untied"]
    lparams, lcfg = lora.attach(params, cfg, lora.LoraSpec(rank=4, alpha=8.0), jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    lparams = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.2 * jax.random.normal(next(keys), x.shape) if lora.is_adapter(path) and
        "lora_b" in jax.tree_util.keystr(path) else x, lparams)
    lora.save_peft(tmp_path, lparams, lcfg)
    torch_lm = copy.deepcopy(model)
    torch_lm.model = peft.PeftModel.from_pretrained(torch_lm.model, tmp_path).merge_and_unload()
    inputs, mask, labels = _masked_batch(seed=3)
    with torch.no_grad():
        want = torch_lm(input_ids=torch.tensor(inputs, dtype=torch.long), attention_mask=_padding_only_4d(mask),
                        labels=torch.tensor(labels, dtype=torch.long)).loss.item()
        base = model(input_ids=torch.tensor(inputs, dtype=torch.long), attention_mask=_padding_only_4d(mask),
                     labels=torch.tensor(labels, dtype=torch.long)).loss.item()
    assert abs(want - base) > 1e-3
    assert float(_jit_loss(lparams, lcfg, lm_head, inputs, mask, labels, chunk_size=4)) == pytest.approx(want, rel=1e-5)
    trainable, frozen = lora.partition(lparams)
    grads = jax.grad(lambda t: mntp.mntp_loss(lora.combine(t, frozen), lcfg, lm_head, inputs, mask, labels))(trainable)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)]
    assert paths and all("lora_" in p for p in paths)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------- masking


def _fast_tokenizer(mask_token=None):
    texts = ["the quick brown fox jumps over the lazy dog", "snake_case and under_score names", "hello there"] * 4
    tok = tiny.train_tokenizer(texts, 300, add_bos=True)
    extra = {"mask_token": mask_token} if mask_token else {}
    if mask_token:
        tok.add_special_tokens([mask_token])
    return tok, transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=tiny.BOS, eos_token=tiny.EOS,
                                                     pad_token=tiny.PAD, **extra)


def _llm2vec_tokenizer(fast):
    """run_mntp.py's assignments on a copy: mask token "_" (blank) when there is none, pad = eos when none."""
    fast = copy.deepcopy(fast)
    if fast.mask_token is None:
        fast.mask_token = "_"
    if fast.pad_token is None:
        fast.pad_token = fast.eos_token
    return fast


def test_mask_token_and_special_ids_as_run_mntp_chooses_them():
    tok, fast = _fast_tokenizer()
    reference = _llm2vec_tokenizer(fast)
    assert fast.mask_token is None and reference.mask_token_id == tok.token_to_id("_")
    assert mntp.mask_token_id(fast) == reference.mask_token_id
    assert mntp.special_token_ids(fast) == tuple(sorted(reference.all_special_ids))
    assert reference.mask_token_id in mntp.special_token_ids(fast)
    nopad = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=tiny.BOS, eos_token=tiny.EOS)
    assert mntp.special_token_ids(nopad) == tuple(sorted(_llm2vec_tokenizer(nopad).all_special_ids))
    assert mntp.mask_token_id(fast, "eos") == fast.eos_token_id
    # the tokenizers backend and embedjax's Tokenizer know no roles: the blank token, by id
    assert mntp.mask_token_id(tok) == reference.mask_token_id
    from embedjax.tokenize import Tokenizer

    assert mntp.mask_token_id(Tokenizer(tok, 32, fast.pad_token_id)) == reference.mask_token_id
    assert set(mntp.special_token_ids(tok)) == {*fast.all_special_ids, reference.mask_token_id}
    # a tokenizer with its own mask token keeps it
    _, own = _fast_tokenizer(mask_token="<mask>")
    assert mntp.mask_token_id(own) == own.convert_tokens_to_ids("<mask>") != reference.mask_token_id
    with pytest.raises(ValueError, match="mask_token_type"):
        mntp.mask_token_id(fast, "mask")


def _examples(fast, n=24, seed=0):
    rng = np.random.default_rng(seed)
    words = ["the", "quick", "brown", "fox", "snake_case", "lazy", "dog", "hello", "there", "under_score"]
    texts = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(n)]
    return [fast(t, return_special_tokens_mask=True) for t in texts]


@pytest.mark.parametrize("rates", [(0.8, 0.1), (1.0, 0.0), (0.5, 0.4)])
@pytest.mark.parametrize("with_special_mask", [False, True])
def test_mask_tokens_np_equals_the_transformers_collator_draw_for_draw(rates, with_special_mask):
    _, fast = _fast_tokenizer()
    fast = _llm2vec_tokenizer(fast)
    replace, random = rates
    examples = _examples(fast)
    if not with_special_mask:  # the collator then excludes all_special_ids
        examples = [{"input_ids": e["input_ids"]} for e in examples]
    collator = transformers.DataCollatorForLanguageModeling(fast, mlm_probability=0.3, mask_replace_prob=replace,
                                                            random_replace_prob=random, return_tensors="np", seed=7)
    padded = fast.pad([dict(e) for e in examples], return_tensors="np")
    want = collator(examples)
    special = dict(special_ids=fast.all_special_ids) if not with_special_mask else dict(
        special_mask=padded["special_tokens_mask"])
    got_ids, got_labels = mntp.mask_tokens_np(np.random.default_rng(7), padded["input_ids"], padded["attention_mask"],
                                              probability=0.3, mask_token_id=fast.mask_token_id, vocab_size=len(fast),
                                              replace=replace, random=random, **special)
    np.testing.assert_array_equal(got_labels, want["labels"])
    np.testing.assert_array_equal(got_ids, want["input_ids"])
    assert (got_labels != -100).sum() > 20
    if with_special_mask:  # the tokenizer marks only BOS and padding: a "_" of the text may be chosen
        underscore = padded["input_ids"] == fast.mask_token_id
        assert underscore.any() and (padded["special_tokens_mask"][underscore] == 0).all()


def _big_batch(b=64, t=256, seed=0):
    """Random ids with padding (random lengths) and special ids 0..2 scattered among the real tokens;
    the padding holds an ordinary id (7): only the attention mask says it is padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 4, t + 1, b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(3, V, (b, t))
    ids = np.where(rng.random((b, t)) < 0.05, rng.integers(0, 3, (b, t)), ids)
    ids = np.where(mask > 0, ids, 7).astype(np.int32)
    return ids, mask


def _rates(ids, mask, inputs, labels, special=(0, 1, 2)):
    """(chosen / maskable, then among chosen: mask token, kept, other) and the counts."""
    maskable = (mask > 0) & ~np.isin(ids, special)
    chosen = labels != -100
    n = chosen.sum()
    return dict(p=n / maskable.sum(), mask=(inputs[chosen] == MASK_ID).mean(),
                keep=(inputs[chosen] == ids[chosen]).mean(),
                other=((inputs[chosen] != MASK_ID) & (inputs[chosen] != ids[chosen])).mean(), n=n, m=maskable.sum())


def test_mask_tokens_rules_and_split_match_the_collator_in_distribution():
    ids, mask = _big_batch()
    p, special = 0.2, (0, 1, 2)
    run = jax.jit(mntp.mask_tokens, static_argnames=("probability", "mask_token_id", "vocab_size", "special_ids",
                                                     "replace", "random"))
    kw = dict(probability=p, mask_token_id=MASK_ID, vocab_size=V, special_ids=special)
    inputs, labels = (np.asarray(a) for a in run(jax.random.key(0), ids, mask, **kw))
    assert inputs.dtype == labels.dtype == np.int32
    maskable = (mask > 0) & ~np.isin(ids, special)
    chosen = labels != -100
    # never padding or specials; labels exactly the original id where chosen; the rest untouched
    assert not chosen[~maskable].any()
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
    ours = _rates(ids, mask, inputs, labels)
    n, m = ours["n"], ours["m"]
    sigma = lambda q, k: 5 * np.sqrt(q * (1 - q) / k)  # noqa: E731
    assert abs(ours["p"] - p) < sigma(p, m)
    random_keeps = 0.1 / V  # a random draw may give the original back (or the mask token)
    assert abs(ours["mask"] - (0.8 + 0.1 / V)) < sigma(0.8, n)
    assert abs(ours["keep"] - (0.1 + random_keeps)) < sigma(0.1, n)
    assert abs(ours["other"] - 0.1) < sigma(0.1, n)
    others = inputs[chosen & (inputs != MASK_ID) & (inputs != ids)]
    assert others.min() >= 0 and others.max() < V
    assert abs(others.mean() - (V - 1) / 2) < 5 * V / np.sqrt(12 * len(others))  # uniform over the vocabulary
    # the host twin follows the same rules
    np_inputs, np_labels = mntp.mask_tokens_np(np.random.default_rng(0), ids, mask, **kw)
    assert not (np_labels != -100)[~maskable].any()
    np.testing.assert_array_equal(np_inputs[np_labels == -100], ids[np_labels == -100])
    host = _rates(ids, mask, np_inputs, np_labels)
    assert abs(host["p"] - p) < sigma(p, m) and abs(host["mask"] - 0.8) < sigma(0.8, host["n"])
    # transformers' torch collator on the same batch: the same rates within 5 two-sample sigmas
    _, fast = _fast_tokenizer()
    fast = copy.deepcopy(fast)
    fast.add_special_tokens({"mask_token": fast.convert_ids_to_tokens(MASK_ID)})
    torch.manual_seed(0)
    collator = transformers.DataCollatorForLanguageModeling(fast, mlm_probability=p, return_tensors="pt")
    batch = collator([{"input_ids": list(map(int, row)), "special_tokens_mask": list(map(int, ~ok))}
                      for row, ok in zip(ids, maskable)])
    theirs = _rates(ids, mask, batch["input_ids"].numpy(), batch["labels"].numpy())
    assert not (batch["labels"].numpy() != -100)[~maskable].any()
    for key, base in (("p", m), ("mask", n), ("keep", n), ("other", n)):
        q = (ours[key] + theirs[key]) / 2
        assert abs(ours[key] - theirs[key]) < 5 * np.sqrt(2 * q * (1 - q) / base), key
    # deterministic per key; another key, another draw
    again = np.asarray(run(jax.random.key(0), ids, mask, **kw)[1])
    np.testing.assert_array_equal(again, labels)
    assert not np.array_equal(np.asarray(run(jax.random.key(1), ids, mask, **kw)[1]), labels)
    # LLM2Vec's all_mask collator: every chosen token is the mask token; probability 0 / 1
    full, full_labels = (np.asarray(a) for a in run(jax.random.key(0), ids, mask, **{**kw, "replace": 1.0,
                                                                                     "random": 0.0}))
    assert (full[full_labels != -100] == MASK_ID).all()
    assert (np.asarray(run(jax.random.key(0), ids, mask, **{**kw, "probability": 0.0})[1]) == -100).all()
    every = np.asarray(run(jax.random.key(0), ids, mask, **{**kw, "probability": 1.0})[1])
    np.testing.assert_array_equal(every != -100, maskable)
    with pytest.raises(ValueError, match="exceed"):
        mntp.mask_tokens(jax.random.key(0), ids, mask, **{**kw, "replace": 0.8, "random": 0.3})
