"""LLM2Vec (arXiv:2404.05961), stage 1 of 2: masked next-token prediction (MNTP) with LoRA on a
decoder LLM turned bidirectional. Stage 2 is unsupervised SimCSE on this run's export
(``configs/llm2vec_simcse.py``).

The decoder runs with bidirectional attention (``attention="bidirectional"``: every token sees the
whole text); 20% of the tokens that are not special are chosen, 80% of those replaced by the mask
token ("_", the tokenizer having none), 10% by a random token, 10% kept; the masked token at
position i is predicted from the output at position i - 1 through the model's own LM head
(``objective.loss="mntp"``, ``embedjax.train.mntp_objective``). Only LoRA adapters (rank 16, alpha
32, dropout 0.05, on every attention and MLP projection) train; the LM head and the rest stay
frozen. LLM2Vec's Meta-Llama-3 settings (``train_configs/mntp/MetaLlama3.json``): batch 32, 512
tokens, 1000 steps, AdamW at lr 5e-5 (transformers' Trainer defaults: linear decay, no warmup, no
weight decay). LLM2Vec trains on Wikitext-103 concatenated into 512-token chunks; here the
SciFact corpus (BEIR) stands in, its documents packed into 512-token rows (each text attends only
within itself), and ``:file=PATH`` trains on any one-text-a-line file instead.

On an 8-device TPU VM (``--config.mesh.fsdp=8`` shards the params; the step's memory is checked
before step 1)::

    python scripts/train.py --config configs/llm2vec_mntp.py --workdir gs://BUCKET/runs/llm2vec_mntp \\
        --config.mesh.fsdp=8
    python scripts/train.py --config configs/llm2vec_simcse.py:init_from=gs://BUCKET/runs/llm2vec_mntp \\
        --workdir gs://BUCKET/runs/llm2vec_simcse --config.mesh.fsdp=8

The model must be a causal-LM checkpoint (``--config.model=mistralai/Mistral-7B-Instruct-v0.2``,
``Qwen/Qwen2-1.5B-Instruct``, ...: its ``lm_head.weight`` is read beside the backbone, or it is tied
to the embedding). ``:all_mask`` is LLM2Vec's Mistral setting (80% of the tokens chosen, every one
replaced by the mask token). The export (in the workdir: LoRA merged, no LM head, mean pooling,
``attention: bidirectional`` in its ``embedjax_config.json``) is evaluated once, after the last
step, on STS-B dev: the figure of "bidirectional + MNTP" before SimCSE.

The seconds-long CPU chain, on a tiny random Llama with its own LM head (``embedjax.tiny``)::

    python scripts/train.py --config configs/llm2vec_mntp.py:smoke --workdir /tmp/smoke_mntp
    python scripts/train.py --config configs/llm2vec_simcse.py:smoke,init_from=/tmp/smoke_mntp \\
        --workdir /tmp/smoke_simcse

Variants: ``:smoke[=N]``, ``:file=PATH``, ``:all_mask``, ``:probability=P``, ``:steps=N``,
``:lr=X``, ``:seed=N``.
"""

from configs import base, llm_lora

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"  # LLM2Vec's Llama-3 model
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.05}  # run_mntp.py / run_simcse.py: r, 2r, lora_dropout 0.05


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "file", "all_mask", "probability", "steps", "lr", "seed"))
    c = base.base_config()
    c.seed = int(args.get("seed", 0))
    c.model = MODEL
    c.dtype = "bfloat16"
    c.max_length = 512
    c.attention = "bidirectional"      # MNTP requires it; the export records it for stage 2
    c.pooling = "mean"                 # how the export embeds (LLM2Vec's SimCSE stage pools by mean)
    c.lora.rank, c.lora.alpha, c.lora.dropout = LORA["rank"], LORA["alpha"], LORA["dropout"]
    file = str(args.get("file", ""))  # a str even if the name parses as a number
    if file:
        c.data.kind, c.data.format, c.data.train = "sentences", "txt", file
    else:
        c.data.kind, c.data.train = "beir_corpus", str(base.DATA / "beir" / "scifact")
    c.data.pack_length = 512           # texts packed into 512-token rows, each attending within itself
    c.objective.loss = "mntp"
    all_mask = bool(args.get("all_mask", False))
    c.objective.loss_kwargs = {
        "probability": float(args.get("probability", 0.8 if all_mask else 0.2)),
        "replace": 1.0 if all_mask else 0.8,  # all_mask: run_mntp.py's DataCollatorForLanguageModelingWithFullMasking
        "random": 0.0 if all_mask else 0.1,
        "mask_token": "blank",
        "chunk_size": 128,                  # (B, 128, V) logits at a time, not (B, 512, V)
    }
    c.objective.remat = True
    c.objective.unroll = False         # 32 layers: compile one
    c.objective.dropout = True         # LoRA dropout (LLM checkpoints have no other)
    c.optim.learning_rate = float(args.get("lr", 5e-5))
    c.optim.warmup = 0
    c.optim.decay = "linear"
    c.optim.weight_decay = 0.0
    c.optim.eps = 1e-8
    c.batch_size = 32
    c.num_steps = int(args.get("steps", 1000))
    c.sharding_rules = "fsdp"
    c.eval_start = False               # the export is the last step's model (as LLM2Vec's adapters are)
    c.eval_every = c.num_steps
    c.checkpoint.every = 200
    if args.get("smoke"):
        c.model = llm_lora.tiny_checkpoint("llama", lm_head=True)
        c.dtype = "float32"
        c.max_length = 64
        c.data.pack_length = 64
        c.objective.loss_kwargs = {**c.objective.loss_kwargs.to_dict(), "chunk_size": 16}
    c = base.maybe_smoke(c, args)
    if args.get("smoke"):
        c.eval_every = c.num_steps     # one evaluation, after the last step
    return c
