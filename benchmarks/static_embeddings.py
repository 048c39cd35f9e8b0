"""Static embeddings (model2vec-style) from all-MiniLM-L6-v2: embedjax's distillation
(``embedjax.static.distill``) against model2vec's (``model2vec.distill.distill``) with the same
settings (256 PCA components, SIF coefficient 1e-4, BERT's [unused*] tokens removed, float32), beside
the transformer they come from and, when it exists, the table fine-tuned on STS-B
(``configs/static_stsb.py``).

Columns: distillation seconds (model loading included), STS-B dev and SICK trial cosine Spearman
(x100), SciFact dev nDCG@10 (x100, full corpus), encode speed on the STS-B dev sentences (3,000
texts, warm; the static tables at batch 1024, model2vec's default, timed in turn 7 times, the median
round; the transformer at batch 64, embedjax's default, median of 3), and the model directory's size
on disk (the transformer: its weights file). Every row is scored by the
same evaluators (``embedjax.eval``): model2vec's table is read by ``embedjax.load_pretrained`` (its
directory layout), and its STS-B dev score with its own ``StaticModel.encode`` is printed beside as
a check.

    python benchmarks/static_embeddings.py                       # distils both into workdirs/static_bench/
    python scripts/train.py --config configs/static_stsb.py --workdir workdirs/static_stsb   # optional: the fine-tuned row
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("EMBEDJAX_DATA", ROOT.parent / "shared" / "data"))
DIM, SIF = 256, 1e-4


def stsb_dev_sentences() -> list[str]:
    from embedjax.data import read_stsb

    pairs = read_stsb(DATA / "stsb" / "sts-dev.csv")
    return [p.text_a for p in pairs] + [p.text_b for p in pairs]


def size_mb(directory: Path, weights_only: bool = False) -> float:
    """MB on disk of a model directory's files (``weights_only``: its safetensors)."""
    run_files = ("checkpoints", "best", "tensorboard")  # a training workdir's own, beside its export
    files = [p for p in Path(directory).rglob("*")
             if p.is_file() and not set(p.relative_to(directory).parts) & set(run_files)]
    if weights_only:
        files = [p for p in files if p.suffix == ".safetensors"]
    return sum(p.stat().st_size for p in files) / 1e6


def sentences_per_second(encode, texts, repeats: int = 3) -> float:
    """Warm throughput: one untimed call (compiles), then the median of ``repeats`` timed calls."""
    encode(texts)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        encode(texts)
        times.append(time.perf_counter() - t0)
    return len(texts) / statistics.median(times)


def distil_ours(minilm: str, out: Path) -> float:
    import embedjax
    from embedjax import static

    t0 = time.perf_counter()
    model = static.distill(embedjax.load_pretrained(minilm), dim=DIM, sif_coefficient=SIF, show_progress=True)
    seconds = time.perf_counter() - t0
    embedjax.save_pretrained(model, out)
    return seconds


def distil_model2vec(minilm: str, out: Path, quantize_to: str = "float32") -> float:
    from model2vec.distill import distill

    t0 = time.perf_counter()
    model = distill(minilm, pca_dims=DIM, sif_coefficient=SIF, quantize_to=quantize_to, device="cpu")
    seconds = time.perf_counter() - t0
    model.save_pretrained(out)
    return seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=ROOT / "workdirs" / "static_bench",
                    help="where the tables are written")
    ap.add_argument("--finetuned", type=Path, default=ROOT / "workdirs" / "static_stsb",
                    help="a configs/static_stsb.py workdir: its row when it holds an export")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    import embedjax
    from embedjax import hf
    from embedjax.eval import suite

    torch.set_num_threads(2)
    minilm = hf.minilm_l6()
    ours_dir, m2v_dir, m2v16_dir = args.root / "embedjax", args.root / "model2vec", args.root / "model2vec_float16"
    distil_seconds = {"ours": distil_ours(minilm, ours_dir), "model2vec": distil_model2vec(minilm, m2v_dir)}
    distil_model2vec(minilm, m2v16_dir, quantize_to="float16")  # model2vec's default precision: its size only

    from benchmarks.paper_methods import METHOD_EVALS  # the same evaluators as the other methods' table

    evals = suite.from_config(METHOD_EVALS)
    texts = stsb_dev_sentences()
    from model2vec import StaticModel

    m2v = StaticModel.from_pretrained(m2v_dir)
    rows = [
        ("all-MiniLM-L6-v2 (the transformer, 128 tokens)", embedjax.load_pretrained(minilm, max_length=128), None,
         Path(minilm), 64),
        ("embedjax `static.distill` (256)", embedjax.load_pretrained(ours_dir), distil_seconds["ours"], ours_dir, 1024),
        ("model2vec `distill` (256), read by embedjax", embedjax.load_pretrained(m2v_dir), distil_seconds["model2vec"],
         m2v_dir, 1024),
    ]
    if (args.finetuned / "model.safetensors").is_file():
        rows.append(("embedjax static, fine-tuned on STS-B (`configs/static_stsb.py`)",
                     embedjax.load_pretrained(args.finetuned), None, args.finetuned, 1024))
    quality = {name: suite.run_all(evals, encoder) for name, encoder, *_ in rows}
    quality[M2V_OWN] = {"stsb_dev/cosine_spearman": _stsb_dev_spearman(m2v.encode)}
    encodes = {name: (lambda t, e=encoder, b=batch: e.encode(t, batch_size=b))
               for name, encoder, _, _, batch in rows[1:]}
    encodes[M2V_OWN] = lambda t: m2v.encode(t, batch_size=1024)
    speed = {rows[0][0]: sentences_per_second(lambda t: rows[0][1].encode(t, batch_size=64), texts),
             **interleaved_speeds(encodes, texts)}
    sizes = {name: size_mb(directory, weights_only=directory == Path(minilm)) for name, _, _, directory, _ in rows}
    sizes.update({M2V_OWN: size_mb(m2v_dir), M2V_FLOAT16: size_mb(m2v16_dir)})
    seconds = {name: s for name, _, s, _, _ in rows}

    header = ["model", "distil s", "STS-B dev", "SICK trial", "SciFact dev nDCG@10", "encode sent/s", "size MB"]
    print("| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1), flush=True)
    for name in [*(row[0] for row in rows), M2V_OWN, M2V_FLOAT16]:
        m = quality.get(name, {})
        cells = [_cell(seconds.get(name), "{:.1f}"), _cell(m.get("stsb_dev/cosine_spearman"), "{:.2f}"),
                 _cell(m.get("sick_trial/cosine_spearman"), "{:.2f}"), _cell(m.get("scifact_dev/ndcg@10"), "{:.2%}"),
                 _cell(speed.get(name), "{:,.0f}"), _cell(sizes.get(name), "{:.1f}")]
        print("| " + " | ".join([name, *cells]) + " |", flush=True)
    ours_table, m2v_table = np.asarray(rows[1][1].params["embeddings"]), m2v.embedding
    same_tokens = _tokens(rows[1][1]) == list(m2v.tokens)
    print(f"\nthe two tables: same {len(m2v.tokens):,} tokens in the same order: {same_tokens}; "
          f"max |embedjax - model2vec| = {np.abs(ours_table - m2v_table).max():.2e} "
          f"(largest |entry| {np.abs(m2v_table).max():.2f})")


M2V_OWN = "model2vec `StaticModel.encode` of its table (its own encode)"
M2V_FLOAT16 = "model2vec `distill` (256), float16 (its default precision)"


def _cell(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value).replace("%", "")


def interleaved_speeds(encodes: dict, texts, rounds: int = 7) -> dict:
    """Warm sentences/s of several fast ``encode(texts)`` functions, timed in turn ``rounds`` times (so
    a neighbour's load falls on all of them alike), the median round of each."""
    for encode in encodes.values():
        encode(texts)  # compiles
    times: dict = {name: [] for name in encodes}
    for _ in range(rounds):
        for name, encode in encodes.items():
            t0 = time.perf_counter()
            encode(texts)
            times[name].append(time.perf_counter() - t0)
    return {name: len(texts) / statistics.median(ts) for name, ts in times.items()}


def _tokens(encoder) -> list[str]:
    return [t for t, _ in sorted(encoder.tokenizer.backend.get_vocab().items(), key=lambda item: item[1])]


def _stsb_dev_spearman(encode) -> float:
    """STS-B dev cosine Spearman (x100) of any ``encode(texts) -> unit vectors`` (a cross-check of the evaluator)."""
    import numpy as np
    from scipy.stats import spearmanr

    from embedjax.data import read_stsb

    pairs = read_stsb(DATA / "stsb" / "sts-dev.csv")
    a, b = encode([p.text_a for p in pairs]), encode([p.text_b for p in pairs])
    return 100 * spearmanr(np.sum(a * b, axis=1), [p.score for p in pairs]).statistic


if __name__ == "__main__":
    main()
