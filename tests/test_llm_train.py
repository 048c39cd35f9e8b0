"""The decoder-LLM recipe end to end (configs/llm_lora.py:smoke on a tiny random Qwen3):
LoRA trains only the adapters and the latent-attention pooler, 8 devices == 2 hosts with
fsdp x model sharding, the export (adapters merged, pooler, attention mode, prompts) scores
what was selected, the PEFT adapter directory holds the trained adapters, and the step's
per-device memory is checked before it runs -- down to a Mistral-7B-shaped LoRA step that
fits a 16 GiB chip on 8 simulated devices."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

import embedjax
from embedjax import lora, sharding
from embedjax.train import memory
from test_train import loss_curve, run_train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import llm_lora  # noqa: E402

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

CONFIG = "llm_lora.py:smoke=4"


@pytest.fixture(scope="module")
def overrides():
    # GradCache in 2 chunks of 8 (the smoke variant's 4 chunks of 4 prove nothing more) and one
    # checkpoint: fewer collectives, each milliseconds over gloo, in the two-host run (56 -> 42 s).
    return {"log_every": 1, "eval_every": 4, "checkpoint.every": 4, "optim.warmup": 0,
            "objective.gradcache_chunk": 8}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, overrides):
    workdir = tmp_path_factory.mktemp("llm")
    proc = run_train(workdir, overrides, config=CONFIG)
    return workdir, proc.stderr


def _trained_params(workdir: Path, step: int) -> dict:
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, restored["state"]["params"])


def test_only_adapters_and_pooler_train_and_the_export_scores_the_selection(straight):
    workdir, log = straight
    trained = {sharding.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(_trained_params(workdir, 4))}
    assert trained and all(lora.is_adapter(p) or p.startswith("pooler/") for p in trained), sorted(trained)[:5]
    assert any(p.startswith("pooler/") for p in trained) and any(p.endswith("lora_b") for p in trained)
    assert "MiB per device" in log  # the step's memory is logged before it runs (small: in MiB)

    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["best_step"] > 0  # a trained step is exported (SICK trial improves on this seed)
    select = "dev/cosine_spearman"
    # The exported model (adapters merged, pooler, bidirectional attention, prompts) reloads
    # and scores exactly what was selected during training.
    np.testing.assert_allclose(summary["after"][select], summary["best_at_selection"][select], atol=1e-6)
    record = json.loads((workdir / "embedjax_config.json").read_text())
    assert record["attention"] == "bidirectional" and record["pooling"] == "latent_attention"
    enc = embedjax.load_pretrained(workdir)
    assert enc.cfg.attention == "bidirectional" and enc.cfg.lora is None and not enc.include_prompt
    assert enc.prompts["query"] == llm_lora.INSTRUCTION

    # Base weights that LoRA does not touch are exported bit for bit; adapted ones moved by the merge.
    base = load_file(str(Path(llm_lora.tiny_checkpoint()) / "model.safetensors"))
    exported = load_file(str(workdir / "model.safetensors"))
    for name in ("embed_tokens.weight", "norm.weight", "layers.0.input_layernorm.weight"):
        np.testing.assert_array_equal(exported[name], base[name], err_msg=name)
    assert np.abs(exported["layers.0.self_attn.q_proj.weight"] - base["layers.0.self_attn.q_proj.weight"]).max() > 0


def test_peft_adapter_directory_reproduces_the_merged_export(straight):
    """workdir/adapter (PEFT files) over the base checkpoint, merged, equals the exported weights."""
    workdir, _ = straight
    base_params, cfg, _ = embedjax.hf.load_checkpoint(llm_lora.tiny_checkpoint())
    params, cfg = lora.load_peft(workdir / "adapter", base_params, cfg)
    merged, cfg = lora.merge(params, cfg)
    exported, _, _ = embedjax.hf.load_checkpoint(workdir)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(exported)):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_eight_devices_and_two_hosts_with_fsdp_x_model_give_the_same_run(straight, overrides, tmp_path):
    """8 devices of one process (data parallel) and 2 processes x 4 devices with data x fsdp x
    model = 2 x 2 x 2 (the frozen base, adapters and pooler span both hosts): one loss curve, one
    model. The two-host run computes its InfoNCE (hard negatives, GradCache) around the ring of
    its 4 data x fsdp devices, 2 on each host (``objective.negatives_exchange="ring"``), the
    one-process run on gathered candidates. (1 device == 8 devices is test_train's, on the same
    loop and sharding code.)"""
    from test_multihost import TEXTS, launch

    hosts = tmp_path / "hosts"
    for rc, err in launch(hosts, CONFIG, {**overrides, "mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2,
                                          "objective.negatives_exchange": "ring"}, processes=2):
        assert rc == 0, err[-4000:]
    ref = loss_curve(straight[0])
    assert sorted(ref) == [1, 2, 3, 4] and len(set(ref.values())) == 4  # the curve moves
    curve = loss_curve(hosts)
    np.testing.assert_allclose([curve[s] for s in sorted(curve)], [ref[s] for s in sorted(ref)], rtol=1e-4)
    np.testing.assert_allclose(embedjax.load_pretrained(hosts).encode(TEXTS),
                               embedjax.load_pretrained(straight[0]).encode(TEXTS), atol=1e-4)


def test_a_step_that_does_not_fit_is_refused_naming_what_to_change():
    mem = memory.StepMemory(arguments=3 * memory.GiB, outputs=memory.GiB, aliased=memory.GiB,
                            temporaries=14 * memory.GiB, code=0)
    assert mem.peak == 17 * memory.GiB
    memory.check_fits(mem, None, batch_size=64, gradcache_chunk=0, mesh_shape={"fsdp": 1}, remat=False)  # unknown: ok
    memory.check_fits(mem, 18 * memory.GiB, batch_size=64, gradcache_chunk=0, mesh_shape={"fsdp": 1}, remat=False)
    with pytest.raises(MemoryError, match=r"17\.00 GiB per device.*16\.00 GiB.*batch_size \(now 64.*"
                                          r"gradcache_chunk \(now off.*mesh\.fsdp \(now 1"):
        memory.check_fits(mem, 16 * memory.GiB, batch_size=64, gradcache_chunk=0, mesh_shape={"fsdp": 1},
                          remat=False)


def test_the_loop_refuses_a_step_over_its_memory_limit_before_running_it():
    """step.CompiledSteps compiles each batch shape ahead of time and checks it before the first call."""
    from embedjax.train.step import CompiledSteps

    calls = []
    jitted = jax.jit(lambda state, batch, frozen, teacher: (calls.append(1), state + batch["x"].sum())[1])
    batch = {"x": np.ones((256, 256), np.float32)}
    knobs = dict(batch_size=256, gradcache_chunk=0, mesh_shape={"fsdp": 1}, remat=False)
    steps = CompiledSteps(jitted, limit=1024, knobs=knobs)
    with pytest.raises(MemoryError, match=r"MiB per device.*batch_size \(now 256;.*objective.gradcache_chunk"):
        steps(np.float32(0), batch, None)
    assert calls == [1]  # traced once to compile; never run
    fits = CompiledSteps(jitted, limit=None, knobs=knobs)
    assert float(fits(np.float32(0), batch, None)) == 256 * 256


MISTRAL_7B = {  # mistralai/Mistral-7B-v0.1 config.json (architecture fields)
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "sliding_window": 4096, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}


def test_mistral_7b_lora_step_fits_a_16_gib_chip_on_8_devices():
    """configs/llm_lora.py at Mistral-7B shapes (abstract params: nothing allocated), fsdp 4 x model 2:
    batch 64 of 512-token texts with hard negatives, GradCache chunk 8 (benchmarks/README.md)."""
    from embedjax.train import plan

    c = llm_lora.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, 4, 2
    c.batch_size, c.objective.gradcache_chunk, c.max_length = 64, 8, 512
    mem = plan.step_memory(c, MISTRAL_7B)
    print(mem.describe())
    # 7.2B frozen float32 params alone are 3.4 GiB per device at 8-way sharding: the plan must see them.
    assert 3.4 * memory.GiB < mem.arguments and mem.peak < 16 * memory.GiB


def test_a_run_can_start_from_an_existing_peft_adapter(straight):
    """lora.init_from: the adapters of a PEFT directory are the run's starting trainable params."""
    from embedjax.train import encoders
    from embedjax.train.config import LoraConfig

    workdir, _ = straight
    c = llm_lora.get_config("smoke")
    c.lora.init_from = str(workdir / "adapter")
    enc = embedjax.load_pretrained(c.model, pooling=c.pooling, pooler_init=dict(c.pooler_init))
    trainable, frozen, enc = encoders.trainable_params(LoraConfig.from_config(c.lora), enc, seed=c.seed)
    assert enc.cfg.lora.rank == c.lora.rank and enc.cfg.lora.alpha == c.lora.alpha
    saved = load_file(str(workdir / "adapter" / "adapter_model.safetensors"))
    a = np.asarray(trainable["layers"]["attention"]["q"]["lora_a"][1])  # layer 1's (in, r)
    np.testing.assert_array_equal(a, saved["base_model.model.layers.1.self_attn.q_proj.lora_A.weight"].T)
    assert frozen["layers"]["attention"]["q"]["lora_a"] is None and trainable["embed"] is None
