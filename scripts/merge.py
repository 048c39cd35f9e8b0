"""Merge fine-tuned models of one architecture into one exported model.

    python scripts/merge.py --method uniform --models runs/a,runs/b --output merged/
    python scripts/merge.py --method greedy --models runs/a,runs/b,runs/c --dev data/stsb/sts-dev.csv --output merged/
    python scripts/merge.py --method delta --base sentence-transformers/all-MiniLM-L6-v2 \\
        --models runs/ir,runs/sts --output merged/
    python scripts/merge.py --method self_positioning --base BASE --models runs/ir,runs/sts --dev dev.csv \\
        --output merged/
    python scripts/merge.py --method task_arithmetic --base BASE --models runs/a,runs/b --coefficients 0.6,0.4 \\
        --output merged/

Methods (embedjax/merge.py): ``uniform`` (model soup, optionally --weights), ``greedy`` (greedy
soup, needs --dev), ``delta`` (CoDiEmb's delta-guided fusion, needs --base), ``task_arithmetic``
(needs --base and --coefficients) and ``self_positioning`` (coefficients searched on --dev,
needs --base).

--models: comma-separated exported model directories, hub ids or training workdirs (their
exported model; with --checkpoints also every kept best / latest checkpoint). --dev: an STS file
(--dev_format stsb | sick | senteval | scored) scored by --metric; with it, every candidate's dev
score and the merged model's are printed. The merged model keeps the first model's tokenizer,
pooling, prompts and normalisation. Bad input is one line on stderr and exit status 2
(--debug: the traceback).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from embedjax import cli  # noqa: E402

METHODS = ("uniform", "greedy", "delta", "task_arithmetic", "self_positioning")
NEEDS_BASE = ("delta", "task_arithmetic", "self_positioning")
NEEDS_DEV = ("greedy", "self_positioning")

# Strings checked in main (not DEFINE_enum): a bad value is then one line and exit status 2.
_METHOD = flags.DEFINE_string("method", None, f"one of {', '.join(METHODS)}")
_MODELS = flags.DEFINE_string("models", None, "comma-separated model directories, hub ids or training workdirs")
_BASE = flags.DEFINE_string("base", None, "the pretrained model the models were fine-tuned from (delta, "
                            "task_arithmetic, self_positioning)")
_DEV = flags.DEFINE_string("dev", None, "STS dev file for greedy / self_positioning (and to report scores)")
_DEV_FORMAT = flags.DEFINE_string("dev_format", None, "stsb | sick | senteval | scored; default: inferred "
                                  "(a directory: senteval, a name with 'sick': sick, else stsb)")
_METRIC = flags.DEFINE_string("metric", "cosine_spearman", "the STS key that scores a model (higher is better)")
_OUTPUT = flags.DEFINE_string("output", None, "directory for the merged model")
_CHECKPOINTS = flags.DEFINE_bool("checkpoints", False, "a workdir also gives its kept best / latest checkpoints")
_WEIGHTS = flags.DEFINE_string("weights", "", "uniform: comma-separated weights, one per model (default equal)")
_COEFFICIENTS = flags.DEFINE_string("coefficients", "", "task_arithmetic: comma-separated lambdas, one per model")
_POWER = flags.DEFINE_float("power", 1.0, "delta: exponent of |theta_i - theta_0| in the fusion weights")
_GRANULARITY = flags.DEFINE_string("granularity", "element", "delta: 'element' or 'tensor' fusion weights")
_MAX_EVALS = flags.DEFINE_integer("max_evals", 40, "self_positioning: the most dev evaluations of the search")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "encode batch size for --dev")
_DEBUG = flags.DEFINE_bool("debug", False, "on an error, show the full traceback instead of one line")


def numbers(flag: str, text: str, count: int) -> list[float]:
    """``"0.5,0.5"`` -> [0.5, 0.5]; ValueError naming ``flag`` unless there are ``count`` numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r}: expected comma-separated numbers") from None
    if len(values) != count:
        raise ValueError(f"{flag}={text!r}: expected {count} numbers (one per model), got {len(values)}")
    return values


def dev_format(path: str) -> str:
    p = Path(path)
    return _DEV_FORMAT.value or ("senteval" if p.is_dir() else "sick" if "sick" in p.name.lower() else "stsb")


def check_flags() -> list[str]:
    """The model list; ValueError (one line) for a missing or contradictory flag, before loading anything."""
    method = _METHOD.value
    if method not in METHODS:
        raise ValueError(f"--method={method!r}: expected one of {', '.join(METHODS)}")
    models = [m.strip() for m in (_MODELS.value or "").split(",") if m.strip()]
    if not models:
        raise ValueError("--models: expected comma-separated model directories, hub ids or workdirs")
    if not _OUTPUT.value:
        raise ValueError("--output: expected a directory for the merged model")
    if method in NEEDS_BASE and not _BASE.value:
        raise ValueError(f"--method={method} needs --base (the pretrained model the models were fine-tuned from)")
    if method in NEEDS_DEV and not _DEV.value:
        raise ValueError(f"--method={method} needs --dev (an STS file that scores each merge)")
    if _DEV.value and not Path(_DEV.value).exists():
        raise FileNotFoundError(f"--dev: no such file or directory {_DEV.value}")
    if method == "task_arithmetic" and not _COEFFICIENTS.value:
        raise ValueError("--method=task_arithmetic needs --coefficients (one lambda per model)")
    if _GRANULARITY.value not in ("element", "tensor"):
        raise ValueError(f"--granularity={_GRANULARITY.value!r}: expected 'element' or 'tensor'")
    if _MAX_EVALS.value < 1:
        raise ValueError(f"--max_evals={_MAX_EVALS.value}: expected a positive integer")
    return models


def main(argv) -> None:
    """Loads the models, merges them as --method says and exports the result (absl's main: returns
    None, since a returned value would be absl's exit status)."""
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("embedjax").setLevel(logging.INFO)
    from embedjax import merge
    from embedjax.model import load_pretrained

    paths = check_flags()
    method = _METHOD.value
    candidates = merge.load_candidates(paths, checkpoints=_CHECKPOINTS.value)
    names = [c.name for c in candidates]
    params = [c.encoder.params for c in candidates]
    template = candidates[0].encoder
    base = load_pretrained(_BASE.value).params if method in NEEDS_BASE else None
    merge.check_compatible(params if base is None else [base, *params],
                           names if base is None else ["--base", *names])
    score_fn = None
    if _DEV.value:
        score_fn = merge.sts_scorer(template, _DEV.value, _METRIC.value, format=dev_format(_DEV.value),
                                    batch_size=_BATCH_SIZE.value)
    print(f"{len(candidates)} models: " + ", ".join(names))

    if method == "uniform":
        weights = numbers("--weights", _WEIGHTS.value, len(params)) if _WEIGHTS.value else None
        merged = merge.uniform_soup(params, weights, names=names)
    elif method == "greedy":
        merged, report = merge.greedy_soup(params, score_fn, names=names)
        for step in report:
            print(f"  {step.name}: dev {_METRIC.value} {step.own_score:.4f}; soup with it {step.soup_score:.4f} -> "
                  f"{'kept' if step.kept else 'rejected'}")
    elif method == "delta":
        merged = merge.delta_fusion(base, params, power=_POWER.value, granularity=_GRANULARITY.value, names=names)
    elif method == "task_arithmetic":
        merged = merge.task_arithmetic(base, params, numbers("--coefficients", _COEFFICIENTS.value, len(params)),
                                       names=names)
    else:
        merged, report = merge.self_positioning(base, params, score_fn, max_evals=_MAX_EVALS.value, names=names)
        print(f"  self positioning: coefficients {', '.join(f'{c:.4g}' for c in report.coefficients)} "
              f"(dev {_METRIC.value} {report.score:.4f}, {len(report.evaluations)} evaluations)")

    if score_fn is not None and method != "greedy":  # greedy printed its candidates' scores already
        for name, p in zip(names, params):
            print(f"  {name}: dev {_METRIC.value} {score_fn(p):.4f}")
    if score_fn is not None:
        print(f"merged ({method}): dev {_METRIC.value} {score_fn(merged):.4f}")
    out = merge.save_merged(template, merged, _OUTPUT.value)
    print(f"merged model exported to {Path(out).absolute()}")


if __name__ == "__main__":
    app.run(lambda argv: cli.run(main, argv, debug=_DEBUG.value))
