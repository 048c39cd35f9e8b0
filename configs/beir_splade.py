"""A SPLADE model (learned sparse retrieval, arXiv:2107.05720 / 2109.10086): all-MiniLM-L6-v2 with an MLM
head over its tied word embeddings, trained on SciFact + NFCorpus train (BEIR) with InfoNCE on sparse
dot products plus the FLOPS regulariser, evaluated by exact inverted-index search on SciFact dev and
NFCorpus dev (nDCG@10, active terms per query and document, FLOPS), selected on their mean.

all-MiniLM-L6-v2 ships no MLM head (it is a ``BertModel``): the head starts as the identity
(``splade.head_init="identity"``, ``embedjax.sparse.init_mlm_head``): each token's normalised final
state read against the tied word embeddings, less 4, so every text starts with a few hundred to two
thousand lexical terms (its own words and their neighbours; SciFact dev nDCG@10 0.47 with 256 terms
before any training). transformers' random head (``head_init="random"``) starts with every one of the
30,522 terms active, and the FLOPS regulariser does not prune them in a CPU-sized run. The regulariser
warms up quadratically over the first third of the steps. On a 2-core Xeon: 101 steps of 8.0 s
(13.5 minutes) and 8 minutes of evaluation, then SciFact dev / NFCorpus dev nDCG@10 55.41 / 25.49
(3 seeds; level with sentence-transformers' SparseEncoder trainer, benchmarks/README.md).
The data, order and hard negatives are configs/beir_ir.py's (first mine its negatives: its
docstring has the ``scripts/mine.py --beir`` command):

    python scripts/train.py --config configs/beir_splade.py --workdir workdirs/beir_splade

Variants: ``:seed=N``, ``:lr=X``, ``:epochs=E``, ``:qw=X`` / ``:dw=X`` (the query / document FLOPS
weights; ``qw=0`` leaves the queries unregularised), ``:negatives=K`` / ``:nf_negatives=K`` (mined
negatives per query and step, as configs/beir_ir.py), ``:mined=DIR``, ``:top_k=K`` (evaluation keeps
each vector's K largest terms; default all), ``:inference_free`` (queries are a learned weight per
vocabulary id, no transformer: SPLADE-doc, sentence-transformers' SparseStaticEmbedding; the query
FLOPS weight off), ``:smoke``. Any other BEIR directory: ``:beir=DIR`` trains
on its ``split`` (``:split=S``, default train) with in-batch negatives and evaluates on its dev split:

    python scripts/train.py --config configs/beir_splade.py:beir=data/my_beir --workdir workdirs/my_splade
"""

from configs import base, beir_ir


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("seed", "lr", "epochs", "qw", "dw", "negatives", "nf_negatives", "mined",
                                        "top_k", "beir", "split", "inference_free", "smoke"))
    c = base.base_config()
    c.model_kind = "splade"
    c.seed = int(args.get("seed", 0))
    c.max_length = 128  # all-MiniLM-L6-v2 was trained at 128 tokens; abstracts are cut there
    c.objective.loss = "infonce"
    c.objective.loss_kwargs = {"scale": 1.0, "similarity": "dot"}  # SparseMultipleNegativesRankingLoss's
    c.objective.dropout = False
    c.splade.inference_free = bool(args.get("inference_free", False))
    c.splade.query_weight = float(args.get("qw", 0.0 if c.splade.inference_free else 5e-5))
    c.splade.document_weight = float(args.get("dw", 3e-5))
    c.optim.learning_rate = float(args.get("lr", 2e-5))
    c.num_epochs = float(args.get("epochs", 1.0))
    c.data.kind = "beir"
    c.data.pack_length = 0  # SPLADE reads padded batches
    c.data.buckets = (16, 32, 64, 128, 192, 256)
    top_k = int(args.get("top_k", 0))
    evals = beir_ir.beir_data(c, args)
    c.evals = {name: {**spec, "type": "sparse_retrieval", **({"top_k": top_k} if top_k else {})}
               for name, spec in evals.items()}
    c.eval_every = 10_000  # one evaluation, after the last step (as configs/beir_ir.py)
    c.eval_start = False   # the untrained head's score is the probe's (configs docstring); the run's is after training
    c.eval_export = False
    c.checkpoint.every = 50
    return base.maybe_smoke(c, args)
