"""Unsupervised SimCSE on any text file, one sentence a line: each sentence is its own
positive under a second dropout mask; select on STS-B dev.

    python scripts/train.py --config configs/unsup_simcse.py:file=/path/to/sentences.txt --workdir workdirs/unsup
    python scripts/train.py --config configs/unsup_simcse.py:smoke --workdir /tmp/smoke_unsup

Without ``file=`` it trains on the STS-B train sentences as a stand-in corpus.
"""

from configs import base


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "file"))
    c = base.base_config()
    file = str(args.get("file", ""))  # a str even if the name parses as a number
    c.data.kind = "sentences" if file else "stsb_sentences"
    c.data.format = "txt" if file else None  # stsb_sentences reads the STS-B csv itself
    c.data.train = file or str(base.DATA / "stsb" / "sts-train.csv")
    c.objective.loss = "simcse_unsup"
    c.objective.loss_kwargs = {"scale": 20.0}  # temperature 0.05
    c.objective.dropout = True
    c.batch_size = 64
    c.optim.learning_rate = 3e-5
    return base.maybe_smoke(c, args)
