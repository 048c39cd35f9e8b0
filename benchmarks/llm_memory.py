"""Per-device memory of configs/llm_lora.py's train step at Mistral-7B shapes, on 8 simulated devices.

Nothing is allocated: params, optimizer state and batch are abstract and the step is compiled
ahead of time (``embedjax.train.plan.step_memory``, XLA's ``memory_analysis`` of the program one
device runs). The figures say which (batch, GradCache chunk, mesh) fits a 16 GiB TPU v5e chip.

    python benchmarks/llm_memory.py            # the table in benchmarks/README.md
    python benchmarks/llm_memory.py --length 256 --settings 128:16:4x2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import llm_lora  # noqa: E402
from embedjax.train import memory, plan  # noqa: E402

MISTRAL_7B = {  # mistralai/Mistral-7B-v0.1 config.json (architecture fields)
    "model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "sliding_window": 4096, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
DEFAULT_SETTINGS = ("64:8:4x2", "64:0:4x2", "128:16:4x2", "256:8:4x2", "64:8:8x1", "64:8:2x4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=512, help="tokens per text")
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                    help="BATCH:GRADCACHE_CHUNK:FSDPxMODEL (chunk 0 = no GradCache)")
    ap.add_argument("--limit_gib", type=float, default=16.0, help="device memory to compare with (v5e: 16)")
    args = ap.parse_args()
    print(f"Mistral-7B-shaped LoRA step (configs/llm_lora.py: rank 16, bf16 compute, remat, latent-attention "
          f"pooling, InfoNCE with a hard negative), {args.length} tokens per text, 8 devices")
    print(f"{'batch':>6} {'chunk':>6} {'fsdp x model':>13} {'per device':>11} {'args':>8} {'temps':>8} "
          f"{'fits ' + str(int(args.limit_gib)) + ' GiB':>12} {'compile':>8}")
    for setting in args.settings:
        batch, chunk, mesh = setting.split(":")
        fsdp, model = (int(x) for x in mesh.split("x"))
        c = llm_lora.get_config()
        c.mesh.data, c.mesh.fsdp, c.mesh.model = 8 // (fsdp * model), fsdp, model
        c.batch_size, c.objective.gradcache_chunk, c.max_length = int(batch), int(chunk), args.length
        t = time.perf_counter()
        m = plan.step_memory(c, MISTRAL_7B)
        gib = lambda n: f"{n / memory.GiB:.2f}"  # noqa: E731
        print(f"{batch:>6} {chunk or 'off':>6} {f'{fsdp} x {model}':>13} {gib(m.peak):>11} {gib(m.arguments):>8} "
              f"{gib(m.temporaries):>8} {str(m.peak <= args.limit_gib * memory.GiB):>12} "
              f"{time.perf_counter() - t:>7.0f}s", flush=True)


if __name__ == "__main__":
    main()
