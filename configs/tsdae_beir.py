"""TSDAE domain adaptation (arXiv:2104.06979): all-MiniLM-L6-v2 adapted, without labels, to the
sentences of the SciFact and NFCorpus corpora (BEIR), then evaluated by retrieval on SciFact dev and
NFCorpus dev (nDCG@10; their mean selects).

Each sentence is damaged by deleting 60% of its words (``data.noise="delete"``), MiniLM embeds the
damaged copy, and a decoder tied to MiniLM's weights (only its cross-attention and LM-head transform
are its own) must rebuild the original sentence from that one vector (``objective.loss="tsdae"``;
sentence-transformers' DenoisingAutoEncoderLoss). The corpora's documents are cut into sentences
(``data.split_sentences``), one source per corpus, sampled by size. The paper's optimiser: AdamW at a
constant 3e-5 without weight decay; batch 32 here (the paper's 8 is slow per example on a CPU).

    python scripts/train.py --config configs/tsdae_beir.py --workdir workdirs/tsdae_beir

The start is not a candidate for the export (``eval_start=False``): the run reports what TSDAE made of
the model, and benchmarks/README.md sets it beside the start's figures. Variants: ``:steps=N``
(default 200), ``:lr=X``, ``:ratio=R`` (deletion ratio), ``:batch=B``, ``:seed=N``, ``:smoke``.
"""

from configs import base, beir_ir

CORPUS_DOCUMENTS = {"scifact": 5183, "nfcorpus": 3633}  # documents per corpus: the sampling weights


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("steps", "lr", "ratio", "batch", "seed", "smoke"))
    c = base.base_config()
    c.seed = int(args.get("seed", 0))
    c.max_length = 128
    c.objective.loss = "tsdae"
    c.objective.dropout = True  # the decoder and encoder train in training mode, as sentence-transformers'
    c.data.kind = "beir_corpus"
    c.data.train = str(base.DATA / "beir" / "scifact")
    c.data.split_sentences = True
    c.data.noise = "delete"
    c.data.noise_ratio = float(args.get("ratio", 0.6))
    c.data.pack_length = 0  # the decoder reads the originals' padded ids
    c.data.buckets = (16, 32, 64, 128)
    c.data.mixture = {name: {"kind": "beir_corpus", "train": str(base.DATA / "beir" / name), "weight": float(n)}
                      for name, n in CORPUS_DOCUMENTS.items()}
    c.data.mixture_mode = "sampled"
    c.batch_size = int(args.get("batch", 32))
    c.num_steps = int(args.get("steps", 200))
    c.optim.learning_rate = float(args.get("lr", 3e-5))
    c.optim.weight_decay = 0.0
    c.optim.warmup = 0
    c.optim.decay = "constant"
    c.evals = {name: dict(spec) for name, spec in beir_ir.RETRIEVAL_EVALS.items()}
    c.select_metric = beir_ir.RETRIEVAL_SELECT
    c.eval_every = 10_000  # one evaluation, after the last step
    c.eval_start = False
    c.eval_export = False
    c.checkpoint.every = 100
    return base.maybe_smoke(c, args)
