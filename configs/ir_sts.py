"""Retrieval and STS in one model (CoDiEmb, arXiv:2508.11442): all-MiniLM-L6-v2 on SciFact + NFCorpus
train (configs/beir_ir.py's sources and InfoNCE) and STS-B train (configs/stsb_anchored.py's
AnglE, anchored to the frozen initial model), single-task batches, a loss per task; selected on
the mean of the retrieval and STS dev metrics, both on a 0-100 scale:
``25 * (SciFact dev + NFCorpus dev nDCG@10) + 0.5 * STS-B dev Spearman``.

    python scripts/mine.py --beir $EMBEDJAX_DATA/beir/scifact --output workdirs/mined/scifact_train.jsonl \\
        --num_negatives 8 --range_min 10 --range_max 60 --relative_margin 0.95
    python scripts/train.py --config configs/ir_sts.py --workdir workdirs/ir_sts

Every step draws one source by size (SciFact 692 queries, NFCorpus 2590, STS-B 5749 pairs: one
epoch of each is 280 steps of 32) and trains with that source's loss: InfoNCE (scale 20, mined
negatives for SciFact, qrels keeping judged-relevant documents out of the negatives) on retrieval
batches, AnglE + the anchor on STS batches. The anchor (cosine to the initial model's embedding,
weight 10) holds the model near its start on STS texts; the one frozen model of the run is also
the guide with ``guide=1``.

Costs on a 2-core CPU: each evaluation of both retrieval dev corpora encodes 8,816 documents
(about 8 minutes at 128 tokens), so this recipe evaluates once, after the last step, and
neither the start nor the export again (``eval_start`` / ``eval_export``: the start's figures
are in benchmarks/README.md). On an accelerator set ``--config.eval_every=40
--config.eval_start=True``. Variants: ``ir=W`` the retrieval sources' weight multiplier (1:
by size), ``anchor=W`` the anchor's weight (0: none), ``guide=1``, ``fn=M``/``none``, ``lr=X``,
``mined=DIR``, ``smoke``.
"""

from configs import base, beir_ir, stsb_angle

SELECT = "25*scifact_dev/ndcg@10 + 25*nfcorpus_dev/ndcg@10 + 0.5*stsb_dev/cosine_spearman"


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "ir", "anchor", "guide", "fn", "lr", "mined"))
    c = beir_ir.get_config(None)
    c.objective.loss_kwargs = beir_ir.retrieval_loss_kwargs(args)
    if args.get("guide"):
        c.objective.guide = "initial"
    c.optim.learning_rate = float(args.get("lr", 2e-5))
    sources = beir_ir.retrieval_sources(args)
    for source in sources.values():
        source["weight"] *= float(args.get("ir", 1.0))
    angle = stsb_angle.get_config(None)
    anchor = float(args.get("anchor", 10.0))
    sts_objective = {"loss": "angle", "loss_kwargs": angle.objective.loss_kwargs.to_dict(), "guide": None}
    if anchor:
        sts_objective["distill"] = {"teacher": "initial", "loss": "cosine", "weight": anchor}
    sources["stsb"] = {"kind": "stsb", "train": str(base.DATA / "stsb" / "sts-train.csv"), "weight": 5749.0,
                       "buckets": (16, 32, 64, 128), "objective": sts_objective}
    c.data.mixture = sources
    c.evals = {**beir_ir.RETRIEVAL_EVALS,
               "stsb_dev": {"type": "sts", "path": str(base.DATA / "stsb" / "sts-dev.csv"), "format": "stsb",
                            "metrics": ("cosine",), "layers": (), "dims": ()},
               "sick_trial": {"type": "sts", "path": str(base.DATA / "sick" / "SICK_trial.txt"), "format": "sick",
                              "metrics": ("cosine",), "layers": (), "dims": ()}}
    c.select_metric = SELECT
    return base.maybe_smoke(c, args)
