"""LLM2Vec's MNTP as a training objective (``objective.loss="mntp"``, embedjax.train.mntp_objective)
and the two-stage recipe (configs/llm2vec_mntp.py -> configs/llm2vec_simcse.py):

* the train step's loss on a pipeline batch (padded, and packed) equals transformers'
  ``LlamaForCausalLM(labels=...)`` loss, run with a padding-only (bidirectional) 4D mask, on the
  batch the step masked; the masking follows ``run_mntp.py``'s rules (its mask token "_", never BOS
  or padding, labels only where chosen) and is a function of the seed and step alone;
* what the objective refuses: pairs, an encoder-only backbone, causal attention, an untied
  checkpoint without an LM head, options it does not know;
* the LM head: frozen under LoRA, trained without; dropped from the export;
* the chain end to end on a tiny random Llama: stage 1 trains only LoRA adapters and exports a model
  that loads bidirectional; stage 2 starts from that export (its start scores what stage 1's export
  scored) and trains.
"""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from embedjax import tiny

pytestmark = pytest.mark.fast_compile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXTS = [
    "A man is playing a flute while his dog sleeps.",
    "Vitamin D deficiency is associated with higher risk of fractures in elderly patients.",
    "The cat sat.",
    "Protein folding depends on temperature, pH and the solvent's ionic strength!",
    "snake_case names use an under_score between words",
    "Two dogs run through the snow in the park.",
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random LlamaForCausalLM with its own LM head (weights large enough that every term
    matters), saved with a small BPE tokenizer as a checkpoint directory."""
    directory = tmp_path_factory.mktemp("tiny_llama_lm")
    tok = tiny.train_tokenizer(TEXTS * 3, 200, add_bos=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": tiny.EOS, "pad_token": tiny.PAD, "bos_token": tiny.BOS,
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}))
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        pad_token_id=tok.token_to_id(tiny.PAD), bos_token_id=tok.token_to_id(tiny.BOS),
        eos_token_id=tok.token_to_id(tiny.EOS), attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


def _section(**changes):
    from configs import base

    section = base.base_config().objective.to_dict()
    section.update({"loss": "mntp", "loss_kwargs": {}, "dropout": False, **changes})
    return section


def _objective(encoder, **changes):
    from embedjax.train.mntp_objective import resolve
    from embedjax.train.objective import Objective

    return resolve(Objective.from_config(_section(**changes), encoder.pooling), encoder)


def _encoder(directory, attention="bidirectional"):
    from embedjax.model import load_pretrained
    from embedjax.train.mntp_objective import add_lm_head

    return add_lm_head(load_pretrained(directory, pooling="mean", attention=attention))


def _llm2vec_tokenizer(directory):
    """run_mntp.py's tokenizer: the checkpoint's, with mask token "_" (blank) when it has none."""
    fast = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert fast.mask_token is None
    fast.mask_token = "_"
    return fast


def _step(encoder, objective, batch, step=0, seed=0):
    """``train_step`` at ``step`` (the optimizer does nothing): its metrics."""
    from embedjax.train.state import TrainState
    from embedjax.train.step import train_step

    state = TrainState.create(encoder.params, optax.sgd(0.0), seed)
    state = state.replace(step=jnp.int32(step))
    _, metrics = jax.jit(lambda s, b: train_step(s, b, enc_cfg=encoder.cfg, objective=objective,
                                                 tx=optax.sgd(0.0)))(state, batch)
    return {k: np.asarray(v) for k, v in metrics.items()}, jax.random.fold_in(state.rng, state.step)


def _masked(objective, ids, mask, step_key):
    from embedjax.train.mntp_objective import masked_inputs, split_key

    inputs, labels = masked_inputs(objective.mntp, jnp.asarray(ids), jnp.asarray(mask), split_key(step_key)[0])
    return np.asarray(inputs), np.asarray(labels)


def _padding_only_4d(mask):
    keys = torch.tensor(mask, dtype=torch.bool)[:, None, None, :]
    b, t = mask.shape
    return torch.zeros(b, 1, t, t).masked_fill(~keys, torch.finfo(torch.float32).min)


def _check_masking_rules(ids, mask, inputs, labels, mask_id, bos):
    chosen = labels != -100
    assert chosen.sum() >= 8
    assert not chosen[mask == 0].any() and not chosen[ids == bos].any()  # never padding or the tokenizer's BOS
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])
    assert (inputs[chosen] == mask_id).mean() > 0.5  # most chosen tokens became the mask token


# --------------------------------------------------------------------------- the loss of a train step


def test_the_train_step_loss_equals_llama_for_causal_lm_on_the_batch_it_masked(llama):
    from embedjax.data import pipeline

    directory, model = llama
    encoder = _encoder(directory)
    objective = _objective(encoder, loss_kwargs={"probability": 0.4})
    fast = _llm2vec_tokenizer(directory)
    assert objective.mntp.mask_token_id == fast.mask_token_id == fast.convert_tokens_to_ids("_")
    assert objective.mntp.vocab_size == len(fast) and not objective.mntp.tied
    it = pipeline.train_pipeline(TEXTS, encoder.tokenizer.replace(buckets=(32,)), global_batch_size=len(TEXTS),
                                 seed=0, common_length=True)
    batch = next(it).model_inputs()
    assert batch.packed is None and batch.b is None
    ids, mask = np.asarray(batch.a.ids), np.asarray(batch.a.mask)
    real = mask.sum(1) > 0
    assert real.sum() == len(TEXTS) and (mask[real] == 0).any() and (ids[real, 0] == fast.bos_token_id).all()
    metrics, key = _step(encoder, objective, jax.tree.map(jnp.asarray, batch), step=3)
    inputs, labels = _masked(objective, ids, mask, key)
    _check_masking_rules(ids, mask, inputs, labels, fast.mask_token_id, fast.bos_token_id)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(inputs, dtype=torch.long), attention_mask=_padding_only_4d(mask),
                    labels=torch.tensor(labels, dtype=torch.long))
        causal = model(input_ids=torch.tensor(inputs, dtype=torch.long), attention_mask=torch.tensor(mask),
                       labels=torch.tensor(labels, dtype=torch.long)).loss.item()
    assert float(metrics["loss"]) == pytest.approx(out.loss.item(), rel=1e-5)
    predicted = labels[:, 1:] != -100
    assert int(metrics["mntp_predictions"]) == predicted.sum()
    accuracy = (out.logits[:, :-1].argmax(-1).numpy() == labels[:, 1:])[predicted].mean()
    assert float(metrics["mntp_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    assert abs(causal - out.loss.item()) > 1e-2  # the comparison tells causal attention apart
    # the masks are the seed's and the step's: the same again, others at another step or seed
    again, _ = _step(encoder, objective, jax.tree.map(jnp.asarray, batch), step=3)
    assert float(again["loss"]) == float(metrics["loss"])
    for step, seed in ((4, 0), (3, 1)):
        other, other_key = _step(encoder, objective, jax.tree.map(jnp.asarray, batch), step=step, seed=seed)
        assert not np.array_equal(_masked(objective, ids, mask, other_key)[1], labels)
        assert float(other["loss"]) != float(metrics["loss"])


def test_a_packed_batch_predicts_each_text_alone(llama):
    """Packed rows: the loss equals transformers' over every text run in a row of its own (no
    attention across texts, no text predicting the next one's first token), pooled over the batch."""
    from embedjax.data import pipeline

    directory, model = llama
    encoder = _encoder(directory)
    objective = _objective(encoder, loss_kwargs={"probability": 0.5, "chunk_size": 4})
    it = pipeline.train_pipeline(TEXTS, encoder.tokenizer.replace(buckets=(32,)), global_batch_size=len(TEXTS),
                                 seed=0, common_length=True, packing=pipeline.Packing(length=48, rows_multiple=1))
    batch = next(it).model_inputs()
    rows = batch.packed
    segments = np.asarray(rows.segments)
    assert max(len(set(r[r > 0])) for r in segments) >= 2  # some row holds several texts
    metrics, key = _step(encoder, objective, jax.tree.map(jnp.asarray, batch))
    inputs, labels = _masked(objective, np.asarray(rows.ids), (segments > 0).astype(np.int32), key)
    total, count = 0.0, 0
    for r, row in enumerate(segments):
        for s in sorted(set(row[row > 0])):
            where = np.flatnonzero(row == s)
            x, y = inputs[r, where], labels[r, where]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor(x[None], dtype=torch.long),
                               attention_mask=_padding_only_4d(np.ones((1, len(x)), np.int32))).logits[0]
            keep = torch.tensor(y[1:] != -100)
            ce = torch.nn.functional.cross_entropy(logits[:-1][keep], torch.tensor(y[1:], dtype=torch.long)[keep],
                                                   reduction="sum")
            total, count = total + ce.item(), count + int(keep.sum())
    assert count > 10 and int(metrics["mntp_predictions"]) == count
    assert float(metrics["loss"]) == pytest.approx(total / count, rel=1e-5)


# --------------------------------------------------------------------------- refusals


def test_mntp_refuses_what_it_cannot_train(llama, tmp_path):
    from embedjax import hf
    from embedjax.data import pipeline
    from embedjax.data.noise import DeletionNoise
    from embedjax.data.readers import Pair
    from embedjax.encoders import bert
    from embedjax.model import Encoder
    from embedjax.train import mntp_objective
    from embedjax.train.loss_specs import check_objective_data
    from embedjax.train.objective import Objective, batch_loss

    directory, _ = llama
    encoder = _encoder(directory)
    objective = _objective(encoder)
    # pairs (or damaged copies) are not single texts
    with pytest.raises(ValueError, match="single texts"):
        check_objective_data(objective, ("text_a", "text_b"))
    with pytest.raises(ValueError, match="single texts"):
        check_objective_data(objective, pipeline.fields_of(DeletionNoise(TEXTS, 0.6)))
    check_objective_data(objective, pipeline.fields_of(TEXTS))
    pair_batch = next(pipeline.train_pipeline([Pair(t, t) for t in TEXTS], encoder.tokenizer.replace(buckets=(32,)),
                                              global_batch_size=len(TEXTS), seed=0, common_length=True))
    with pytest.raises(ValueError, match="second side"):
        batch_loss(encoder.params, encoder.cfg, objective, pair_batch.model_inputs(), jax.random.key(0))
    # an encoder-only backbone, causal attention
    bert_encoder = Encoder(params={}, cfg=bert.BertConfig(), tokenizer=encoder.tokenizer)
    for call in (lambda: mntp_objective.add_lm_head(bert_encoder), lambda: mntp_objective.resolve(objective,
                                                                                                     bert_encoder)):
        with pytest.raises(ValueError, match="not a decoder backbone"):
            call()
    causal = _encoder(directory, attention="causal")
    with pytest.raises(ValueError, match="attention='bidirectional'"):
        _objective(causal)
    # an untied checkpoint without its head; the loss without the head it needs
    headless = tmp_path / "headless"
    tiny.write_random_checkpoint(headless, "llama", texts=TEXTS, vocab_size=200, tie_word_embeddings=False)
    with pytest.raises(hf.CheckpointError, match="lm_head.weight"):
        _encoder(headless)
    tied = _encoder(tiny.write_random_checkpoint(tmp_path / "tied", "llama", texts=TEXTS, vocab_size=200))
    assert "lm_head" not in tied.params and _objective(tied).mntp.tied  # the embedding is the head: nothing added
    params = mntp_objective.without_lm_head(encoder.params)
    batch = next(pipeline.train_pipeline(TEXTS, encoder.tokenizer.replace(buckets=(32,)), global_batch_size=4,
                                         seed=0, common_length=True)).model_inputs()
    with pytest.raises(ValueError, match="LM head"):
        batch_loss(params, encoder.cfg, objective, batch, jax.random.key(0))
    with pytest.raises(ValueError, match="resolved"):
        batch_loss(encoder.params, encoder.cfg, dataclasses.replace(objective, mntp=None), batch, jax.random.key(0))
    # options
    for kwargs, match in (({"scale": 20.0}, "unknown objective.loss_kwargs"), ({"probability": 1.5}, r"\[0, 1\]"),
                          ({"replace": 0.8, "random": 0.3}, "must not exceed 1"),
                          ({"mask_token": "mask"}, "mask_token"), ({"chunk_size": 0}, "chunk_size")):
        with pytest.raises(ValueError, match=match):
            Objective.from_config(_section(loss_kwargs=kwargs), "mean")
    with pytest.raises(ValueError, match="wrap losses of embeddings"):
        Objective.from_config(_section(matryoshka_dims=(8,)), "mean")
    # the EOS as mask token; the tokenizer's own mask token wins over both
    eos_id = encoder.tokenizer.backend.token_to_id(tiny.EOS)
    assert _objective(encoder, loss_kwargs={"mask_token": "eos"}).mntp.mask_token_id == eos_id
    own = tmp_path / "own_mask"
    own.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (own / name).write_bytes((directory / name).read_bytes())
    record = json.loads((directory / "tokenizer_config.json").read_text())
    (own / "tokenizer_config.json").write_text(json.dumps({**record, "mask_token": tiny.PAD}))
    assert _objective(_encoder(own)).mntp.mask_token_id == encoder.tokenizer.backend.token_to_id(tiny.PAD)


# --------------------------------------------------------------------------- the LM head's place


def test_the_lm_head_is_frozen_under_lora_trained_without_and_sharded_like_the_embedding(llama):
    from embedjax import lora, sharding
    from embedjax.train import encoders
    from embedjax.train.mntp_objective import LM_HEAD

    directory, _ = llama
    encoder = _encoder(directory)
    assert encoder.params[LM_HEAD]["weight"].shape == (encoder.cfg.vocab_size, encoder.cfg.hidden_size)
    lparams, lcfg = lora.attach(encoder.params, encoder.cfg, lora.LoraSpec(rank=2, alpha=4.0), jax.random.key(0))
    trainable, frozen = encoders.split_trainable(lparams, adapters_only=True)
    names = lambda tree: {sharding.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
    assert "lm_head/weight" in names(frozen) and "lm_head/weight" not in names(trainable)
    assert names(trainable) and all("lora_" in n for n in names(trainable))
    trainable, _ = encoders.split_trainable(encoder.params, adapters_only=False)
    assert "lm_head/weight" in names(trainable)
    mesh = sharding.make_mesh(data=1, fsdp=jax.device_count())
    specs = sharding.param_specs(encoder.params, mesh, sharding.rules_for(encoder.cfg, "fsdp"))
    assert specs[LM_HEAD]["weight"] == specs["embed"] == jax.sharding.PartitionSpec(None, "fsdp")


# --------------------------------------------------------------------------- the two stages


def _small_sts(tmp_path):
    from configs import base

    lines = (base.DATA / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "sts-small.csv"
    path.write_text("\n".join(lines[:48]) + "\n", encoding="utf-8")
    return str(path)


def test_llm2vec_chain_mntp_with_lora_then_simcse_on_its_export(llama, tmp_path):
    from safetensors.numpy import load_file

    from configs import llm2vec_mntp, llm2vec_simcse
    from embedjax import lora
    from embedjax.model import load_pretrained
    from embedjax.train import encoders
    from embedjax.train.loop import train_and_evaluate

    directory, _ = llama
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 4) + "\n")
    sts = _small_sts(tmp_path)

    c = llm2vec_mntp.get_config(f"smoke=2,file={corpus}")
    c.model = str(directory)
    c.max_length = 32
    c.data.pack_length = 32
    c.batch_size = 8
    c.optim.learning_rate = 1e-2
    c.evals.dev.path = sts
    first = train_and_evaluate(c, tmp_path / "mntp")
    key = "dev/cosine_spearman"
    assert first["before"] is None and np.isfinite(first["after"][key])
    logged = [json.loads(line) for line in (tmp_path / "mntp" / "metrics.jsonl").read_text().splitlines()]
    assert any("mntp_accuracy" in m for m in logged)
    # only the adapters trained: the checkpoint holds them and no LM head; they moved from their start
    tree = json.loads((tmp_path / "mntp" / "checkpoints" / "2" / "state" / "_METADATA").read_text())["tree_metadata"]
    stored = {k for k, v in tree.items() if k.startswith("('params'") and v["value_metadata"]["value_type"] != "None"}
    assert stored and all("lora_" in k for k in stored)  # a frozen leaf is a None placeholder
    assert any("'lm_head'" in k for k in tree) and not any("'lm_head'" in k for k in stored)
    adapter = load_file(str(tmp_path / "mntp" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and np.abs(v).max() > 0 for k, v in adapter.items())  # lora_b starts at zero
    # the export: merged, without the LM head, bidirectional, and it embeds as the merged model does
    exported = load_file(str(tmp_path / "mntp" / "model.safetensors"))
    start = load_file(str(directory / "model.safetensors"))
    assert not any("lm_head" in k for k in exported)
    q = next(k for k in exported if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert not np.allclose(exported[q], start["model." + q.removeprefix("model.")])
    assert json.loads((tmp_path / "mntp" / "embedjax_config.json").read_text())["attention"] == "bidirectional"
    reloaded = load_pretrained(tmp_path / "mntp")
    assert reloaded.cfg.attention == "bidirectional" and reloaded.cfg.lora is None
    base = load_pretrained(directory, pooling="mean", attention="bidirectional", max_length=32)
    assert reloaded.max_length == 32
    peft_params, peft_cfg = lora.load_peft(tmp_path / "mntp" / "adapter", base.params, base.cfg)
    merged, merged_cfg = lora.merge(peft_params, peft_cfg)
    mine = dataclasses.replace(base, params=merged, cfg=merged_cfg).encode(TEXTS[:3], normalize=True)
    np.testing.assert_allclose(reloaded.encode(TEXTS[:3]), mine, atol=1e-5)
    causal = dataclasses.replace(reloaded, cfg=dataclasses.replace(reloaded.cfg, attention="causal"))
    assert not np.allclose(causal.encode(TEXTS[:3]), mine, atol=1e-3)
    best = encoders.best_checkpoint_encoder(tmp_path / "mntp")  # the run's tree, LM head placeholder included
    assert best.step == 2 and "lm_head" not in best.encoder.params
    np.testing.assert_allclose(best.encoder.encode(TEXTS[:3]), mine, atol=1e-5)

    s = llm2vec_simcse.get_config(f"smoke=2,init_from={tmp_path / 'mntp'},file={corpus}")
    assert s.model == str(tmp_path / "mntp")
    s.max_length = 32
    s.batch_size = 8
    s.evals.dev.path = sts
    second = train_and_evaluate(s, tmp_path / "simcse")
    assert second["before"][key] == pytest.approx(first["after"][key], abs=1e-4)  # it starts where stage 1 ended
    assert np.isfinite(second["after"][key]) and second["steps"] == 2
    assert json.loads((tmp_path / "simcse" / "embedjax_config.json").read_text())["attention"] == "bidirectional"


def test_plan_counts_the_lm_head_and_the_logits_chunks(llama):
    """``plan.step_memory`` of an MNTP config: the untied head is an argument (frozen under LoRA), and
    chunking the logits shrinks the temporaries by about the (B, T, V) float32 block it avoids."""
    from configs import llm2vec_mntp
    from embedjax import sharding
    from embedjax.train import plan

    directory, _ = llama
    hf_config = {**json.loads((directory / "config.json").read_text()), "vocab_size": 8192}
    c = llm2vec_mntp.get_config("smoke")
    c.model = str(directory)
    c.batch_size = 16
    c.objective.remat = False
    one = sharding.make_mesh(devices=jax.devices()[:1])
    chunked = plan.step_memory(c, hf_config, length=128, mesh=one)
    c.objective.loss_kwargs = {**c.objective.loss_kwargs.to_dict(), "chunk_size": None}
    whole = plan.step_memory(c, hf_config, length=128, mesh=one)
    logits = 16 * 127 * 8192 * 4  # the (B, T - 1, V) float32 logits of the batch
    assert whole.temporaries - chunked.temporaries > logits // 2
    tied = plan.step_memory(c, {**hf_config, "tie_word_embeddings": True}, length=128, mesh=one)
    assert whole.arguments - tied.arguments >= 8192 * 32 * 4  # the untied head's (V, H) float32
