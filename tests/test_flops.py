"""Model FLOPs and MFU (``embedjax/train/flops.py``): the analytic count against the matrix
products of the compiled train step (read from its HLO) and against XLA's cost analysis, the
fallback when XLA's count is missing or short, the peak table, the CPU peak, and the
throughput keys of a real run's ``metrics.jsonl``.

What XLA counts (``compiled.cost_analysis()['flops']``): every floating-point operation of the
per-device program, 2 per multiply-add in a ``dot`` and 1 per elementwise add / multiply /
compare (transcendentals such as exp and tanh go to a separate key). The analytic count is the
backbone's matmuls only, so the two are related as: analytic == the HLO's backbone ``dot`` FLOPs
(checked below to the FLOP: the loss used adds none), and XLA's total is above it by the
elementwise work (norms, softmax, GELU / SwiGLU products, biases, AdamW over every trained
parameter). At hidden 64 that is 11% for the BERT, 5% for the Qwen3-shaped decoder and 7% for it
with LoRA (it shrinks as hidden grows: 5% for the BERT at hidden 128), hence the bound
``1 <= XLA / analytic <= 1.2``.
"""

import json
import math
import re
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedjax import lora
from embedjax.data.batch import Batch, Side
from embedjax.encoders import bert, decoder
from embedjax.train import flops, optim
from embedjax.train.metrics import TrainLog
from embedjax.train.objective import Objective
from embedjax.train.state import TrainState
from embedjax.train.step import train_step

pytestmark = pytest.mark.fast_compile  # the counts are the same optimised or not (checked when written)

ROWS, LENGTH = 8, 32
BERT = bert.BertConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                       max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0)
QWEN3 = decoder.DecoderConfig(model_type="qwen3", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=16, intermediate_size=192, qk_norm=True,
                              attention="bidirectional", max_position_embeddings=512)


def hlo_dot_flops(hlo_text: str) -> int:
    """2 x (output elements) x (contracted size), summed over every ``dot`` of compiled HLO text
    (each computation's operand shapes looked up from its own definitions): the program's matmul
    FLOPs, read from the program rather than from any formula."""
    total, shapes = 0, {}
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and " = " not in line:  # a computation starts: its own names
            shapes = {name: [int(d) for d in dims.split(",") if d]
                      for name, dims in re.findall(r"([\w.\-]+): \w+\[([\d,]*)\]", line)}
            continue
        defined = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]", line)
        if defined:
            shapes[defined[1]] = [int(d) for d in defined[2].split(",") if d]
        dot = re.search(r" dot\(%([^,)]+), %([^,)]+)\).*lhs_contracting_dims=\{([\d,]*)\}", line)
        if dot and defined:
            lhs = shapes[dot[1]]
            contracted = math.prod(lhs[int(i)] for i in dot[3].split(",") if i)
            total += 2 * math.prod(shapes[defined[1]]) * contracted
    return total


def pair_batch(vocab: int) -> Batch:
    rng = np.random.default_rng(0)

    def side():
        return Side(hashes=jnp.asarray(rng.integers(1, 2**30, ROWS), jnp.int32),
                    ids=jnp.asarray(rng.integers(3, vocab, (ROWS, LENGTH)), jnp.int32),
                    mask=jnp.ones((ROWS, LENGTH), jnp.int32))

    return Batch(a=side(), b=side(), labels=jnp.asarray(rng.uniform(0, 5, ROWS), jnp.float32))


def compiled_step(cfg, params, *, lora_rank: int = 0, unroll: bool = True):
    """The jitted ``train_step`` (CoSENT, AdamW) compiled for two padded sides of ROWS x LENGTH;
    with ``lora_rank``, adapters on every projection train and the base is frozen."""
    frozen = None
    if lora_rank:
        params, cfg = lora.attach(params, cfg, lora.LoraSpec(rank=lora_rank), jax.random.key(1))
        params, frozen = lora.partition(params)
    objective = Objective(loss="cosent", pooling="mean", dropout=False, unroll=unroll)
    tx, _ = optim.make_optimizer({"learning_rate": 1e-4, "warmup": 0, "decay": "constant", "weight_decay": 0.01,
                                  "clip_norm": 1.0, "accumulate": 1, "b1": 0.9, "b2": 0.999, "eps": 1e-8}, 10)
    state = jax.eval_shape(lambda p: TrainState.create(p, tx, 0), params)
    batch = pair_batch(cfg.vocab_size)
    step = jax.jit(lambda s, b, f: train_step(s, b, f, enc_cfg=cfg, objective=objective, tx=tx))
    return step.lower(state, batch, frozen).compile(), batch, cfg


@pytest.mark.parametrize("family,lora_rank", [("bert", 0), ("qwen3", 8)])
def test_analytic_count_is_the_steps_matmuls_and_xla_counts_a_little_more(family, lora_rank):
    cfg = BERT if family == "bert" else QWEN3
    params = (bert.init if family == "bert" else decoder.init)(cfg, jax.random.key(0))
    compiled, batch, cfg = compiled_step(cfg, params, lora_rank=lora_rank)
    analytic = flops.analytic_step_flops(cfg, batch)
    # By hand, for the full BERT: per layer 4 H^2 + 2 H I weights, 2 sides of ROWS x LENGTH tokens.
    if family == "bert":
        h, i, tokens = 64, 256, 2 * ROWS * LENGTH
        assert analytic == 3 * (2 * 2 * (4 * h * h + 2 * h * i) * tokens + 2 * 2 * ROWS * 4 * LENGTH**2 * h)
    dots = hlo_dot_flops(compiled.as_text())
    assert dots == analytic  # to the FLOP: CoSENT and mean pooling add no products
    xla = flops.xla_flops(compiled)
    assert 1.0 <= xla / analytic <= 1.2, (xla, analytic)
    work, note = flops.step_work(compiled, batch, cfg)
    assert work.source == "xla" and work.flops == xla and work.tokens == 2 * ROWS * LENGTH and note is None


def test_xla_count_short_or_missing_falls_back_to_the_analytic_count():
    """A loop XLA counts once (a layer scan that is not unrolled), a backend without cost
    analysis, a backbone with no formula."""
    batch = pair_batch(BERT.vocab_size)
    analytic = flops.analytic_step_flops(BERT, batch)

    def fake(analysis):
        return types.SimpleNamespace(cost_analysis=lambda: analysis, input_shardings=())

    work, note = flops.step_work(fake([{"flops": analytic / 2}]), batch, BERT)
    assert (work.flops, work.source) == (analytic, "analytic") and "below the backbone's matmuls" in note
    work, note = flops.step_work(fake({}), batch, BERT)
    assert (work.flops, work.source) == (analytic, "analytic") and "reports no FLOPs" in note
    work, note = flops.step_work(fake([{"flops": 1.1 * analytic}]), batch, BERT)
    assert (work.flops, work.source, note) == (1.1 * analytic, "xla", None)
    work, note = flops.step_work(fake({}), batch, None)
    assert work.source == "none" and work.flops == 0 and "no FLOPs count" in note
    # for real: the unrolled-off scan's 2 layers counted as 1
    compiled, batch, cfg = compiled_step(QWEN3, decoder.init(QWEN3, jax.random.key(0)), unroll=False)
    assert flops.xla_flops(compiled) < 0.6 * flops.analytic_step_flops(cfg, batch)
    assert flops.step_work(compiled, batch, cfg)[0].source == "analytic"


@pytest.mark.parametrize("kind,bf16,f32", [
    ("TPU v4", 275e12, 275e12), ("TPU v5 lite", 197e12, 197e12), ("TPU v5e", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12), ("TPU v5p", 459e12, 459e12), ("TPU v6 lite", 918e12, 918e12),
    ("NVIDIA A100-SXM4-40GB", 312e12, 156e12), ("NVIDIA A100 80GB PCIe", 312e12, 156e12),
    ("NVIDIA H100 80GB HBM3", 989.4e12, 494.7e12), ("NVIDIA H100 PCIe", 756.5e12, 378e12),
    ("NVIDIA H100 NVL", 835.5e12, 417.5e12), ("NVIDIA H200", 989.4e12, 494.7e12),
    ("NVIDIA H200 NVL", 835.5e12, 417.5e12),
    ("TPU v4 lite", None, None), ("cpu", None, None), ("NVIDIA GeForce RTX 4090", None, None),
])
def test_peak_table_by_device_kind(kind, bf16, f32):
    assert flops.peak_flops(kind, "bfloat16") == bf16
    assert flops.peak_flops(kind, "float32") == f32  # JAX's default precision: TF32 / one bf16 pass


def test_float32_at_highest_precision_and_a_run_of_several_chips():
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB", "float32", "highest") == 19.5e12
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "float32", "float32") == 66.9e12
    assert flops.peak_flops("NVIDIA H200", "float32", "highest") == 67e12
    assert flops.peak_flops("TPU v5 lite", "float32", "highest") == pytest.approx(197e12 / 6)
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert flops.run_peak("bfloat16", 8, h100)[0] == 8 * 989.4e12
    with jax.default_matmul_precision("default"):  # the run's setting decides TF32 or FP32
        assert flops.run_peak("float32", 8, h100)[0] == 8 * 494.7e12
    with jax.default_matmul_precision("highest"):  # (conftest.py's, for the whole suite)
        assert flops.run_peak("float32", 8, h100)[0] == 8 * 66.9e12
    assert flops.run_peak("bfloat16", 4, types.SimpleNamespace(platform="gpu", device_kind="NVIDIA L4"))[0] is None


def test_cpu_peak_is_measured_once():
    flops.measure_cpu_peak.cache_clear()
    start = time.perf_counter()
    first = flops.measure_cpu_peak("float32")
    again_start = time.perf_counter()
    assert flops.measure_cpu_peak("float32") == first
    assert time.perf_counter() - again_start < 0.01 < again_start - start  # cached, not measured again
    assert 1e9 < first < 1e14  # a few GFLOP/s to tens of TFLOP/s: a CPU
    peak, where = flops.run_peak("float32", devices=8)
    assert peak == first and "measured" in where  # simulated devices share the cores: no x 8


class _Writer:
    def __init__(self):
        self.lines = []

    def write(self, step, metrics):
        self.lines.append((step, metrics))


class _Bar:
    def set_postfix(self, **shown):
        self.shown = shown


def test_train_log_throughput_and_mfu():
    writer, bar = _Writer(), _Bar()
    log = TrainLog(writer, bar, lr_at=lambda s: 1e-3, batch_size=16, on_divergence=lambda s, m: "", peak_flops=4e9)
    work = flops.StepWork(flops=1e9, tokens=500, source="xla")
    for step in (1, 2, 3):
        log.record(step, {"loss": jnp.float32(0.5)}, work=work)
    log.since = time.perf_counter() - 2.0  # 3 steps in 2 seconds
    log.flush(3)
    (step, line), = writer.lines
    assert step == 3
    assert line["examples_per_s"] == pytest.approx(48 / 2, rel=1e-3)
    assert line["tokens_per_s"] == pytest.approx(1500 / 2, rel=1e-3)
    assert line["model_tflops_per_s"] == pytest.approx(3e9 / 2 / 1e12, rel=1e-3)
    assert line["mfu"] == pytest.approx(1.5e9 / 4e9, rel=1e-3)
    assert bar.shown["mfu"] == "37.5%" and bar.shown["tok_s"] == "750"
    log.record(4, {"loss": jnp.float32(0.4)})  # no work known, no peak: no MFU, no TFLOP/s
    log.peak_flops = None
    log.flush(4)
    assert "mfu" not in writer.lines[-1][1] and writer.lines[-1][1]["tokens_per_s"] == 0


def test_every_training_log_line_carries_throughput_and_mfu(tiny_straight_run):
    """The tiny scripts/train.py run (8 CPU devices, tests/conftest.py): each loss line has
    tokens/s, model TFLOP/s and MFU, all against one peak, and FLOPs per token slot at or above the
    analytic matmul count of its 2-layer, hidden-32 BERT (6 x its matmul weights per token)."""
    lines = [json.loads(line) for line in (tiny_straight_run / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss" in line]
    assert [line["step"] for line in logged] == list(range(1, 9))
    peaks = []
    for line in logged:
        assert line["tokens_per_s"] > 0 and line["model_tflops_per_s"] > 0 and 0 < line["mfu"] < 1, line
        peaks.append(line["model_tflops_per_s"] * 1e12 / line["mfu"])
        per_token = line["model_tflops_per_s"] * 1e12 / line["tokens_per_s"]
        assert 6 * 2 * (4 * 32 * 32 + 2 * 32 * 64) <= per_token, line
    assert max(peaks) == pytest.approx(min(peaks), rel=1e-6)
