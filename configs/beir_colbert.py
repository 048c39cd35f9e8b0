"""A ColBERT model (late interaction, arXiv:2004.12832 / 2112.01488): all-MiniLM-L6-v2 with PyLate's
[Q] / [D] markers and a fresh 128-wide projection, trained on SciFact + NFCorpus train (BEIR) with
InfoNCE on MaxSim scores (PyLate's ``Contrastive``: temperature 1, in-batch and mined hard
negatives, the judged-relevant documents never negatives), evaluated by exact MaxSim search on
SciFact dev and NFCorpus dev (nDCG@10), selected on their mean.

Queries are expanded with [MASK] to 32 tokens; documents are cut at 128 tokens (all-MiniLM-L6-v2
was trained at 128; PyLate's default is 180). The data, order and hard negatives are
configs/beir_ir.py's (first mine its negatives: its docstring has the ``scripts/mine.py --beir``
command):

    python scripts/train.py --config configs/beir_colbert.py --workdir workdirs/beir_colbert

The export is a PyLate model (``pylate.models.ColBERT(workdir)`` loads it). Variants: ``:seed=N``,
``:lr=X``, ``:epochs=E``, ``:dim=D`` (projection width), ``:doc_length=L``, ``:negatives=K`` /
``:nf_negatives=K`` (as configs/beir_ir.py), ``:mined=DIR``, ``:gradcache=C`` (embed C rows at a
time), ``:smoke``. Any other BEIR directory: ``:beir=DIR`` trains on its ``split`` (``:split=S``,
default train) with in-batch negatives and evaluates on its dev split.
"""

from configs import base, beir_ir


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("seed", "lr", "epochs", "dim", "doc_length", "negatives", "nf_negatives",
                                        "mined", "gradcache", "beir", "split", "smoke"))
    c = base.base_config()
    c.model_kind = "colbert"
    c.seed = int(args.get("seed", 0))
    c.colbert.dim = int(args.get("dim", 128))
    c.colbert.query_length = 32
    c.colbert.document_length = int(args.get("doc_length", 128))
    c.objective.loss = "infonce"
    c.objective.loss_kwargs = {"scale": 1.0}  # PyLate's Contrastive: MaxSim sums at temperature 1
    c.objective.dropout = False
    c.objective.gradcache_chunk = int(args.get("gradcache", 0))
    c.optim.learning_rate = float(args.get("lr", 3e-5))
    c.num_epochs = float(args.get("epochs", 1.0))
    c.data.kind = "beir"
    c.data.pack_length = 0  # ColBERT reads padded batches
    c.data.buckets = (16, 32, 64, 128, 192, 256)
    evals = beir_ir.beir_data(c, args)
    c.evals = {name: {**spec, "type": "colbert_retrieval"} for name, spec in evals.items()}
    c.eval_every = 10_000  # one evaluation, after the last step (as configs/beir_ir.py)
    c.eval_start = False   # the fresh projection is random
    c.eval_export = False
    c.checkpoint.every = 50
    return base.maybe_smoke(c, args)
