"""A reranker: all-MiniLM-L6-v2's backbone with a fresh one-logit head trained as a cross-encoder on
SciFact + NFCorpus train (BEIR), then reranking all-MiniLM-L6-v2's top 100 on SciFact dev and
NFCorpus dev; selected on the mean of the reranked nDCG@10 (one evaluation, after the last step).

Each training query is a candidate group: its positive (one judged-relevant document, drawn anew
each epoch), SciFact's mined hard negative (configs/beir_ir.py's file; its docstring has the
``scripts/mine.py --beir`` command) and 3 other queries' positives from the same corpus, with
every judged-relevant document masked; sentence-transformers' CrossEncoder
MultipleNegativesRankingLoss (sigmoid scores x 10, softmax over the group). One source per batch,
sampled by size, as configs/beir_ir.py.

    python scripts/train.py --config configs/beir_reranker.py --workdir workdirs/beir_reranker

Cost: an accelerator job. On the 2-core CPU of benchmarks/README.md a step (16 groups of 4-5 pairs
of up to 256 tokens, ~20k tokens forward and backward) took about 20 s while other work shared the
CPU, so the 204 steps and the reranking of 44,100 (query, abstract) pairs take hours there.

The CPU-sized run (``:cpu``): SciFact train only, 160 tokens a pair, the mined negative and one
in-batch negative per group, 3 epochs (129 steps), reranking MiniLM's top 20 on SciFact dev:

    python scripts/train.py --config configs/beir_reranker.py:cpu,seed=0 --workdir workdirs/beir_reranker_cpu/seed0

Variants: ``:seed=N``, ``:lr=X``, ``:epochs=E``, ``:in_batch=K``, ``:negatives=K`` (SciFact's mined
negatives per step), ``:loss=mnrl|bce|listnet|lambda``, ``:top_k=K``, ``:cpu``, ``:smoke``.
"""

from configs import base, beir_ir
from embedjax import hf


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("seed", "lr", "epochs", "in_batch", "negatives", "loss", "top_k", "cpu", "smoke"))
    cpu = bool(args.get("cpu", False))
    c = base.base_config()
    c.model_kind = "cross_encoder"
    c.seed = int(args.get("seed", 0))
    c.max_length = 160 if cpu else 256  # query + abstract
    loss = args.get("loss", "mnrl")
    c.objective.loss = loss
    c.objective.loss_kwargs = {"activation": "sigmoid", "scale": 10.0} if loss == "mnrl" else {}
    c.optim.learning_rate = float(args.get("lr", 2e-5))
    c.num_epochs = float(args.get("epochs", 3.0 if cpu else 1.0))
    c.batch_size = 16
    c.data.kind = "beir"
    c.data.train = str(base.DATA / "beir" / "scifact")
    sources = beir_ir.retrieval_sources({"negatives": args.get("negatives", 1)})
    if cpu:
        c.data.num_negatives, c.data.hard_negatives = sources["scifact"]["num_negatives"], sources["scifact"]["hard_negatives"]
    else:
        c.data.mixture = sources
        c.data.mixture_mode = "sampled"
    c.data.in_batch_negatives = int(args.get("in_batch", 1 if cpu else 3))
    c.data.pack_length = c.max_length
    c.data.pack_rows_multiple = 16  # ~64-80 packed rows a batch: a few compiled shapes, not one per even count
    c.data.buckets = (64, 128, 192, 256, 384, 512)
    top_k = int(args.get("top_k", 20 if cpu else 100))
    c.evals = {name: {**spec, "type": "rerank", "first_stage": hf.minilm_l6(), "top_k": top_k}
               for name, spec in beir_ir.RETRIEVAL_EVALS.items() if not cpu or name == "scifact_dev"}
    c.select_metric = "+".join(f"{name}/rerank@{top_k}/ndcg@10" for name in c.evals)
    c.eval_every = 10_000  # one evaluation, after the last step (each reranks 44,100 pairs)
    c.eval_start = False   # a fresh head ranks at random
    c.eval_export = False
    c.checkpoint.every = 50
    return base.maybe_smoke(c, args)
