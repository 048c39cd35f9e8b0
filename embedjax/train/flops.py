"""How much of the device a training step uses: model FLOPs, throughput and MFU.

MFU (model FLOPs utilisation, PaLM: arXiv:2204.02311, appendix B) is the model FLOPs a step
needs times the steps per second, divided by the device's peak FLOP/s. Everything here is a
pure function of a compiled step, a batch's shapes, a backbone config or a device kind, except
the CPU peak, which is measured once per process (``measure_cpu_peak``).

* **The step's FLOPs** come from XLA's own account of the compiled program
  (``xla_flops``: ``compiled.cost_analysis()``): the whole step (forward, backward, optimizer,
  loss), per device, times the devices the program runs on. It counts every floating-point
  operation XLA sees, the elementwise ones too (norms, softmax, AdamW), so it sits a little
  above the matmul count; it counts what runs, so rematerialised layers are in it (hardware
  FLOPs, where PaLM's model FLOPs leave recomputation out), and so is work every device repeats
  (a replicated AdamW update, the loss over gathered embeddings), once per device: negligible at
  real batch sizes, most of the step for the tiny test models; and it cannot see inside custom
  kernels (a cuDNN / Pallas attention) nor past the first trip of a loop (a layer scan with
  ``unroll=False`` counts one layer, GradCache's ``lax.map`` one chunk).
* **The analytic count** (``forward_flops``, ``train_flops``, ``analytic_step_flops``) is
  exactly the backbone's matmuls, PaLM's appendix B written out per projection: a dense layer of
  ``P`` weights costs ``2 P`` FLOPs per token forward; the attention of one layer costs
  ``2 * 2 * T^2 * (heads * head_dim)`` per text of ``T`` tokens forward (scores ``Q K^T`` and
  the mix ``P V``; causal and windowed masks still compute the full square, as PaLM counts it);
  the backward pass is twice the forward (the gradients of both operands of every product).
  Per token that is PaLM's ``6 N + 12 L H Q T``. With LoRA (``cfg.lora`` set) the base kernels
  are frozen: they get the activation gradient only, so their backward costs ``2 P`` per token
  instead of ``4 P`` (and the first layer's query / key / value, which read the frozen
  embeddings, not even that); the adapters' two products count like any dense layer. Left out
  on purpose: embedding lookups, biases, norms, activations, softmax, pooling, the loss, any
  head (an MLM / LM head, a TSDAE decoder) and the optimizer, which XLA counts. So XLA's count
  is at or above this one (tests/test_flops.py: the analytic count equals the compiled step's
  ``dot`` FLOPs, and XLA's total is 5-11% above it at hidden 64); the step uses the analytic
  count when the backend reports nothing or less (``step_work``: a kernel or loop XLA cannot see).
* **The peak** (``PEAKS``, ``peak_flops``) is the vendor's dense (no sparsity) figure per chip,
  picked by ``jax.devices()[0].device_kind``; on CPU it is measured (``measure_cpu_peak``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import time
from typing import Any

import jax

log = logging.getLogger(__name__)

TERA = 1e12


# --------------------------------------------------------------------------- analytic counts


def dense_layers(cfg) -> list[tuple[str, int, int]] | None:
    """One transformer layer's projections as ``(param path, d_in, d_out)`` (the paths
    ``embedjax.lora`` matches its ``targets`` against), or None for a backbone with no analytic
    count here. BERT family: query / key / value / output (H x H), MLP up (H x I) and down
    (I x H). Decoders: q (H x N*D), k / v (H x K*D), o (N*D x H), MLP gate / up (H x I), down."""
    from embedjax.encoders import bert, decoder

    if isinstance(cfg, bert.BertConfig):
        h, i = cfg.hidden_size, cfg.intermediate_size
        att = [(f"layers/attention/{n}", h, h) for n in ("query", "key", "value", "output")]
        return att + [("layers/mlp/up", h, i), ("layers/mlp/down", i, h)]
    if isinstance(cfg, decoder.DecoderConfig):
        h, i = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        att = [("layers/attention/q", h, q), ("layers/attention/k", h, kv), ("layers/attention/v", h, kv),
               ("layers/attention/o", q, h)]
        return att + [("layers/mlp/gate", h, i), ("layers/mlp/up", h, i), ("layers/mlp/down", i, h)]
    return None


def attention_width(cfg) -> int:
    """``heads * head_dim``: the width of one layer's attention products (H for BERT)."""
    return cfg.num_heads * cfg.head_dim if hasattr(cfg, "head_dim") else cfg.hidden_size


def matmul_params(cfg) -> tuple[int, int]:
    """``(base, adapters)``: the weights of every layer's projections (``dense_layers`` times
    ``num_layers``), and of the LoRA adapters on them (``cfg.lora``: ``r * (d_in + d_out)`` per
    adapted projection; 0 without LoRA). Embeddings, biases and norms are not matmul weights."""
    layers = dense_layers(cfg)
    if layers is None:
        raise ValueError(f"no analytic FLOPs count for a {type(cfg).__name__} backbone")
    base = sum(a * b for _, a, b in layers) * cfg.num_layers
    adapters = 0
    if cfg.lora is not None:
        from embedjax import lora

        targets = cfg.lora.targets or lora.default_targets(cfg)
        adapters = sum(cfg.lora.rank * (a + b) for path, a, b in layers if re.search(targets, path)) * cfg.num_layers
    return base, adapters


def forward_flops(cfg, rows: int, length: int) -> float:
    """Matmul FLOPs of the backbone's forward pass over ``rows`` texts (or packed rows) of
    ``length`` tokens: ``2 * (base + adapter weights) * rows * length`` for the projections plus
    ``num_layers * rows * 2 * 2 * length^2 * attention_width`` for attention (PaLM,
    arXiv:2204.02311, appendix B; the full square even under a causal or windowed mask)."""
    base, adapters = matmul_params(cfg)
    tokens = rows * length
    attention = cfg.num_layers * rows * 4 * length * length * attention_width(cfg)
    return float(2 * (base + adapters) * tokens + attention)


def train_flops(cfg, rows: int, length: int) -> float:
    """Matmul FLOPs of a training step's forward and backward passes over ``rows`` x ``length``
    tokens: the backward is twice the forward (each product's two operand gradients), so
    ``3 * forward_flops`` (PaLM's ``6 N`` per token plus ``12 L H Q T`` for attention) when every
    weight trains. With LoRA (``cfg.lora``) the base model is frozen: its kernels get no weight
    gradient (``2 * base * tokens`` less), and the projections that read the frozen embeddings
    (the first layer's query / key / value, and their adapters' first products) need no input
    gradient either (``2 * d_in * (d_out [+ r]) * tokens`` less each): what XLA leaves out. Exact
    when adapters sit on the first layer's attention (the default targets: every projection);
    with MLP-only targets XLA skips that layer's whole attention backward, which this still counts."""
    base, _ = matmul_params(cfg)
    tokens = rows * length
    skipped = 0
    if cfg.lora is not None:
        from embedjax import lora

        targets = cfg.lora.targets or lora.default_targets(cfg)
        first = [(path, a, b) for path, a, b in dense_layers(cfg)
                 if path.rsplit("/", 1)[-1] in ("query", "key", "value", "q", "k", "v")]
        skipped = base + sum(a * b + (a * cfg.lora.rank if re.search(targets, path) else 0) for path, a, b in first)
    return 3 * forward_flops(cfg, rows, length) - 2 * skipped * tokens


def token_shapes(batch) -> list[tuple[int, int]]:
    """``(texts, length)`` of every token-id array in a batch (``embedjax.data.batch.Batch``:
    each padded side's ``ids``, lead dims flattened, and the packed rows' ``ids``), from shapes
    alone (abstract arrays work too)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if path and getattr(path[-1], "name", getattr(path[-1], "key", None)) == "ids" and len(leaf.shape) >= 2:
            out.append((math.prod(leaf.shape[:-1]), int(leaf.shape[-1])))
    return out


def token_slots(batch) -> int:
    """Token positions a step computes on (padding included): what its FLOPs are spent on."""
    return sum(rows * length for rows, length in token_shapes(batch))


def analytic_step_flops(cfg, batch) -> float | None:
    """``train_flops`` summed over the batch's token arrays (``token_shapes``): every side (and
    the packed rows) runs through the backbone once. None when the backbone has no count."""
    if dense_layers(cfg) is None:
        return None
    return sum(train_flops(cfg, rows, length) for rows, length in token_shapes(batch))


# --------------------------------------------------------------------------- XLA's count


def xla_flops(compiled) -> float | None:
    """FLOPs of one run of a ``jax.stages.Compiled`` over all its devices, from XLA's cost
    analysis: its ``'flops'`` (per device: the SPMD-partitioned program each device runs; a dict,
    or a list of dicts, one per program, on CPU / GPU) times the devices. None when the backend
    reports none (or 0)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception as err:  # noqa: BLE001 - a backend without cost analysis
        log.debug("no cost analysis: %s", err)
        return None
    if isinstance(analysis, dict):
        analysis = [analysis]
    flops = sum(float(a.get("flops", 0.0)) for a in analysis or () if a)
    return flops * program_devices(compiled) if flops > 0 else None


def program_devices(compiled) -> int:
    """How many devices a compiled program runs on (from its input shardings; 1 when unknown)."""
    try:
        shardings = jax.tree.leaves(compiled.input_shardings)
        return max(len(s.device_set) for s in shardings) if shardings else 1
    except Exception:  # noqa: BLE001
        return 1


@dataclasses.dataclass(frozen=True)
class StepWork:
    """What one compiled step computes: ``flops`` over all devices (``source``: ``"xla"`` or
    ``"analytic"``; 0 with ``"none"``), ``tokens`` (token slots) and the analytic count beside it."""

    flops: float
    tokens: int
    source: str
    analytic: float | None = None

    def describe(self) -> str:
        """One line for the log: TFLOP per step, where the count comes from, token slots."""
        if self.source == "none":
            return "model FLOPs unknown"
        text = f"{self.flops / TERA:.4g} TFLOP per step ({self.source}"
        if self.source == "xla" and self.analytic:
            text += f"; analytic matmuls {self.analytic / TERA:.4g}, XLA / analytic {self.flops / self.analytic:.2f}"
        return text + f"), {self.tokens} token slots"


def step_work(compiled, batch, cfg) -> tuple[StepWork, str | None]:
    """``(StepWork, note)`` of a compiled train step on ``batch``'s shapes: XLA's count
    (``xla_flops``), else the analytic one (``analytic_step_flops``) with a note saying why --
    the backend reported none, or less than the backbone's matmuls alone (a custom kernel such as
    cuDNN attention, or a loop XLA counted once)."""
    xla, analytic, tokens = xla_flops(compiled), analytic_step_flops(cfg, batch), token_slots(batch)
    if xla is not None and (analytic is None or xla >= analytic):
        return StepWork(xla, tokens, "xla", analytic), None
    if analytic is None:
        return StepWork(0.0, tokens, "none"), "no FLOPs count: the backend reports none and the backbone has no formula"
    if xla is None:
        note = "the backend reports no FLOPs (cost analysis): using the analytic matmul count"
    else:
        note = (f"XLA counts {xla / TERA:.4g} TFLOP, below the backbone's matmuls alone ({analytic / TERA:.4g}; a "
                "custom kernel, or a loop it counts once: a layer scan, GradCache's chunks): using the analytic count")
    return StepWork(analytic, tokens, "analytic", analytic), note


# --------------------------------------------------------------------------- peaks

# Dense (no structured sparsity) peak FLOP/s per chip, vendor figures: (bf16, tf32, fp32).
# tf32 is what float32 matmuls run at under JAX's default precision (TF32 tensor cores on
# NVIDIA; on TPU one bf16 pass, so the bf16 figure); fp32 under "highest" precision (NVIDIA's
# non-tensor FP32; TPUs publish no float32 figure, see peak_flops). NVIDIA's datasheets quote
# bf16 / tf32 "with sparsity": the dense figures are half of those.
PEAKS: dict[str, tuple[float, float, float | None]] = {
    # Cloud TPU docs, "Peak compute per chip (bf16)": v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOP/s.
    "TPU v4": (275e12, 275e12, None),
    "TPU v5e": (197e12, 197e12, None),
    "TPU v5p": (459e12, 459e12, None),
    "TPU v6e": (918e12, 918e12, None),
    # A100 datasheet / Ampere whitepaper (SXM4 and PCIe, 40 / 80 GB alike): BF16 312 (624 sparse),
    # TF32 156 (312 sparse), FP32 19.5 TFLOP/s.
    "A100": (312e12, 156e12, 19.5e12),
    # Hopper whitepaper (dense / sparse): SXM5 BF16 989.4 / 1,978.9, TF32 494.7 / 989.4, FP32 66.9
    # (the datasheet rounds to 1,979 sparse and 67); PCIe BF16 756.5 / 1,513, TF32 378 / 756, FP32 51.2;
    # NVL datasheet BF16 1,671 sparse -> 835.5 dense, TF32 835 sparse -> 417.5, FP32 60.
    "H100 SXM": (989.4e12, 494.7e12, 66.9e12),
    "H100 PCIe": (756.5e12, 378e12, 51.2e12),
    "H100 NVL": (835.5e12, 417.5e12, 60e12),
    # H200 datasheet: the H100 SXM's compute with more, faster HBM. SXM: BF16 1,979 sparse (989.4 dense,
    # as the H100 SXM), TF32 989 sparse -> 494.7, FP32 67; NVL: BF16 1,671 sparse -> 835.5, TF32 835
    # sparse -> 417.5, FP32 60.
    "H200 SXM": (989.4e12, 494.7e12, 67e12),
    "H200 NVL": (835.5e12, 417.5e12, 60e12),
}

# jax.devices()[0].device_kind -> PEAKS key, first match wins (case-insensitive regexes). TPU
# kinds as JAX names them ("TPU v5 lite" is v5e, "TPU v5" v5p, "TPU v6 lite" v6e); NVIDIA's as
# the driver does ("NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H200" the SXM one).
DEVICE_KINDS: tuple[tuple[str, str], ...] = (
    (r"^tpu v4$", "TPU v4"),
    (r"^tpu v5 ?(lite|e)$", "TPU v5e"),
    (r"^tpu v5p?$", "TPU v5p"),
    (r"^tpu v6 ?(lite|e)$", "TPU v6e"),
    (r"\ba100\b", "A100"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200 SXM"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b", "H100 SXM"),
)

# XLA:TPU computes a float32 matmul at "highest" precision as 6 bf16 passes and at "high" as 3:
# an estimate of their peak, not a vendor figure.
_TPU_F32_PASSES = {"highest": 6, "float32": 6, "f32_f32_f32": 6, "high": 3, "bfloat16_3x": 3, "tensorfloat32": 3}


def chip_for(device_kind: str) -> str | None:
    """The ``PEAKS`` key of a ``device_kind`` string, None when the chip is not in the table."""
    kind = device_kind.strip().lower()
    for pattern, chip in DEVICE_KINDS:
        if re.search(pattern, kind):
            return chip
    return None


def peak_flops(device_kind: str, dtype: str = "bfloat16", precision: str | None = None) -> float | None:
    """The dense peak FLOP/s of one chip of ``device_kind`` for matmuls in ``dtype`` (the compute
    dtype: ``"bfloat16"`` or ``"float32"``), None for a chip not in ``PEAKS`` (CPU included:
    ``measure_cpu_peak``). ``precision``: JAX's ``jax_default_matmul_precision`` (None: the
    default, under which float32 runs as TF32 on NVIDIA and one bf16 pass on TPU); ``"highest"`` /
    ``"float32"`` pick NVIDIA's FP32 figure and 1/6 of a TPU's bf16 one."""
    chip = chip_for(device_kind)
    if chip is None:
        return None
    bf16, tf32, fp32 = PEAKS[chip]
    if str(dtype) in ("bfloat16", "float16"):
        return bf16
    precision = (precision or "").lower()
    if chip.startswith("TPU"):
        return bf16 / _TPU_F32_PASSES.get(precision, 1)
    return fp32 if precision in ("highest", "float32", "f32_f32_f32") else tf32


@functools.lru_cache(maxsize=None)
def measure_cpu_peak(dtype: str = "float32", sizes: tuple[int, ...] = (512, 1024), min_seconds: float = 0.05) -> float:
    """The CPU's matmul peak FLOP/s in ``dtype``, measured once per process (cached): jitted
    ``n x n x n`` products for each ``n`` in ``sizes`` (bf16 operands accumulate in float32, as the
    bf16 step's do) on the default device, the fastest of at least 3 runs over ``min_seconds``,
    the best size's rate. It is what XLA reaches on this machine's cores (the simulated devices
    of one host share them), not a theoretical FMA peak; on a machine shared with other work it
    reads low."""
    import jax.numpy as jnp

    product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    rates = []
    for n in sizes:
        a = jnp.ones((n, n), dtype)
        product(a, a).block_until_ready()  # compile
        best, runs, start = math.inf, 0, time.perf_counter()
        while runs < 3 or (time.perf_counter() - start < min_seconds and runs < 100):
            t = time.perf_counter()
            product(a, a).block_until_ready()
            best, runs = min(best, time.perf_counter() - t), runs + 1
        rates.append(2 * n**3 / best)
    return max(rates)


def run_peak(dtype: str, devices: int, device=None) -> tuple[float | None, str]:
    """``(peak FLOP/s of all ``devices`` together, where it comes from)`` for a run computing in
    ``dtype``: ``devices`` x the chip's table figure on an accelerator; on CPU the measured
    matmul peak of the machine (its simulated devices share the same cores). None when the
    chip is not in the table."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measure_cpu_peak(str(dtype)), f"measured {dtype} matmul on this CPU"
    precision = jax.config.jax_default_matmul_precision
    chip = peak_flops(device.device_kind, str(dtype), None if precision is None else str(precision))
    if chip is None:
        return None, f"no peak known for {device.device_kind!r} (embedjax.train.flops.PEAKS)"
    return devices * chip, f"{devices} x {chip / TERA:.1f} TFLOP/s ({chip_for(device.device_kind)}, {dtype})"


# --------------------------------------------------------------------------- throughput and MFU


def mfu(flops_per_second: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of the same devices (None: no peak)."""
    return None if not peak else flops_per_second / peak


def throughput(*, seconds: float, examples: int, tokens: int, flops: float, peak: float | None) -> dict[str, Any]:
    """The throughput keys of a log line for work done in ``seconds``: ``examples_per_s``,
    ``tokens_per_s`` (token slots), ``model_tflops_per_s`` (all devices) and ``mfu`` (when the
    peak is known and the FLOPs are)."""
    seconds = max(seconds, 1e-9)
    out = {"examples_per_s": examples / seconds, "tokens_per_s": tokens / seconds}
    if flops > 0:
        out["model_tflops_per_s"] = flops / seconds / TERA
        utilisation = mfu(flops / seconds, peak)
        if utilisation is not None:
            out["mfu"] = utilisation
    return out
