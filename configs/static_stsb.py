"""Fine-tune a static token table (a model2vec-style model, embedjax/static.py) on STS-B train with
the same loop and objective as the transformers: AnglE (cosine, in-batch negatives, angle) on mean
token vectors; selected on STS-B dev, with SICK trial and SciFact dev reported beside it.

    python scripts/distill_static.py --output workdirs/minilm_static --dim 256      # all-MiniLM-L6-v2, ~30 s
    python scripts/train.py --config configs/static_stsb.py --workdir workdirs/static_stsb
    python scripts/train.py --config configs/static_stsb.py:model=DIR,smoke --workdir /tmp/smoke

The table is the whole model (29,525 x 256 for MiniLM's vocabulary), so a step is cheap and the
learning rate is an embedding table's, not a transformer's (1e-2: 80.42 best on STS-B dev against
79.48 at 1e-3; benchmarks/README.md, "Static embeddings (model2vec-style)"). Variants: ``model=DIR``
(a static directory: scripts/distill_static.py's output, or any model2vec / StaticEmbedding model),
``lr=``, ``epochs=``, ``smoke``.
"""

from pathlib import Path

from configs import base, stsb_angle

DISTILLED = Path(__file__).resolve().parents[1] / "workdirs" / "minilm_static"


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "model", "lr", "epochs"))
    c = stsb_angle.get_config(None)  # AnglE on STS-B train, dropout off, dev every 20 steps
    c.model = str(args.get("model", DISTILLED))
    c.optim.learning_rate = float(args.get("lr", 1e-2))
    c.num_epochs = float(args.get("epochs", 1.0))
    c.evals.sick_trial = {"type": "sts", "path": str(base.DATA / "sick" / "SICK_trial.txt"), "format": "sick",
                          "metrics": ("cosine",), "layers": (), "dims": ()}
    # a static table embeds SciFact's 5,183 abstracts in seconds: retrieval is checked at every evaluation
    c.evals.scifact_dev = {"type": "retrieval", "path": str(base.DATA / "beir" / "scifact"), "split": "dev"}
    return base.maybe_smoke(c, args)
