"""Retrieval fine-tune: all-MiniLM-L6-v2 on SciFact + NFCorpus train (BEIR), InfoNCE with mined hard
negatives and the judged-relevant documents kept out of every query's negatives, selected on the mean
of SciFact dev and NFCorpus dev nDCG@10.

First mine hard negatives for SciFact's training queries (the model's own ranking; every
judged-relevant document excluded), then train:

    python scripts/mine.py --beir $EMBEDJAX_DATA/beir/scifact --output workdirs/mined/scifact_train.jsonl \\
        --num_negatives 8 --range_min 10 --range_max 60 --relative_margin 0.95
    python scripts/train.py --config configs/beir_ir.py --workdir workdirs/beir_ir

Each training query is one record with all its relevant documents (``data.kind="beir"``): each
step it takes one positive and one of its mined negatives, drawn anew every epoch; its other
relevant documents are never its negatives, in the batch or on another device. One source per
batch (SciFact or NFCorpus, sampled by size), so in-batch negatives come from the same corpus.
Variants (``:name=value,...``): ``fn=M`` masks in-batch candidates scoring above the positive + M
(Qwen3-Embedding's rule with M=0.1; default off, see ``retrieval_loss_kwargs``), ``guide=1`` decides false negatives with the
frozen initial model instead (GISTEmbed), ``negatives=K`` SciFact's mined negatives per query and step
(0: in-batch only), ``nf_negatives=K`` NFCorpus's (default 0: with some 40 judged documents per query
and compressed scores, the 0.95 relative filter leaves most NFCorpus queries without a mined
negative), ``all=1`` every sampled positive in the numerator, ``positives=M`` positives per query and step,
``lr=X``, ``epochs=E``, ``mined=DIR`` where the mined files are, ``start=1`` evaluates the start too,
``anchor=W`` anchors every training text to the initial model (configs/stsb_anchored.py's cosine
distillation, weight W), ``gte=1`` GTE's four directions in the denominator (arXiv:2308.03281),
``hardness=A`` LLaVE's hardness weighting of the negatives (arXiv:2503.04812; A=9 in the paper),
``mode=round_robin`` takes the sources in a fixed weighted turn instead of sampling each step's
(then every run trains exactly one epoch of each: 21 SciFact and 80 NFCorpus batches; sampled, the
SciFact count is binomial, 17 to 21 over seeds 0-2), ``smoke``.
"""

from configs import base

RETRIEVAL_EVALS = {
    "scifact_dev": {"type": "retrieval", "path": str(base.DATA / "beir" / "scifact"), "split": "dev"},
    "nfcorpus_dev": {"type": "retrieval", "path": str(base.DATA / "beir" / "nfcorpus"), "split": "dev"},
}
RETRIEVAL_SELECT = "scifact_dev/ndcg@10+nfcorpus_dev/ndcg@10"
TRAIN_QUERIES = {"scifact": 692, "nfcorpus": 2590}  # training queries with a positive: the sampling weights


def retrieval_sources(args: dict) -> dict:
    """The two BEIR training sources of ``data.mixture``, with the variants' data options."""
    mined = args.get("mined", "workdirs/mined")
    counts = {"scifact": int(args.get("negatives", 1)), "nfcorpus": int(args.get("nf_negatives", 0))}
    out = {}
    for name, weight in TRAIN_QUERIES.items():
        negatives = counts[name]
        source = {"kind": "beir", "train": str(base.DATA / "beir" / name), "split": "train",
                  "positives": args.get("positives", 1), "weight": float(weight), "num_negatives": negatives}
        if negatives:
            source["hard_negatives"] = f"{mined}/{name}_train.jsonl"
        out[name] = source
    return out


def beir_data(c, args: dict, metric: str = "ndcg@10") -> dict:
    """Sets ``c.data`` to the BEIR training data of the variants (``:beir=DIR,split=S``: one directory's
    split, evaluated on its dev split; else SciFact + NFCorpus train as ``retrieval_sources``) and
    ``c.select_metric`` to ``metric`` on the dev split(s); returns the dev evaluators' ``{name: {path,
    split}}`` for the caller to give its evaluator type."""
    if args.get("beir"):
        c.data.train, c.data.split = str(args["beir"]), str(args.get("split", "train"))
        c.select_metric = f"dev/{metric}"
        return {"dev": {"path": str(args["beir"]), "split": "dev"}}
    c.data.train = str(base.DATA / "beir" / "scifact")
    c.data.mixture = retrieval_sources(args)
    c.data.mixture_mode = "sampled"
    c.select_metric = "+".join(f"{name}/{metric}" for name in RETRIEVAL_EVALS)
    return {name: {"path": spec["path"], "split": spec["split"]} for name, spec in RETRIEVAL_EVALS.items()}


def retrieval_loss_kwargs(args: dict) -> dict:
    # No false-negative rule by default: s_pos + 0.1 (Qwen3-Embedding's) cost SciFact dev 2.4 nDCG@10
    # points on seed 0 (62.15 vs 64.53; NFCorpus 31.91 vs 31.33): from a weak start it masks the
    # very in-batch candidates that rank above a poorly placed positive (benchmarks/README.md).
    fn = args.get("fn", "none")
    kwargs = {"scale": 20.0}
    if fn not in (None, "none"):
        kwargs["fn_margin"] = float(fn)
    if args.get("all"):
        kwargs["all_positives"] = True
    if args.get("gte"):  # GTE's improved contrastive loss: query-query, doc-query and doc-doc terms too
        kwargs["directions"] = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    if args.get("hardness"):  # LLaVE's hardness weighting of every negative: + alpha * stop_grad(s)
        kwargs["hardness"] = float(args["hardness"])
    return kwargs


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "fn", "guide", "negatives", "nf_negatives", "all", "positives", "lr",
                                        "epochs", "mined", "start", "anchor", "gte", "hardness", "mode"))
    c = base.base_config()
    c.objective.loss = "infonce"
    c.objective.loss_kwargs = retrieval_loss_kwargs(args)
    c.objective.dropout = False
    if args.get("guide"):
        c.objective.guide = "initial"
    if args.get("anchor"):  # cosine distillation of every training text to the initial model (stsb_anchored's)
        c.objective.distill.teacher = "initial"
        c.objective.distill.loss = "cosine"
        c.objective.distill.weight = float(args["anchor"])
    c.optim.learning_rate = float(args.get("lr", 2e-5))
    c.num_epochs = float(args.get("epochs", 1.0))
    c.data.kind = "beir"
    c.data.train = str(base.DATA / "beir" / "scifact")
    c.data.mixture = retrieval_sources(args)
    c.data.mixture_mode = args.get("mode", "sampled")
    c.data.buckets = (16, 32, 64, 128, 192, 256)
    c.max_length = 128  # all-MiniLM-L6-v2 was trained at 128 tokens; abstracts are cut there
    c.evals = dict(RETRIEVAL_EVALS)
    c.select_metric = RETRIEVAL_SELECT
    # One evaluation, after the last step: on a 2-core CPU each evaluation of both dev corpora
    # (8,816 documents) takes about 8 minutes. On an accelerator: eval_every=25, eval_start=True.
    c.eval_every = 10_000
    c.eval_start = bool(args.get("start", False))
    c.eval_export = False  # "after" = the in-training figures of the exported (last) step
    c.checkpoint.every = 50
    return base.maybe_smoke(c, args)
