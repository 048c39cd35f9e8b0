"""Export a checkpoint (a training workdir, a local directory or a hub id) as a
sentence-transformers / Hugging Face directory that PyTorch users load directly.

    python scripts/export.py --model workdirs/stsb_angle --output exported/
    python scripts/export.py --model gs://bucket/run --output gs://bucket/model   # etils.epath (gcsfs)
    python scripts/export.py --model workdirs/unfinished --best-checkpoint --output exported/
    # then, in PyTorch:  SentenceTransformer("exported/")  or  AutoModel.from_pretrained("exported/")

A workdir whose run has not finished has no exported model yet: the script says so, and with
--best-checkpoint exports the run's best checkpoint so far. A bad checkpoint or option is one
line on stderr and exit status 2 (--debug: the traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embedjax  # noqa: E402
from embedjax import cli, paths  # noqa: E402
from embedjax.train import encoders  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (local or gs://), training workdir or hub id")
    ap.add_argument("--output", required=True, help="directory to write: local, or gs://bucket/path")
    ap.add_argument("--pooling", default=None, help="override the pooling written to 1_Pooling/config.json")
    ap.add_argument("--no-normalize", action="store_true", help="omit the Normalize module")
    ap.add_argument("--best-checkpoint", action="store_true",
                    help="a training workdir whose run has not finished: export its best checkpoint so far")
    cli.add_debug_flag(ap)
    args = ap.parse_args(argv)
    with paths.local_copy(args.model) as model:  # a gs:// model is downloaded first
        source = args.model
        if encoders.is_workdir(model) and not (Path(model) / "config.json").is_file():
            best = encoders.best_checkpoint_encoder(model)
            if not args.best_checkpoint:
                raise ValueError(f"{args.model} is a training workdir whose run has not finished (no exported model "
                                 "yet): rerun its scripts/train.py command to finish it, or pass --best-checkpoint "
                                 f"to export its {best.describe()}")
            encoder, source = best.encoder, f"{args.model} ({best.describe()})"
            if args.pooling:
                raise ValueError("--pooling: a workdir's checkpoint is exported with the run's own pooling")
        else:
            encoder = embedjax.load_pretrained(model, pooling=args.pooling)
        out = embedjax.save_pretrained(encoder, args.output, normalize=not args.no_normalize)
    print(f"exported {source} -> {out}")
    return out


if __name__ == "__main__":
    cli.run(main)
