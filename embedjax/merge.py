"""Model merging: combine fine-tuned checkpoints of one architecture in weight space.

Every merge is a pure function of parameter pytrees (the plain nested dicts of
``embedjax.load_pretrained(path).params``); trees must have the same structure and leaf
shapes (``check_compatible`` names the first difference):

* ``uniform_soup``: the (weighted) average of every leaf (Wortsman et al., model soups,
  arXiv:2203.05482).
* ``greedy_soup``: the soup's greedy recipe: candidates in order of their own dev score,
  each kept only if the soup with it scores at least as well as without.
* ``task_arithmetic``: ``theta_0 + sum_i lambda_i (theta_i - theta_0)`` (Ilharco et al.,
  arXiv:2212.04089), the building block of the next two.
* ``delta_fusion``: CoDiEmb's delta-guided fusion (arXiv:2508.11442): at every parameter,
  each model weighs by how far it moved from the pretrained model.
* ``self_positioning``: Self Positioning (Li et al., arXiv:2410.15035): task arithmetic
  whose coefficients are searched on a small probe set.

Around them (side effects): ``load_candidates`` reads exported models and training workdirs
(optionally their best / latest checkpoints), ``sts_scorer`` turns an STS dev file into a
``score_fn(params) -> float`` and ``save_merged`` exports the result like a trained model.
``scripts/merge.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax.sharding import param_path as _path_name

log = logging.getLogger(__name__)

ScoreFn = Callable[[Any], float]


# --------------------------------------------------------------------------- tree checks


def _named_leaves(tree) -> dict[str, Any]:
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def check_compatible(trees: Sequence[Any], names: Sequence[str] | None = None) -> None:
    """Raises ``ValueError`` unless every tree has the first one's structure and leaf shapes.

    The message names the model (``names[i]``, default ``model i``) and the first differing
    parameter path (in the first tree's order): a leaf missing on one side, an extra leaf,
    or different shapes.
    """
    if not trees:
        raise ValueError("no models to merge: expected at least one parameter tree")
    names = _model_names(names, len(trees))
    if len(names) != len(trees):
        raise ValueError(f"{len(names)} names for {len(trees)} models")
    ref = _named_leaves(trees[0])
    for name, tree in zip(names[1:], trees[1:]):
        leaves = _named_leaves(tree)
        for path, leaf in ref.items():
            if path not in leaves:
                raise ValueError(f"{name} has no parameter {path!r} that {names[0]} has (shape "
                                 f"{tuple(np.shape(leaf))}); expected models of one architecture")
            if np.shape(leaves[path]) != np.shape(leaf):
                raise ValueError(f"{name}: parameter {path!r} has shape {tuple(np.shape(leaves[path]))}, "
                                 f"{names[0]} has {tuple(np.shape(leaf))}; expected the same shapes")
        extra = [p for p in leaves if p not in ref]
        if extra:
            raise ValueError(f"{name} has parameter {extra[0]!r} that {names[0]} lacks; expected models of one "
                             "architecture")
        if jax.tree.structure(tree) != jax.tree.structure(trees[0]):
            raise ValueError(f"{name}'s parameter tree is nested differently from {names[0]}'s (same leaf names)")


def _combine(trees: Sequence[Any], fn: Callable[..., Any]):
    """``fn(*leaves)`` at every leaf, computed in float32 and cast back to the first tree's dtype.

    A non-float leaf (an integer buffer) cannot be averaged: it must be equal in every tree
    and is kept as it is.
    """

    def leaf(path, *xs):
        x0 = xs[0]
        if not jnp.issubdtype(jnp.result_type(x0), jnp.floating):
            if any(not np.array_equal(np.asarray(x), np.asarray(x0)) for x in xs[1:]):
                raise ValueError(f"parameter {_path_name(path)!r} is {jnp.result_type(x0)} and differs between "
                                 "models; only floating-point parameters can be merged")
            return x0
        return fn(*(jnp.asarray(x, jnp.float32) for x in xs)).astype(jnp.result_type(x0))

    return jax.tree_util.tree_map_with_path(leaf, trees[0], *trees[1:])


def _model_names(names: Sequence[str] | None, n: int, *, base: bool = False) -> list[str]:
    """``names`` (default ``model i``), preceded by ``"base"`` when a base tree comes first."""
    names = list(names) if names is not None else [f"model {i}" for i in range(n)]
    return ["base", *names] if base else names


def _check_weights(weights, n: int, what: str = "weights") -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"{what}: expected {n} numbers (one per model), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{what}: expected finite numbers, got {w.tolist()}")
    return w


# --------------------------------------------------------------------------- soups


def uniform_soup(params_list: Sequence[Any], weights: Sequence[float] | None = None, *,
                 names: Sequence[str] | None = None):
    """The average of the models' parameters, leaf by leaf (a model soup, arXiv:2203.05482).

    Args:
      params_list: K parameter pytrees of one architecture (same structure and leaf shapes).
      weights: K non-negative numbers, normalised to sum to 1 (default: 1/K each).
      names: model names for error messages.

    Returns a pytree like ``params_list[0]``: ``sum_k w_k theta_k`` at every leaf (float32
    arithmetic, the first tree's dtypes).
    """
    params_list = list(params_list)
    check_compatible(params_list, names)
    n = len(params_list)
    w = np.full(n, 1.0 / n) if weights is None else _check_weights(weights, n)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights: expected non-negative numbers with a positive sum, got {w.tolist()}")
    w = (w / w.sum()).astype(np.float32)
    return _combine(params_list, lambda *xs: sum(wk * x for wk, x in zip(w, xs)))


@dataclasses.dataclass
class GreedyStep:
    """One candidate of ``greedy_soup``: its own score, whether the soup kept it, the score of
    the soup with it (``soup_score``, the candidate's own score for the first) and the soup's
    score after the try (``best_score``: unchanged when rejected)."""

    name: str
    own_score: float
    kept: bool
    soup_score: float
    best_score: float


def greedy_soup(candidates: Sequence[Any], score_fn: ScoreFn, *, names: Sequence[str] | None = None):
    """The greedy soup of arXiv:2203.05482 (its Recipe 1).

    Candidates are sorted by their own score (descending; stable, so ties keep the given
    order). The soup starts as the best one; each next candidate is added when the uniform
    soup of the kept ones plus it scores >= the soup's current score (ties are kept, as in
    the paper).

    Args:
      candidates: parameter pytrees of one architecture.
      score_fn: ``score_fn(params) -> float``, higher is better (e.g. ``sts_scorer``).
        Called 2K - 1 times for K candidates.
      names: one name per candidate for the report (default ``model i``).

    Returns ``(params, report)``: the soup's parameters and one ``GreedyStep`` per candidate
    in the order they were tried.
    """
    candidates = list(candidates)
    names = _model_names(names, len(candidates))
    check_compatible(candidates, names)
    own = [_score(score_fn, c, n) for c, n in zip(candidates, names)]
    order = sorted(range(len(candidates)), key=lambda i: -own[i])
    kept = [order[0]]
    best = own[order[0]]
    report = [GreedyStep(names[order[0]], own[order[0]], True, best, best)]
    for i in order[1:]:
        trial = uniform_soup([candidates[k] for k in kept + [i]])
        score = _score(score_fn, trial, f"soup + {names[i]}")
        keep = score >= best
        if keep:
            kept.append(i)
            best = score
        report.append(GreedyStep(names[i], own[i], keep, score, best))
    return uniform_soup([candidates[k] for k in kept]), report


def _score(score_fn: ScoreFn, params, what: str) -> float:
    value = float(score_fn(params))
    if math.isnan(value):
        raise ValueError(f"score_fn returned NaN for {what}; expected a number (higher = better)")
    return value


# --------------------------------------------------------------------------- task vectors


def task_arithmetic(base, finetuned_list: Sequence[Any], coefficients: Sequence[float], *,
                    names: Sequence[str] | None = None):
    """``theta_0 + sum_i lambda_i (theta_i - theta_0)`` at every leaf (arXiv:2212.04089).

    Args:
      base: the pretrained parameters theta_0.
      finetuned_list: K fine-tuned parameter trees theta_i of the same architecture.
      coefficients: K numbers lambda_i (any sign; 1/K each gives the uniform soup).

    Returns a pytree like ``base``.
    """
    finetuned_list = list(finetuned_list)
    check_compatible([base, *finetuned_list], _model_names(names, len(finetuned_list), base=True))
    lam = _check_weights(coefficients, len(finetuned_list), "coefficients").astype(np.float32)
    return _combine([base, *finetuned_list], lambda b, *xs: b + sum(l * (x - b) for l, x in zip(lam, xs)))


def delta_weights(base, finetuned_list: Sequence[Any], *, power: float = 1.0, granularity: str = "element"):
    """CoDiEmb's per-parameter fusion weights (arXiv:2508.11442): one pytree per model.

    ``w_i = |theta_i - theta_0|^p / sum_j |theta_j - theta_0|^p``, elementwise by default
    (``granularity="tensor"``: the mean ``|theta_i - theta_0|`` of each whole tensor instead,
    one weight per model and tensor). Where every model's delta is 0 the weights are 1/K
    (the uniform soup: nothing says one model matters more). Weights are float32 and sum to
    1 over the models at every element.

    Our reading of the paper: a parameter a fine-tuned model changed a lot is one that model's
    task needed, so that model should dominate it; the weights are the deltas' magnitudes
    normalised over the models at each parameter. ``power`` (default 1, the paper's linear
    weighting) sharpens (> 1) or flattens (< 1; 0 is the uniform soup) that preference; it
    is our knob, not the paper's.
    """
    if granularity not in ("element", "tensor"):
        raise ValueError(f"granularity must be 'element' or 'tensor', got {granularity!r}")
    if not (math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0, got {power}")
    finetuned_list = list(finetuned_list)
    n = len(finetuned_list)

    def weights_at(b, *xs):
        mags = [jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(b, jnp.float32)) for x in xs]
        if granularity == "tensor":
            mags = [jnp.broadcast_to(jnp.mean(m), m.shape) for m in mags]
        mags = jnp.stack(mags) ** power if power else jnp.ones((n,) + jnp.shape(b), jnp.float32)
        total = jnp.sum(mags, axis=0)
        # 0/0 where no model moved: the uniform average there
        return jnp.where(total > 0, mags / jnp.where(total > 0, total, 1.0), 1.0 / n)

    check_compatible([base, *finetuned_list], _model_names(None, n, base=True))
    stacked = jax.tree.map(weights_at, base, *finetuned_list)
    return [jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(n)]


def delta_fusion(base, finetuned_list: Sequence[Any], *, power: float = 1.0, granularity: str = "element",
                 names: Sequence[str] | None = None):
    """CoDiEmb's delta-guided fusion (arXiv:2508.11442): ``sum_i w_i * theta_i`` with ``w_i``
    from ``delta_weights`` (each model weighs, at each parameter, by how far it moved from
    ``base``; the uniform average where none moved).

    Args:
      base: the pretrained parameters theta_0 the models were fine-tuned from.
      finetuned_list: K fine-tuned parameter trees (the same architecture as ``base``).
      power, granularity: see ``delta_weights``.
      names: model names for error messages.

    Returns a pytree like ``base``.
    """
    finetuned_list = list(finetuned_list)
    check_compatible([base, *finetuned_list], _model_names(names, len(finetuned_list), base=True))
    weights = delta_weights(base, finetuned_list, power=power, granularity=granularity)
    n = len(finetuned_list)
    return _combine([*finetuned_list, *weights], lambda *xs: sum(xs[i] * xs[n + i] for i in range(n)))


@dataclasses.dataclass
class PositioningReport:
    """What ``self_positioning`` tried: ``evaluations`` lists every ``(coefficients, score)``
    in call order; ``coefficients`` / ``score`` are the best of them."""

    coefficients: tuple[float, ...]
    score: float
    evaluations: list[tuple[tuple[float, ...], float]]


def self_positioning(base, finetuned_list: Sequence[Any], score_fn: ScoreFn, *,
                     grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), bounds: tuple[float, float] = (0.0, 1.0),
                     max_evals: int = 40, min_step: float = 1 / 64, names: Sequence[str] | None = None):
    """Self Positioning (arXiv:2410.15035): the task-arithmetic coefficients that score best on a probe set.

    The paper learns the coefficients lambda of ``theta_0 + sum_i lambda_i tau_i`` by SGD on
    a probe set's training loss. Here the probe score (e.g. a dev Spearman, not
    differentiable) is maximised by a deterministic derivative-free search:

    1. coarse: every ``lambda_i = g`` for g in ``grid`` (g = 0 is the base model);
    2. refinement (compass search): from the best point, try ``lambda_i +- step`` for each
       model, then moving ``step`` of weight from one model to another (``lambda_i + step``,
       ``lambda_j - step``), all kept within ``bounds``, moving to each improvement; when a
       sweep finds none, halve the step (starting at the grid's spacing) down to ``min_step``.

    Each distinct point is scored once, and never more than ``max_evals`` calls in all.

    Args:
      base: pretrained parameters theta_0.
      finetuned_list: K fine-tuned parameter trees; tau_i = theta_i - theta_0.
      score_fn: ``score_fn(params) -> float``, higher is better (e.g. ``sts_scorer``).
      grid: the coarse values shared by every coefficient (within ``bounds``).
      bounds: ``(low, high)`` for every coefficient.
      max_evals: the most ``score_fn`` calls (>= 1).
      min_step: the finest refinement step.

    Returns ``(params, PositioningReport)``.
    """
    finetuned_list = list(finetuned_list)
    n = len(finetuned_list)
    check_compatible([base, *finetuned_list], _model_names(names, n, base=True))
    lo, hi = (float(b) for b in bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds: expected finite (low, high) with low < high, got {bounds}")
    grid = sorted({float(g) for g in grid})
    if not grid or any(not lo <= g <= hi for g in grid):
        raise ValueError(f"grid: expected values within bounds {bounds}, got {grid}")
    if max_evals < 1:
        raise ValueError(f"max_evals must be >= 1, got {max_evals}")
    if not min_step > 0:
        raise ValueError(f"min_step must be > 0, got {min_step}")

    evaluations: list[tuple[tuple[float, ...], float]] = []
    seen: dict[tuple[float, ...], float] = {}

    def evaluate(lam: tuple[float, ...]) -> float | None:
        if lam in seen:
            return seen[lam]
        if len(evaluations) >= max_evals:
            return None
        score = _score(score_fn, task_arithmetic(base, finetuned_list, lam), f"coefficients {lam}")
        seen[lam] = score
        evaluations.append((lam, score))
        return score

    best, best_score = None, -math.inf
    for g in grid:
        score = evaluate((g,) * n)
        if score is not None and score > best_score:
            best, best_score = (g,) * n, score
    step = float(min(np.diff(grid))) if len(grid) > 1 else (hi - lo) / 4
    directions = _search_directions(n)
    while step >= min_step and len(evaluations) < max_evals:
        moved = False
        for direction in directions:
            lam = tuple(min(hi, max(lo, x + step * d)) for x, d in zip(best, direction))
            score = evaluate(lam)
            if score is not None and score > best_score:
                best, best_score, moved = lam, score, True
        if not moved:
            step /= 2
    report = PositioningReport(tuple(float(x) for x in best), best_score, evaluations)
    return task_arithmetic(base, finetuned_list, best), report


def _search_directions(n: int) -> list[tuple[float, ...]]:
    """+-e_i (one coefficient up or down), then e_i - e_j (weight moved from model j to model i):
    the exchanges follow valleys where the coefficients' sum matters more than their split, which
    single-coefficient moves cross only in tiny steps."""
    axes = [tuple(s * float(k == i) for k in range(n)) for i in range(n) for s in (1.0, -1.0)]
    swaps = [tuple(float(k == i) - float(k == j) for k in range(n)) for i in range(n) for j in range(n) if i != j]
    return axes + swaps


# --------------------------------------------------------------------------- I/O: candidates, scoring, export


@dataclasses.dataclass
class Candidate:
    """A model to merge: ``name`` (path, with ``@best-<step>`` / ``@step-<step>`` for a
    checkpoint) and its ``Encoder`` (params, tokenizer, pooling)."""

    name: str
    encoder: Any


def load_candidates(paths: Sequence[str], *, checkpoints: bool = False) -> list[Candidate]:
    """The models at ``paths``: exported model directories or hub ids (anything
    ``embedjax.load_pretrained`` takes) or training workdirs.

    A workdir gives its exported model (when the run finished) and, with ``checkpoints``,
    also the params of every kept best checkpoint (``workdir/best``) and every kept latest
    checkpoint (``workdir/checkpoints``): each on the run's own encoder (``train_config.json``:
    model, pooling, prompts, LoRA), adapters merged into the weights. A workdir with neither
    an export nor (with ``checkpoints``) a checkpoint is an error.
    """
    from embedjax.model import load_pretrained
    from embedjax.train import encoders

    out: list[Candidate] = []
    for raw in paths:
        path = Path(raw)
        if not encoders.is_workdir(path):
            out.append(Candidate(str(raw), load_pretrained(raw)))
            continue
        exported = (path / "config.json").is_file()
        if exported:
            out.append(Candidate(str(raw), load_pretrained(path)))
        found = workdir_checkpoints(path) if checkpoints else []
        out.extend(found)
        if not exported and not found:
            hint = "" if checkpoints else " (checkpoints=True, --checkpoints in scripts/merge.py, merges its steps)"
            raise FileNotFoundError(f"{path}: a training workdir with no exported model{hint}"
                                    + (" and no checkpoint" if checkpoints else ""))
    return out


def workdir_checkpoints(workdir: str | Path) -> list[Candidate]:
    """Every kept best (``best/``) and latest (``checkpoints/``) step of a training workdir as
    ``Candidate``s named ``<workdir>@best-<step>`` / ``<workdir>@step-<step>``: the saved
    trained params (adapters, with LoRA) on the run's frozen base, adapters merged, on an
    encoder exported with ``normalize=True`` like the run's own export."""
    import orbax.checkpoint as ocp

    from embedjax.train import encoders

    workdir = Path(workdir).absolute()
    _, encoder, trainable, frozen = encoders.run_encoder(workdir)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainable)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)

    def finish(name: str, params) -> Candidate:
        return Candidate(name, encoders.merged_encoder(encoder, params, frozen))

    out = []
    for sub, label, key in (("best", "best", "params"), ("checkpoints", "step", "state")):
        directory = workdir / sub
        if not directory.is_dir():
            continue
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
        try:
            for step in manager.all_steps():
                item = abstract if key == "params" else {"params": abstract}
                args = restore_args if key == "params" else {"params": restore_args}
                restored = manager.restore(step, args=ocp.args.Composite(**{key: ocp.args.PyTreeRestore(
                    item=item, restore_args=args, partial_restore=key == "state")}))[key]
                params = restored if key == "params" else restored["params"]
                out.append(finish(f"{workdir}@{label}-{step}", params))
                log.info("%s: restored %s step %d", workdir, sub, step)
        finally:
            manager.close()
    return out


def sts_scorer(encoder_template, path: str | Path, metric: str = "cosine_spearman", *, format: str = "stsb",
               batch_size: int = 128) -> ScoreFn:
    """``score_fn(params) -> float``: ``metric`` of the STS pairs in ``path`` (``embedjax.eval.sts``,
    x100) for ``encoder_template`` with ``params`` in place of its own.

    Args:
      encoder_template: an ``Encoder`` whose tokenizer, pooling, prompts and normalisation are used.
      path: an STS file (or a SentEval directory) read as ``format``: ``stsb``, ``sick``,
        ``senteval`` or ``scored`` (``STSEvaluator.from_spec``).
      metric: a key the evaluator reports without its prefix, e.g. ``cosine_spearman``.
      batch_size: encode batch size.

    The file is read once, here; a ``metric`` the evaluator does not report raises
    ``KeyError`` (naming the ones it does) on the first call.
    """
    from embedjax.eval import sts

    sim = metric.split("_", 1)[0]
    metrics = (sim,) if sim in sts.similarity.METRICS else sts.DEFAULT_METRICS
    evaluator = sts.from_spec("dev", {"path": str(path), "format": format, "metrics": metrics,
                                      "batch_size": batch_size, "protocol": "pooled"})

    def score_fn(params) -> float:
        scores = evaluator.score(evaluator.embed(dataclasses.replace(encoder_template, params=params)))
        if metric not in scores:
            raise KeyError(f"metric {metric!r} is not among the STS evaluator's {sorted(scores)}")
        return float(scores[metric])

    return score_fn


def save_merged(template, params, directory: str | Path, *, normalize: bool | None = None) -> Path:
    """Exports ``params`` on ``template``'s architecture, tokenizer, pooling, prompts and
    normalisation (``embedjax.export.save_pretrained``; ``normalize`` None: the template's).
    A pooling sentence-transformers cannot express is exported for embedjax only, as training does."""
    from embedjax import export

    merged = dataclasses.replace(template, params=params)
    problem = export.encoder_problem(template)
    return export.save_pretrained(merged, directory, params=params, normalize=normalize,
                                  sentence_transformers=problem is None)
