"""A decoder LLM as an embedder, NV-Embed style (arXiv:2405.17428): bidirectional attention,
latent-attention pooling, an instruction on the query side, InfoNCE with in-batch and hard
negatives, GradCache, LoRA on every attention and MLP projection. Trained on SICK triplets
(entailment = positive, contradiction = hard negative); selected on SICK trial relatedness.

A real 7B model on an 8-device TPU VM (v5e-8: 8 chips; a v4-8 has 4 chips: use
``--config.mesh.fsdp=4 --config.mesh.model=1`` there; the step's per-device memory is checked
before step 1 and recorded in benchmarks/README.md, "Decoder LLMs")::

    python scripts/train.py --config configs/llm_lora.py --workdir gs://BUCKET/runs/mistral7b_lora \\
        --config.model=mistralai/Mistral-7B-v0.1 --config.mesh.fsdp=4 --config.mesh.model=2

(on a multi-host pod run the same command on every worker; ``scripts/train.py`` initialises
``jax.distributed``). Any checkpoint of a registered family works (llama, mistral, qwen2, qwen3,
gemma2, gemma3_text): e.g. ``--config.model=Qwen/Qwen3-0.6B`` on a single GPU.

The seconds-long CPU variant trains a tiny random Qwen3-shaped checkpoint written on first use
(``embedjax.tiny``) through the same code path::

    python scripts/train.py --config configs/llm_lora.py:smoke --workdir /tmp/smoke_llm
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from configs import base

INSTRUCTION = "Instruct: Given a sentence, retrieve a sentence that it entails\nQuery: "


def tiny_checkpoint(model_type: str = "qwen3", *, lm_head: bool = False) -> str:
    """A tiny random checkpoint of ``model_type`` (written once, then reused) with a tokenizer
    learnt from the SICK training sentences; ``lm_head``: a ``*ForCausalLM`` one with its own
    (untied) LM head (``embedjax.tiny.write_random_checkpoint``).

    It is written by a child process: loading a config must not start jax's backend, which
    ``scripts/train.py`` needs untouched to join a multi-host run after reading the config."""
    name = f"embedjax_tiny_{model_type}" + ("_lm_head" if lm_head else "")
    directory = Path(os.environ.get("EMBEDJAX_CACHE", tempfile.gettempdir())) / name
    if not (directory / "model.safetensors").is_file():
        code = f"from configs import llm_lora; llm_lora.write_tiny({str(directory)!r}, {model_type!r}, {lm_head!r})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return str(directory)


def write_tiny(directory: str, model_type: str, lm_head: bool) -> None:
    """``tiny_checkpoint``'s writer: into a fresh directory beside ``directory``, then renamed into place
    (a concurrent writer's finished copy wins)."""
    from embedjax import tiny
    from embedjax.data import readers

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not (target / "model.safetensors").is_file():  # an unfinished copy (no rename wrote it)
        shutil.rmtree(target, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    pairs = readers.read_sick(base.DATA / "sick" / "SICK_train.txt")
    tiny.write_random_checkpoint(staging, model_type, texts=[t for p in pairs for t in (p.text_a, p.text_b)],
                                 lm_head=lm_head)
    try:
        staging.replace(target)
    except OSError:  # another process wrote it first
        if not (target / "model.safetensors").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "model_type"))
    c = base.base_config()
    c.model = "mistralai/Mistral-7B-v0.1"
    c.dtype = "bfloat16"
    c.max_length = 128
    c.attention = "bidirectional"
    c.pooling = "latent_attention"
    c.prompts = {"query": INSTRUCTION, "document": ""}
    c.include_prompt = False           # instruction tokens are attended to, not pooled
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.dropout = 0.1
    c.data.kind = "sick_triplets"
    c.data.train = str(base.DATA / "sick" / "SICK_train.txt")
    c.data.pack_length = 0             # GradCache embeds padded chunks
    c.evals.dev.path = str(base.DATA / "sick" / "SICK_trial.txt")
    c.evals.dev.format = "sick"
    c.objective.loss = "infonce"
    c.objective.loss_kwargs = {"scale": 50.0, "symmetric": False}
    c.objective.gradcache_chunk = 8
    c.objective.remat = True
    c.objective.unroll = False         # 32 layers: compile one
    c.objective.dropout = False        # LLM checkpoints have no dropout; LoRA dropout regularises
    c.optim.learning_rate = 1e-4
    c.optim.weight_decay = 0.0
    c.batch_size = 64
    c.num_epochs = 1.0
    c.eval_every = 50
    c.sharding_rules = "fsdp"
    if args.get("smoke"):
        c.model = tiny_checkpoint(args.get("model_type", "qwen3"))
        c.dtype = "float32"
        c.max_length = 64
        c.pooler_init = {"num_latents": 16, "num_heads": 4}
    c = base.maybe_smoke(c, args)
    if args.get("smoke"):
        c.objective.gradcache_chunk = 4  # smoke batch 16: 4 chunks
    return c
