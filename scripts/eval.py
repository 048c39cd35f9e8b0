"""Evaluate a model or a training workdir on STS, retrieval, reranking and pair-classification tasks.

    python scripts/eval.py                                    # all-MiniLM-L6-v2 on STS-B dev
    python scripts/eval.py MODEL_OR_WORKDIR --task sts:data/stsb/sts-dev.csv --task retrieval:data/scifact \\
        --task "reranking:data/askubuntu.jsonl" --task "pair_classification:data/pairs.tsv" --json out.json
    python scripts/eval.py MODEL --task "retrieval:data/nq split=dev query_prompt='query: ' document_prompt='passage: '"
    python scripts/eval.py MODEL --grid --layers 6 3 1 --dims 384 128 32 --json grid.json   # + grid.<task>.png
    python scripts/eval.py MODEL --task retrieval:data/scifact --quantize int8,binary

MODEL_OR_WORKDIR: a checkpoint directory or hub id, or a training workdir (its exported model once
the run finished; before that, its best checkpoint so far). Default: all-MiniLM-L6-v2.

--task TYPE:PATH [key=value ...] (one quoted argument; repeatable). TYPE is sts, retrieval,
reranking, pair_classification or csts; or, for a cross-encoder MODEL, cross_sts, cross_csts or rerank
("rerank:data/scifact split=dev first_stage=all-MiniLM-L6-v2 top_k=100"); PATH a file (STS, reranking jsonl, labelled pairs) or directory
(BEIR: corpus.jsonl, queries.jsonl, qrels/<split>.tsv; SentEval STS12-16 layout). key=value pairs
are the evaluator's options (embedjax/eval/<type>.py, ``from_spec``), values typed like config
variants; ``name=...`` names the task (default: the file or directory name). An STS (or cross_sts) file's format
is inferred (a directory: senteval; a name with "sick": sick; else stsb) unless format= is given.
Default task: sts on $EMBEDJAX_DATA/stsb/sts-dev.csv, else ../shared/data/stsb/sts-dev.csv beside
the repository (as configs/base.py).

--grid evaluates every task over (layers x dims) cells (default: every depth, and the full width
halved down to 32), prints a table per task and, with --json or --plots, writes a heat-map PNG per
task. --quantize int8,binary scores int8 and binary embeddings next to float32.
Bad input is one line on stderr and exit status 2, before any evaluation (--debug: the traceback).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedjax import cli, hf  # noqa: E402
from embedjax.eval import suite  # noqa: E402
from embedjax.eval.grid import GridEvaluator  # noqa: E402
from configs.base import DATA, typed_value  # noqa: E402  (one data-dir rule and one value typing for configs and CLIs)


def default_data() -> Path:
    """STS-B dev under ``$EMBEDJAX_DATA``, else ``../shared/data`` beside the repository (configs/base.py)."""
    return DATA / "stsb" / "sts-dev.csv"


def check_range(flag: str, values, limit: int | None = None, why: str = "") -> None:
    """Raises ValueError (one line) unless every value is in 1..limit (>= 1 when limit is None)."""
    bad = [v for v in values or () if v < 1 or (limit is not None and v > limit)]
    if bad:
        expected = "positive integers" if limit is None else f"values in 1..{limit} ({why})"
        raise ValueError(f"{flag} {' '.join(map(str, bad))}: expected {expected}")


def parse_task(text: str) -> tuple[str, dict]:
    """``"retrieval:DIR split=dev k_values=(1,10)"`` -> ``("DIR's name", {"type": "retrieval", "path": DIR, ...})``."""
    try:
        head, *options = shlex.split(text)
    except ValueError as err:
        raise ValueError(f"--task {text!r}: {err}") from None
    kind, sep, path = head.partition(":")
    if not sep or not path:
        raise ValueError(f"--task {text!r}: expected TYPE:PATH with TYPE one of {sorted(suite.TYPES)}")
    if kind not in suite.TYPES:
        raise ValueError(f"--task {text!r}: unknown type {kind!r}; choose one of {sorted(suite.TYPES)}")
    spec: dict = {"type": kind, "path": path}
    for option in options:
        key, eq, value = option.partition("=")
        if not eq or not key:
            raise ValueError(f"--task {text!r}: option {option!r} is not key=value")
        spec[key] = value if key == "name" else _option_value(key, value)
    name = spec.pop("name", None) or Path(path.rstrip("/")).stem or kind
    if kind in ("sts", "cross_sts") and "format" not in spec:
        p = Path(path)
        spec["format"] = "senteval" if p.is_dir() else "sick" if "sick" in p.name.lower() else "stsb"
    return name, spec


LIST_OPTIONS = ("metrics", "k_values")  # always sequences, even with one value


def _option_value(key: str, value: str):
    """``"a,b"`` -> ``("a", "b")`` (shlex has eaten any quotes), else typed like config variants."""
    if "," in value or key in LIST_OPTIONS:
        return tuple(typed_value(v.strip()) for v in value.strip("()[]").split(",") if v.strip())
    return typed_value(value)


def unique_names(tasks: list[tuple[str, dict]]) -> dict[str, dict]:
    """Task names as keys; a repeated name gets ``_2``, ``_3``, ..."""
    out: dict[str, dict] = {}
    for name, spec in tasks:
        key, i = name, 2
        while key in out:
            key, i = f"{name}_{i}", i + 1
        out[key] = spec
    return out


def default_grid(num_layers: int, width: int) -> tuple[list[int], list[int]]:
    """Every depth, and the full width halved down to 32 (at least the full width)."""
    dims, d = [width], width // 2
    while d >= 32:
        dims.append(d)
        d //= 2
    return list(range(num_layers, 0, -1)), dims


def load_cross_model(path: str):
    """A ``CrossEncoder`` from a checkpoint / hub id or a finished cross-encoder run's workdir."""
    import embedjax
    from embedjax.train import encoders

    p = Path(path)
    if encoders.is_workdir(p) and not (p / "config.json").is_file():
        raise ValueError(f"{p}: this cross-encoder run has not exported a model yet (its checkpoints are evaluated "
                         "during training; the export appears when the run finishes)")
    return embedjax.load_cross_encoder(path)


def load_model(path: str):
    """An ``Encoder`` from a checkpoint / hub id, or from a training workdir (exported model, else
    its best checkpoint so far)."""
    import embedjax
    from embedjax.train import encoders

    p = Path(path)
    if encoders.is_workdir(p) and not (p / "config.json").is_file():
        best = encoders.best_checkpoint_encoder(p)
        print(f"{p}: no exported model yet; evaluating its {best.describe()}")
        return best.encoder
    return embedjax.load_pretrained(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="checkpoint directory, hub id, or training workdir")
    ap.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)  # the older spelling
    ap.add_argument("--task", action="append", default=[], metavar="TYPE:PATH [key=value ...]",
                    help=f"a task (repeatable); TYPE in {sorted(suite.TYPES)}")
    ap.add_argument("--grid", action="store_true", help="evaluate every task over (layers x dims) cells")
    ap.add_argument("--layers", "--num-layers", dest="layers", nargs="+", type=int, default=None,
                    help="grid depths (implies --grid; --num-layers is scripts/encode.py's spelling)")
    ap.add_argument("--dims", "--dim", dest="dims", nargs="+", type=int, default=None,
                    help="grid widths (implies --grid; --dim is scripts/encode.py's spelling)")
    ap.add_argument("--quantize", default="", help="also score these precisions: int8, binary (comma-separated)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None, help="write every metric to this JSON file")
    ap.add_argument("--plots", type=Path, default=None, help="directory for grid heat maps (default: beside --json)")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)
    model = args.model or args.model_flag or hf.minilm_l6()
    for flag, values in (("--dims", args.dims), ("--layers", args.layers), ("--batch-size", [args.batch_size])):
        check_range(flag, values)  # before reading or loading anything
    tasks = unique_names([parse_task(t) for t in args.task] or
                         [("sts-dev", {"type": "sts", "path": str(default_data()), "format": "stsb"})])
    quantize = suite.as_tuple(args.quantize)
    for spec in tasks.values():
        spec.setdefault("batch_size", args.batch_size)
        if quantize:
            spec["quantize"] = quantize
    evaluators = suite.from_config(tasks)  # reads every file: bad input fails before the model loads
    grid = args.grid or args.layers or args.dims
    cross = {spec["type"] in suite.CROSS_TYPES for spec in tasks.values()}
    if len(cross) > 1:
        raise ValueError(f"--task: {'/'.join(suite.CROSS_TYPES)} tasks score a cross-encoder and the others a "
                         "bi-encoder: evaluate them in separate runs")
    if cross == {True} and (grid or quantize):
        raise ValueError("--grid / --layers / --dims / --quantize apply to bi-encoders, not to cross-encoder tasks")

    encoder = load_cross_model(model) if cross == {True} else load_model(model)
    if grid:
        check_range("--dims", args.dims, encoder.dim, f"the model's width is {encoder.dim}")
        check_range("--layers", args.layers, encoder.cfg.num_layers, f"the model has {encoder.cfg.num_layers} layers")
        layers, dims = default_grid(encoder.cfg.num_layers, encoder.dim)
        layers, dims = args.layers or layers, args.dims or dims
        # a task with its own layers=/dims= keeps its grid
        evaluators = [e if isinstance(e, GridEvaluator) else GridEvaluator(e, layers=layers, dims=dims)
                      for e in evaluators]

    results: dict[str, float] = {}
    print(f"{model}")
    plots = args.plots or (args.json.parent if args.json else None)
    for evaluator in evaluators:
        metrics = dict(evaluator.run(encoder))
        results.update(metrics)
        print(f"\n{evaluator.name}  (main: {suite.headline(evaluator)} = {metrics[suite.headline(evaluator)]:.4g})")
        if isinstance(evaluator, GridEvaluator):
            print(evaluator.table(metrics))
            if plots is not None:
                stem = args.json.stem if args.json else "grid"
                print(f"  heat map: {evaluator.heatmap(metrics, path=plots / f'{stem}.{evaluator.name}.png')}")
        else:
            for key, value in metrics.items():
                print(f"  {key:<56} {value:10.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": str(model), "tasks": tasks, "metrics": results}, indent=2,
                                        default=str) + "\n")
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    cli.run(main)
