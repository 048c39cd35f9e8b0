"""2D Matryoshka (layers x dims) fine-tune on STS-B so that shallow layers are usable.

    python scripts/train.py --config configs/stsb_2d.py --workdir workdirs/stsb_2d
    python scripts/train.py --config configs/stsb_2d.py:mode=2dmse --workdir workdirs/stsb_2dmse
    python scripts/train.py --config configs/stsb_2d.py:smoke --workdir /tmp/smoke_2d

Default mode ``adaptive`` = sentence-transformers' Matryoshka2dLoss (AdaptiveLayer over a
Matryoshka inner loss); ``2dmse`` = angle-emb 0.3's 2DMSE v1; ``espresso`` = ESE.
"""

from configs import base, stsb_angle


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("smoke", "mode"))
    c = stsb_angle.get_config(None)
    mode = args.get("mode", "adaptive")
    if mode not in ("adaptive", "2dmse", "espresso"):
        raise ValueError(f"stsb_2d: mode must be adaptive, 2dmse or espresso, got {mode!r}")
    c.objective.layers = mode
    if mode == "adaptive":
        c.objective.matryoshka_dims = [384, 256, 128, 64, 32]
        c.objective.layer_kwargs = {"n_layers_per_step": 5, "layer_weighting": "uniform", "kl_temperature": 0.3,
                                    "detach_teacher": True, "prior_layers_weight": 5.0}
        # Tuned (benchmarks/README.md, "2D Matryoshka grid"): lr 2e-5 and each lower layer weighted like
        # the last (5 layers x 5.0 / 5) move the shallow cells more than lr 1e-5 with prior weight 1.
        c.optim.learning_rate = 2e-5
        c.objective.dropout = True  # as measured (stsb_angle turns it off)
    elif mode == "espresso":
        c.objective.layer_kwargs = {"compression_size": 128}
    # Select on the whole grid, not the full model alone (which peaks early, before the
    # shallow layers have learned much): the mean dev Spearman over layers 1-6 x the dims.
    c.evals.dev.layers = (1, 2, 3, 4, 5)
    c.evals.dev.dims = (256, 128, 64, 32)
    c.select_metric = "dev/cosine_spearman_mean"
    c.num_epochs = 2.0
    c.eval_every = 40
    return base.maybe_smoke(c, args)
