"""C-STS (arXiv:2305.15093) on the re-annotated training split: the paper's three model families on
all-MiniLM-L6-v2, trained on the train side of the split the ``csts`` evaluator carves (by sentence
pair, 10% to dev, seed 0) and selected on its dev side.

- ``family=bi`` (default): a bi-encoder over "sentence condition" texts (each sentence written with
  its condition), trained with CoSENT on the 1-5 labels, scored by the cosine of the two embeddings.
- ``family=tri``: a tri-encoder: the two sentences and the condition embedded apart, a head
  (``head=hadamard``, the default, or ``concat``: embedjax/tri_head.py) conditions each sentence's
  embedding on the condition's; cosine regression (MSE) on (label - 1) / 4, as the paper trains it.
- ``family=cross``: a cross-encoder reading both conditioned sentences together, binary
  cross-entropy on (label - 1) / 4.
- ``loss=quadruplet`` (bi or tri): the pairwise objective over a sentence pair's two conditions
  (losses.quadruplet): the pair must be closer, by a cosine-distance margin, under the
  higher-scored condition; one record per sentence pair.

    python scripts/train.py --config configs/csts.py --workdir workdirs/csts_bi
    python scripts/train.py --config configs/csts.py:family=tri --workdir workdirs/csts_tri
    python scripts/train.py --config configs/csts.py:family=cross --workdir workdirs/csts_cross

Variants: ``:family=bi|tri|cross``, ``:head=hadamard|concat``, ``:loss=quadruplet``, ``:seed=N``,
``:epochs=N``, ``:smoke``. The C-STS authors ask that its text be used for C-STS training and
evaluation only.
"""

from configs import base

FAMILIES = ("bi", "tri", "cross")


def get_config(arg: str | None = None):
    args = base.parse_arg(arg, allowed=("family", "head", "loss", "seed", "epochs", "smoke"))
    family = args.get("family", "bi")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    quadruplet = args.get("loss") == "quadruplet"
    if args.get("loss") not in (None, "quadruplet") or (quadruplet and family == "cross"):
        raise ValueError(f"loss takes 'quadruplet' (families bi and tri), got {args.get('loss')!r} for {family!r}")
    if "head" in args and family != "tri":
        raise ValueError("head applies to family=tri")
    c = base.base_config()
    c.seed = int(args.get("seed", 0))
    c.max_length = 128
    c.data.kind = "csts"
    c.data.train = str(base.DATA / "csts" / "train.csv")
    c.data.split = "train"
    c.num_epochs = float(args.get("epochs", 1))
    c.optim.learning_rate = 2e-5
    c.eval_every = 100
    c.checkpoint.every = 100
    dev = {"path": str(base.DATA / "csts" / "train.csv"), "split": "dev"}
    if family in ("bi", "tri"):
        c.batch_size = 32
        c.evals = {"csts_dev": {"type": "csts", **dev, "family": family}}
        c.select_metric = "csts_dev/cosine_spearman"
        if family == "bi":
            c.objective.loss = "cosent"  # ranks the pairs by label: the 1-5 scale needs no rescaling
        else:
            c.model_kind, c.tri_head = "tri_encoder", args.get("head", "hadamard")
            c.data.csts_records = "tri"
            c.objective.loss = "cosine_mse"
            c.objective.loss_kwargs = {"label_range": (1.0, 5.0)}
        if quadruplet:
            c.data.csts_records = f"{'conditioned' if family == 'bi' else 'tri'}_quadruplets"
            c.objective.loss, c.objective.loss_kwargs = "quadruplet", {}
    else:
        c.model_kind = "cross_encoder"
        c.objective.loss = "bce"
        c.objective.loss_kwargs = {"label_range": (1.0, 5.0)}
        c.data.pack_length = 128
        c.batch_size = 16
        c.eval_every = c.checkpoint.every = 200
        c.evals = {"csts_dev": {"type": "cross_csts", **dev}}
        c.select_metric = "csts_dev/spearman"
    return base.maybe_smoke(c, args)
