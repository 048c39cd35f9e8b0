"""Training-free methods of the papers embedjax serves, applied to all-MiniLM-L6-v2: what each does
to STS-B dev, SICK trial and SciFact dev, with the embedding-space diagnostics of STS-B dev beside.

Rows: the model as it ships; PCA whitening (BERT-whitening arXiv:2103.15316, WhiteningBERT
arXiv:2104.01767) fitted on the STS-B *train* sentences (every component the embeddings span, and
the first 256 / 128; one fit per row, so every column scores the same model, and no evaluated text is fitted on);
first-last-layer average pooling (SimCSE's avg_first_last), alone and whitened. Columns: STS-B dev and SICK trial cosine
Spearman (x100), SciFact dev nDCG@10 (x100, full corpus), and on STS-B dev the alignment (pairs
scored >= 4), uniformity and anisotropy (``embedjax.eval.diagnostics``).

    python benchmarks/paper_methods.py

Trained models (a TSDAE run's export, a static model) are scored the same way, each its own row
(``--model NAME=DIR``, repeatable; ``--only`` skips the training-free rows):

    python benchmarks/paper_methods.py --only --model "TSDAE on SciFact + NFCorpus=workdirs/tsdae_beir"
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("EMBEDJAX_DATA", ROOT.parent / "shared" / "data"))


# What every method of issue 23 is scored on (benchmarks/static_embeddings.py reads it too).
METHOD_EVALS = {
    "stsb_dev": {"type": "sts", "path": str(DATA / "stsb" / "sts-dev.csv"), "format": "stsb", "metrics": ["cosine"]},
    "sick_trial": {"type": "sts", "path": str(DATA / "sick" / "SICK_trial.txt"), "format": "sick", "metrics": ["cosine"]},
    "scifact_dev": {"type": "retrieval", "path": str(DATA / "beir" / "scifact"), "split": "dev"},
}


def stsb_train_sentences() -> list[str]:
    from embedjax.data import read_stsb

    pairs = read_stsb(DATA / "stsb" / "sts-train.csv")
    return list(dict.fromkeys(t for p in pairs for t in (p.text_a, p.text_b)))


def rows():
    """(name, encoder) for every row; whitening fitted on STS-B train sentences."""
    import embedjax
    from embedjax import hf, whitening

    fit_on = stsb_train_sentences()
    base = embedjax.load_pretrained(hf.minilm_l6(), max_length=128)
    first_last = embedjax.load_pretrained(hf.minilm_l6(), max_length=128, pooling="first_last_avg")
    yield "all-MiniLM-L6-v2 (mean pooling)", base
    for dim in (None, 256, 128):
        white = whitening.whiten(base, fit_on, dim=dim)
        yield f"+ whitening to {white.dim}" + (" (every component spanned)" if dim is None else ""), white
    yield "first-last average pooling", first_last
    yield "first-last average + whitening", whitening.whiten(first_last, fit_on)


def trained_rows(models: list[str]):
    """(name, encoder) of every ``NAME=DIR`` (an export ``load_pretrained`` reads)."""
    import embedjax

    for entry in models:
        name, sep, directory = entry.rpartition("=")
        if not sep or not name:
            raise SystemExit(f"--model takes NAME=DIR, got {entry!r}")
        yield name, embedjax.load_pretrained(directory)


def main() -> None:
    import argparse

    from embedjax.eval import suite

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=DIR: a trained export, one row each")
    parser.add_argument("--only", action="store_true", help="only the --model rows")
    args = parser.parse_args()

    evals = suite.from_config({**METHOD_EVALS, "geometry": {"type": "diagnostics", "path": str(DATA / "stsb" / "sts-dev.csv"),
                                                            "format": "stsb"}})
    header = ["method", "STS-B dev", "SICK trial", "SciFact dev nDCG@10", "alignment", "uniformity", "anisotropy",
              "seconds"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), flush=True)
    import itertools

    for name, encoder in itertools.chain(() if args.only else rows(), trained_rows(args.model)):
        t0 = time.perf_counter()
        m = suite.run_all(evals, encoder)
        cells = [f"{m['stsb_dev/cosine_spearman']:.2f}", f"{m['sick_trial/cosine_spearman']:.2f}",
                 f"{100 * m['scifact_dev/ndcg@10']:.2f}", f"{m['geometry/alignment']:.3f}",
                 f"{m['geometry/uniformity']:.3f}", f"{m['geometry/anisotropy']:.3f}",
                 f"{time.perf_counter() - t0:.0f}"]
        print("| " + " | ".join([name, *cells]) + " |", flush=True)


if __name__ == "__main__":
    main()
