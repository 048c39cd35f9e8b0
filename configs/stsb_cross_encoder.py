"""A cross-encoder on STS-B: all-MiniLM-L6-v2's backbone reads both sentences together and a fresh
one-logit head scores the pair; binary cross-entropy on the gold score / 5, as
sentence-transformers' CrossEncoder STS-B example trains it (4 epochs of 16, lr 2e-5, 10% warmup).
Selected on STS-B dev (Spearman of the scores), SICK trial reported beside it.

    python scripts/train.py --config configs/stsb_cross_encoder.py --workdir workdirs/stsb_cross_encoder
    python scripts/train.py --config configs/stsb_cross_encoder.py:smoke --workdir /tmp/smoke

The export (the workdir) is a ``BertForSequenceClassification`` directory that
``sentence_transformers.CrossEncoder`` and ``embedjax.load_cross_encoder`` load. Variants:
``:smoke``, ``:epochs=N``, ``:seed=N``.
"""

from configs import base


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "epochs", "seed"))
    c = base.base_config()
    c.model_kind = "cross_encoder"
    c.num_labels = 1
    c.max_length = 128
    c.seed = int(args.get("seed", 0))
    c.objective.loss = "bce"
    c.objective.loss_kwargs = {"label_range": (0.0, 5.0)}
    c.data.kind = "stsb"
    c.data.train = str(base.DATA / "stsb" / "sts-train.csv")
    c.data.pack_length = 128  # a pair is ~30-60 tokens: two or three per packed row
    c.batch_size = 16
    c.num_epochs = float(args.get("epochs", 4))
    c.optim.learning_rate = 2e-5
    c.optim.warmup = 0.1
    c.log_every = 20
    c.eval_every = 180  # half an epoch
    c.checkpoint.every = 180
    c.evals = {
        "dev": {"type": "cross_sts", "path": str(base.DATA / "stsb" / "sts-dev.csv"), "format": "stsb"},
        "sick_trial": {"type": "cross_sts", "path": str(base.DATA / "sick" / "SICK_trial.txt"), "format": "sick"},
    }
    c.select_metric = "dev/spearman"
    return base.maybe_smoke(c, args)
