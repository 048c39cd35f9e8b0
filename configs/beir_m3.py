"""A three-head model (BGE-M3, arXiv:2402.03216): all-MiniLM-L6-v2 with fresh lexical and multi-vector
heads beside its [CLS] vector, trained on SciFact + NFCorpus train (BEIR) with InfoNCE per head and
for their ensemble (s_dense + 0.3 s_lex + s_mul) plus the ensemble's self-knowledge distillation
(``embedjax.losses.m3_loss``), temperature 0.02; evaluated on SciFact dev and NFCorpus dev by each head
alone and by their fusion (weighted sum and reciprocal-rank fusion), selected on the mean of the
fused nDCG@10. The data, order and hard negatives are configs/beir_ir.py's (first mine its negatives:
its docstring has the ``scripts/mine.py --beir`` command):

    python scripts/train.py --config configs/beir_m3.py --workdir workdirs/beir_m3

The export is BGE-M3's layout (``embedjax.m3_model.load_m3``; FlagEmbedding reads its
``sparse_linear.pt`` / ``colbert_linear.pt``). Variants: ``:seed=N``, ``:lr=X``, ``:epochs=E``,
``:no_distill`` (the heads' and the ensemble's InfoNCE only), ``:negatives=K`` / ``:nf_negatives=K``,
``:mined=DIR``, ``:gradcache=C``, ``:smoke``. ``:beir=DIR`` trains on any BEIR directory's ``split``
(``:split=S``, default train) and evaluates on its dev split.
"""

from configs import base, beir_ir


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("seed", "lr", "epochs", "no_distill", "negatives", "nf_negatives", "mined",
                                        "gradcache", "beir", "split", "smoke"))
    c = base.base_config()
    c.model_kind = "m3"
    c.seed = int(args.get("seed", 0))
    c.max_length = 128  # all-MiniLM-L6-v2 was trained at 128 tokens; abstracts are cut there
    c.objective.loss = "m3"
    c.objective.loss_kwargs = {"scale": 50.0, "self_distill": not args.get("no_distill", False)}
    c.objective.dropout = False
    c.objective.gradcache_chunk = int(args.get("gradcache", 0))
    c.optim.learning_rate = float(args.get("lr", 2e-5))
    c.num_epochs = float(args.get("epochs", 1.0))
    c.data.kind = "beir"
    c.data.pack_length = 0  # three-head runs read padded batches
    c.data.buckets = (16, 32, 64, 128, 192, 256)
    evals = beir_ir.beir_data(c, args, "sum/ndcg@10")
    c.evals = {name: {**spec, "type": "m3_retrieval"} for name, spec in evals.items()}
    c.eval_every = 10_000  # one evaluation, after the last step (as configs/beir_ir.py)
    c.eval_start = False   # the fresh heads are random
    c.eval_export = False
    c.checkpoint.every = 50
    return base.maybe_smoke(c, args)
