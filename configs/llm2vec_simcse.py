"""LLM2Vec (arXiv:2404.05961), stage 2 of 2: unsupervised SimCSE on the decoder that stage 1
(``configs/llm2vec_mntp.py``, masked next-token prediction) left bidirectional, with fresh LoRA
adapters; selected on STS-B dev.

``:init_from=WORKDIR`` starts from stage 1's export in its workdir (the MNTP adapters merged into the
weights, mean pooling, ``attention: bidirectional`` recorded in its ``embedjax_config.json``)::

    python scripts/train.py --config configs/llm2vec_mntp.py --workdir workdirs/llm2vec_mntp
    python scripts/train.py --config configs/llm2vec_simcse.py:init_from=workdirs/llm2vec_mntp \\
        --workdir workdirs/llm2vec_simcse

Without it the run starts from the base LLM (``--config.model``, default Meta-Llama-3-8B-Instruct):
LLM2Vec's "bidirectional + SimCSE" ablation, without MNTP.

Each text is its own positive under a second dropout mask: attention dropout 0.3
(``simcse_dropout``) and LoRA dropout 0.05; InfoNCE over the batch at scale 20 (temperature 0.05);
mean pooling, bidirectional attention. LLM2Vec's settings (``train_configs/simcse/MetaLlama3.json``):
LoRA rank 16 (alpha 32) on every attention and MLP projection, batch 128, 128 tokens, 1000 steps,
AdamW at lr 3e-5 (linear decay, no warmup, no weight decay). LLM2Vec trains on Wiki1M (one sentence
a line: ``:file=wiki1m_for_simcse.txt``); without ``file=`` the STS-B training sentences stand in.
The export (LoRA merged, bidirectional, mean pooling) is a plain model ``embedjax.load_pretrained``
loads as trained. The CPU chain: see ``configs/llm2vec_mntp.py`` (``:smoke,init_from=/tmp/smoke_mntp``).

Variants: ``:init_from=WORKDIR``, ``:file=PATH``, ``:smoke[=N]``, ``:steps=N``, ``:lr=X``, ``:seed=N``.
"""

from configs import base, llm2vec_mntp, llm_lora


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("init_from", "file", "smoke", "steps", "lr", "seed"))
    c = base.base_config()
    c.seed = int(args.get("seed", 42))  # LLM2Vec's SimCSE seed
    init_from = str(args.get("init_from", ""))  # a str even if the name parses as a number
    c.model = init_from or llm2vec_mntp.MODEL
    c.dtype = "bfloat16"
    c.max_length = 128
    c.attention = "bidirectional"
    c.pooling = "mean"
    c.attention_dropout = 0.3          # LLM2Vec's simcse_dropout: the second view's noise
    c.lora.rank = llm2vec_mntp.LORA["rank"]
    c.lora.alpha = llm2vec_mntp.LORA["alpha"]
    c.lora.dropout = llm2vec_mntp.LORA["dropout"]
    file = str(args.get("file", ""))
    c.data.kind = "sentences" if file else "stsb_sentences"
    c.data.format = "txt" if file else None
    c.data.train = file or str(base.DATA / "stsb" / "sts-train.csv")
    c.data.pack_length = 0
    c.objective.loss = "simcse_unsup"
    c.objective.loss_kwargs = {"scale": 20.0}  # temperature 0.05
    c.objective.dropout = True
    c.objective.remat = True
    c.objective.unroll = False
    c.optim.learning_rate = float(args.get("lr", 3e-5))
    c.optim.warmup = 0
    c.optim.decay = "linear"
    c.optim.weight_decay = 0.0
    c.optim.eps = 1e-8
    c.batch_size = 128
    c.num_steps = int(args.get("steps", 1000))
    c.eval_every = 200
    c.checkpoint.every = 200
    c.sharding_rules = "fsdp"
    if args.get("smoke"):
        c.model = init_from or llm_lora.tiny_checkpoint("llama", lm_head=True)
        c.dtype = "float32"
        c.max_length = 64
    return base.maybe_smoke(c, args)
