"""2D Matryoshka grid: STS-B dev Spearman (cosine, x100) for every (layers, dim) cell.

Layers {1..6} x dims {384, 256, 128, 64, 32}, for the base all-MiniLM-L6-v2 and for a model
trained with ``configs/stsb_2d.py`` (``embedjax.load_pretrained(workdir)``). Each model is
encoded once per depth (``STSEvaluator(pairs, dims=..., layers=...)``; only the first k
layers are computed) and every dim is a prefix of that encoding, mean-pooled over the
first k layers' output and L2-normalised after truncation.

    python scripts/train.py --config configs/stsb_2d.py --workdir workdirs/stsb_2d   # train first, or:
    python benchmarks/grid_2d.py --workdir workdirs/stsb_2d --train                  # train if not there
    python benchmarks/grid_2d.py --workdir workdirs/stsb_2d                          # grids + difference
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DEV = ROOT.parent / "shared" / "data" / "stsb" / "sts-dev.csv"
LAYERS = (1, 2, 3, 4, 5, 6)
DIMS = (384, 256, 128, 64, 32)


def grid(encoder, pairs, layers=LAYERS, dims=DIMS) -> dict[tuple[int, int], float]:
    from embedjax.eval import STSEvaluator

    ev = STSEvaluator(pairs, name="dev", metrics=("cosine",), dims=dims, layers=layers)
    out = {}
    for key, value in ev.run(encoder):
        if "_spearman" not in key:
            continue
        _, layer, dim = key.split("@")  # dev/cosine_spearman@L{k}@{dim}
        out[(int(layer[1:]), int(dim))] = value
    return out


def table(title: str, g: dict, layers=LAYERS, dims=DIMS, signed: bool = False) -> str:
    fmt = "{:+7.2f}" if signed else "{:7.2f}"
    lines = [title, "| layers | " + " | ".join(str(d) for d in dims) + " |",
             "|---:|" + "---:|" * len(dims)]
    for k in layers:
        lines.append(f"| {k} | " + " | ".join(fmt.format(g[(k, d)]).strip() for d in dims) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a configs/stsb_2d.py run directory (the exported model)")
    ap.add_argument("--train", action="store_true", help="train it first with scripts/train.py if not there")
    ap.add_argument("--config", default="configs/stsb_2d.py", help="config for --train")
    ap.add_argument("--config-override", nargs="*", default=[], metavar="--config.KEY=VALUE")
    ap.add_argument("--base", default=None, help="base model (default: embedjax.hf.minilm_l6())")
    ap.add_argument("--dev", default=str(DEFAULT_DEV))
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    import embedjax
    from embedjax import hf
    from embedjax.data import read_stsb

    workdir = Path(args.workdir)
    if args.train and not (workdir / "summary.json").exists():  # resumes a partial run
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", args.config, "--workdir", str(workdir),
               *args.config_override]
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)

    pairs = read_stsb(args.dev)
    t0 = time.perf_counter()
    base = grid(embedjax.load_pretrained(args.base or hf.minilm_l6()), pairs)
    trained = grid(embedjax.load_pretrained(workdir), pairs)
    diff = {k: trained[k] - base[k] for k in base}
    print(table("base all-MiniLM-L6-v2 (STS-B dev Spearman x100, cosine)", base))
    print()
    print(table(f"2D-trained ({workdir})", trained))
    print()
    print(table("difference (trained - base)", diff, signed=True))
    print(f"\n({time.perf_counter() - t0:.0f} s for both grids)")
    if args.json_out:
        ser = lambda g: {f"L{k}@{d}": v for (k, d), v in g.items()}
        Path(args.json_out).write_text(json.dumps({"base": ser(base), "trained": ser(trained), "diff": ser(diff)},
                                                  indent=2))


if __name__ == "__main__":
    main()
