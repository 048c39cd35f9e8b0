"""Evaluation speed (issue 9): embedjax's evaluators vs sentence-transformers', in one process.

Same model (all-MiniLM-L6-v2 by default), same texts, same batch size, same CPU threads
(``torch.set_num_threads`` = the cores JAX's CPU client uses). Warm-up runs (compiles, first
calls) are excluded; medians of ``--repeats`` runs are reported.

1. STS suite wall time: ``STSEvaluator`` on STS-B dev, STS-B train (a bigger set) and SICK trial
   (cosine, dot, euclidean, manhattan; Spearman and Pearson) vs ``EmbeddingSimilarityEvaluator``
   on the same pairs; seconds each, ratio ST / embedjax, and both cosine Spearmans.
2. Retrieval on a synthetic BEIR corpus (``--docs`` documents of 10-30 words drawn from STS-B's
   vocabulary, ``--queries`` queries of words taken from one relevant document, seeded):
   ``RetrievalEvaluator`` vs ``InformationRetrievalEvaluator`` end to end (encoding included),
   split into encoding and the rest; then search alone on the same embedding arrays:
   ``eval.search.sharded_topk`` vs ``sentence_transformers.util.semantic_search`` (queries/s,
   alternating), and the binary first stage (``eval.search.binary_rescored_topk``, the evaluator's
   ``binary_first_stage``) at several ``rescore_multiplier`` values: time, overlap with the exact
   top-100, nDCG@10 and recall@100.
3. Encode throughput on all local devices (``eval.base.encode``, the local mesh) vs one
   (``Encoder.encode``): here and in a subprocess with 8 simulated CPU devices
   (``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
4. Packed vs padded encoding: ``Encoder.encode`` (length-sorted, bucket-padded batches) vs
   packing texts into rows (``Tokenizer.pack`` + a jitted ``embed_packed``, as training does),
   on STS-B sentences and synthetic documents; packed outputs checked against padded (1e-5).

    python benchmarks/eval_speed.py --quick            # small sizes, to check the script (~3 min)
    python benchmarks/eval_speed.py                    # 100k documents, 1k queries
    python benchmarks/eval_speed.py --only sts,retrieval --docs 20000
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from encode_speed import machine  # noqa: E402  (lscpu's model name and the cores: benchmarks/ is this script's folder)

SECTIONS = ("sts", "retrieval", "devices", "packing")
BINARY_MULTIPLIERS = (1, 2, 4, 10)  # rescore_multiplier values of the binary first stage (section 2)
SEARCH_ROUNDS = 7  # alternating rounds of the search-alone timing (section 2), at least --repeats


# ----------------------------------------------------------------------------- helpers


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def median_time(fn, repeats: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def stsb_sentences(data: Path, n: int) -> list[str]:
    from embedjax.data.readers import read_stsb

    out = []
    for split in ("sts-train.csv", "sts-dev.csv"):
        for ex in read_stsb(data / "stsb" / split):
            out += [ex.text_a, ex.text_b]
    return list(dict.fromkeys(out))[:n]


# ----------------------------------------------------------------------------- synthetic BEIR


def vocabulary(data: Path) -> tuple[list[str], list[float]]:
    """STS-B train's lower-cased words and their counts (Zipf-like sampling weights)."""
    from collections import Counter

    from embedjax.data.readers import read_stsb

    counts = Counter()
    for ex in read_stsb(data / "stsb" / "sts-train.csv"):
        for text in (ex.text_a, ex.text_b):
            counts.update(w.strip(".,;:!?\"'()").lower() for w in text.split())
    words = [w for w in counts if w.isalpha()]
    return words, [counts[w] for w in words]


def synthetic_beir(directory: Path, data: Path, n_docs: int, n_queries: int, seed: int = 0) -> Path:
    """A BEIR directory: documents of 10-30 words, each query 4-8 words of one document plus 1-2
    random words, that document relevant (1)."""
    rng = random.Random(seed)
    words, weights = vocabulary(data)
    directory.mkdir(parents=True, exist_ok=True)
    lengths = [rng.randint(10, 30) for _ in range(n_docs)]
    flat = rng.choices(words, weights, k=sum(lengths))
    docs, at = [], 0
    for n in lengths:
        docs.append(flat[at : at + n])
        at += n
    with open(directory / "corpus.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"_id": f"d{i}", "title": "", "text": " ".join(d)}) + "\n")
    (directory / "qrels").mkdir(exist_ok=True)
    with open(directory / "queries.jsonl", "w") as fq, open(directory / "qrels" / "test.tsv", "w") as fr:
        fr.write("query-id\tcorpus-id\tscore\n")
        for q, d in enumerate(rng.sample(range(n_docs), n_queries)):
            doc = docs[d]
            keep = sorted(rng.sample(range(len(doc)), rng.randint(4, 8)))
            text = [doc[i] for i in keep] + rng.choices(words, weights, k=rng.randint(1, 2))
            fq.write(json.dumps({"_id": f"q{q}", "text": " ".join(text)}) + "\n")
            fr.write(f"q{q}\td{d}\t1\n")
    return directory


# ----------------------------------------------------------------------------- 1. STS suite


def sts_suite(enc, st_model, data: Path, batch_size: int, repeats: int) -> dict:
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    from embedjax.data.sts_readers import read_sick_sts, read_stsb_sts
    from embedjax.eval.sts import STSEvaluator

    sets = {
        "stsb_dev": read_stsb_sts(data / "stsb" / "sts-dev.csv"),
        "stsb_train": read_stsb_sts(data / "stsb" / "sts-train.csv"),
        "sick_trial": read_sick_sts(data / "sick" / "SICK_trial.txt"),
    }
    metrics = ("cosine", "dot", "euclidean", "manhattan")
    ours = [STSEvaluator(p, name=n, metrics=metrics, batch_size=batch_size, protocol="pooled") for n, p in sets.items()]
    theirs = [EmbeddingSimilarityEvaluator([x.text_a for x in p], [x.text_b for x in p], [x.score for x in p],
                                           batch_size=batch_size, similarity_fn_names=list(metrics), name=n,
                                           write_csv=False) for n, p in sets.items()]
    run_ours = lambda: [ev(enc) for ev in ours]  # noqa: E731
    run_st = lambda: [ev(st_model) for ev in theirs]  # noqa: E731
    res_ours, res_st = run_ours(), run_st()  # warm-up (compiles), and the values
    t_ours, t_st = [], []
    for _ in range(repeats):  # alternating, so load drifts hit both
        t_ours.append(timed(run_ours)[0])
        t_st.append(timed(run_st)[0])
    out = {"pairs": {n: len(p) for n, p in sets.items()},
           "texts_embedjax": sum(len(dict.fromkeys([x.text_a for x in p] + [x.text_b for x in p])) for p in sets.values()),
           "texts_st": sum(2 * len(p) for p in sets.values()),
           "embedjax_s": statistics.median(t_ours), "st_s": statistics.median(t_st),
           "embedjax_all_s": t_ours, "st_all_s": t_st, "spearman": {}}
    for (n, _), a, b in zip(sets.items(), res_ours, res_st):
        out["spearman"][n] = (a[f"{n}/cosine_spearman"], 100 * b[f"{n}_spearman_cosine"])
    return out


# ----------------------------------------------------------------------------- 2. retrieval


def retrieval(enc, st_model, data: Path, n_docs: int, n_queries: int, batch_size: int, repeats: int) -> dict:
    import torch
    from sentence_transformers import util
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval import search
    from embedjax.eval.retrieval import RetrievalEvaluator

    def st_evaluator(beir):
        return InformationRetrievalEvaluator(
            dict(zip(beir.query_ids, beir.query_texts)), dict(zip(beir.corpus_ids, beir.corpus_texts)),
            {q: {d for d, r in rel.items() if r > 0} for q, rel in beir.qrels.items()},
            batch_size=batch_size, corpus_chunk_size=50_000, mrr_at_k=[10], ndcg_at_k=[10],
            accuracy_at_k=[1, 3, 5, 10], precision_recall_at_k=[1, 3, 5, 10, 100], map_at_k=[100],
            name="synthetic", write_csv=False)

    with tempfile.TemporaryDirectory() as tmp:
        t_gen, _ = timed(synthetic_beir, Path(tmp) / "full", data, n_docs, n_queries)
        beir = read_beir(Path(tmp) / "full")
        warm_docs = min(n_docs, 3000)
        synthetic_beir(Path(tmp) / "warm", data, warm_docs, min(n_queries, 100), seed=1)
        warm = read_beir(Path(tmp) / "warm")
    tokens = [len(e.ids) for e in enc.tokenizer.encode(list(beir.corpus_texts[:2000]))]
    print(f"  synthetic corpus: {n_docs} docs ({statistics.mean(tokens):.1f} tokens mean, max {max(tokens)}), "
          f"{n_queries} queries, written in {t_gen:.1f} s", flush=True)

    ours, theirs = RetrievalEvaluator(beir, name="synthetic", batch_size=batch_size), st_evaluator(beir)
    # Warm-up: every (rows, bucket) encode shape on a small corpus of the same kind, the search
    # program of the full corpus's shape, and sentence-transformers' first calls.
    RetrievalEvaluator(warm, name="warm", batch_size=batch_size)(enc)
    st_evaluator(warm)(st_model)
    search.sharded_topk(np.zeros((len(ours.query_ids), enc.dim), np.float32),
                        np.ones((n_docs, enc.dim), np.float32), min(100, n_docs))

    st_encode = []

    def embed_timed(fn):
        def wrapper(*a, **kw):
            t, out = timed(fn, *a, **kw)
            st_encode.append(t)
            return out
        return wrapper

    theirs.embed_inputs = embed_timed(theirs.embed_inputs)
    # End to end, once each (the full corpus takes minutes to encode).
    t_embed, emb = timed(ours.embed, enc)
    t_score, scores_ours = timed(ours.score, emb)
    print(f"  embedjax: encode {t_embed:.1f} s + search/metrics {t_score:.2f} s  [{load()}]", flush=True)
    t_st, scores_st = timed(theirs, st_model)
    print(f"  sentence-transformers: {t_st:.1f} s, of which encode {sum(st_encode):.1f} s  [{load()}]", flush=True)

    # Search alone on the same arrays: top-100 of every query over the corpus, cosine.
    q, c = emb["queries"], emb["corpus"]
    k = min(100, n_docs)
    qt, ct = torch.from_numpy(q), torch.from_numpy(c)
    ours_search = lambda: search.sharded_topk(q, c, k)  # noqa: E731
    st_search = lambda: util.semantic_search(qt, ct, top_k=k)  # noqa: E731
    _, idx = ours_search()
    hits = st_search()
    times = {"ours": [], "st": []}
    rounds = max(repeats, SEARCH_ROUNDS)  # a second or so each: more rounds than the encodes get
    for _ in range(rounds):  # alternating, so load drifts hit both
        times["ours"].append(timed(ours_search)[0])
        times["st"].append(timed(st_search)[0])
    t_s_ours, t_s_st = statistics.median(times["ours"]), statistics.median(times["st"])
    agree = float(np.mean([idx[i, 0] == hits[i][0]["corpus_id"] for i in range(len(hits))]))

    # Binary first stage (search.binary_rescored_topk, the evaluator's binary_first_stage): the
    # Hamming shortlist of k * m, rescored exactly; overlap with the exact top-k, time, and the
    # evaluator's metrics with it, on the same arrays.
    binary = []
    for m in BINARY_MULTIPLIERS:
        run = lambda m=m: search.binary_rescored_topk(q, c, k, rescore_multiplier=m)  # noqa: E731
        _, bidx = run()
        t_b = []
        for _ in range(repeats):  # alternating with the exact search again
            t_b.append(timed(run)[0])
            times["ours"].append(timed(ours_search)[0])
        overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(bidx, idx)]))
        ev = RetrievalEvaluator(beir, name="synthetic", batch_size=batch_size, binary_first_stage=True,
                                rescore_multiplier=m)
        got = ev.score(emb)
        binary.append({"multiplier": m, "s": statistics.median(t_b),
                       "exact_s": statistics.median(times["ours"][-repeats:]),
                       "overlap": overlap, "top1": float(np.mean(bidx[:, 0] == idx[:, 0])),
                       "ndcg@10": got["ndcg@10"], "recall@100": got["recall@100"]})
        print(f"  binary first stage x{m}: {binary[-1]['s']:.3f} s (exact {binary[-1]['exact_s']:.3f} s), overlap with "
              f"the exact top-{k} {100 * overlap:.2f}%, nDCG@10 {100 * got['ndcg@10']:.2f}  [{load()}]", flush=True)
    return {"docs": n_docs, "queries": len(ours.query_ids), "tokens_mean": statistics.mean(tokens),
            "embedjax": {"total_s": t_embed + t_score, "encode_s": t_embed, "rest_s": t_score,
                         "ndcg@10": scores_ours["ndcg@10"], "recall@100": scores_ours["recall@100"]},
            "st": {"total_s": t_st, "encode_s": sum(st_encode), "rest_s": t_st - sum(st_encode),
                   "ndcg@10": scores_st["synthetic_cosine_ndcg@10"],
                   "recall@100": scores_st["synthetic_cosine_recall@100"]},
            "search": {"embedjax_s": t_s_ours, "st_s": t_s_st, "top1_agreement": agree,
                       "rounds": rounds, "embedjax_all_s": times["ours"][:rounds], "st_all_s": times["st"]},
            "binary": binary}


# ----------------------------------------------------------------------------- 3. devices


def devices_worker(model: str, data: Path, n: int, batch_size: int, repeats: int) -> dict:
    import jax

    import embedjax
    from embedjax import sharding
    from embedjax.eval import base

    enc = embedjax.load_pretrained(model)
    texts = stsb_sentences(data, n)
    mesh = sharding.local_mesh()
    all_dev = lambda: base.encode(enc, texts, batch_size=batch_size)  # noqa: E731
    one_dev = lambda: enc.encode(texts, batch_size=batch_size, show_progress=False)  # noqa: E731
    za, zb = all_dev(), one_dev()  # warm-up
    t_all, t_one = [], []
    for _ in range(repeats):
        t_all.append(timed(all_dev)[0])
        t_one.append(timed(one_dev)[0])
    return {"devices": mesh.size, "backend": jax.default_backend(), "n": len(texts),
            "all_per_s": len(texts) / statistics.median(t_all), "one_per_s": len(texts) / statistics.median(t_one),
            "max_abs_diff": float(np.abs(za - zb).max())}


def devices(args) -> list[dict]:
    out = [devices_worker(args.model, args.data, args.device_texts, args.batch_size, args.repeats)]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.sim_devices}").strip()
    cmd = [sys.executable, __file__, "--worker", "devices", "--model", args.model, "--data", str(args.data),
           "--device-texts", str(args.device_texts), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        sys.exit(f"devices worker failed:\n{res.stderr[-3000:]}")
    out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


# ----------------------------------------------------------------------------- 4. packing


def packed_encoder(enc, length: int, texts_per_call: int, rows_multiple: int = 8):
    """An ``encode(texts) -> (N, D)`` that packs ``texts_per_call`` texts at a time into rows of
    ``length`` tokens (first-fit decreasing, ``Tokenizer.pack``) and runs ``embed_packed``."""
    import jax
    import jax.numpy as jnp

    from embedjax.embed import embed_packed

    @functools.partial(jax.jit, static_argnames=("num_texts",))
    def run(params, ids, types, segments, positions, *, num_texts):
        z = embed_packed(params, enc.cfg, ids, segments, positions, num_texts=num_texts, token_type_ids=types,
                         pooling=enc.pooling, normalize=enc.normalize)
        return z.astype(jnp.float32)

    def encode(texts):
        texts = [t.lower() for t in texts] if enc.lowercase else list(texts)
        encodings = enc.tokenizer.encode(texts)
        pending = []
        for start in range(0, len(texts), texts_per_call):
            chunk = encodings[start : start + texts_per_call]
            p = enc.tokenizer.pack(chunk, length, rows_multiple)
            # num_texts static and constant: the last chunk's missing texts pool to zero rows.
            pending.append((start, len(chunk), run(enc.params, p.input_ids, p.token_type_ids, p.segment_ids,
                                                   p.positions, num_texts=texts_per_call)))
        out = np.empty((len(texts), enc.dim), np.float32)
        for start, n, z in pending:
            out[start : start + n] = np.asarray(z)[:n]
        return out

    return encode


def token_slots_padded(enc, texts, batch_size: int) -> int:
    from embedjax import tokenize

    lengths = sorted((len(e.ids) for e in enc.tokenizer.encode(texts)), reverse=True)
    return sum(tokenize.rows_for(len(lengths[i : i + batch_size]), batch_size)
               * tokenize.bucket_for(lengths[i], enc.tokenizer.buckets) for i in range(0, len(lengths), batch_size))


def token_slots_packed(enc, texts, length: int, per_call: int, rows_multiple: int = 8) -> int:
    encodings = enc.tokenizer.encode(texts)
    total = 0
    for s in range(0, len(encodings), per_call):
        p = enc.tokenizer.pack(encodings[s : s + per_call], length, rows_multiple)
        total += p.input_ids.size
    return total


def packing(enc, data: Path, n: int, repeats: int, batch_sizes, pack_configs) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_beir(Path(tmp), data, n, 1, seed=2)
        from embedjax.data.retrieval_readers import read_beir

        docs = list(read_beir(tmp).corpus_texts)
    datasets = {"STS-B sentences": stsb_sentences(data, n), "synthetic docs": docs}
    rows = []
    for name, texts in datasets.items():
        real = sum(len(e.ids) for e in enc.tokenizer.encode(texts))
        ref = enc.encode(texts, batch_size=128, show_progress=False)
        for b in batch_sizes:
            fn = lambda: enc.encode(texts, batch_size=b, show_progress=False)  # noqa: E731
            fn()
            t = median_time(fn, repeats)
            rows.append({"data": name, "n": len(texts), "how": f"padded, batch {b}", "per_s": len(texts) / t,
                         "slots": token_slots_padded(enc, texts, b), "real": real, "max_diff": 0.0})
            print(f"  {name}: {rows[-1]['how']}: {rows[-1]['per_s']:.0f} texts/s  [{load()}]", flush=True)
        for length, per_call in pack_configs:
            enc_p = packed_encoder(enc, length, per_call)
            z = enc_p(texts)
            t = median_time(lambda: enc_p(texts), repeats)
            diff = float(np.abs(z - ref).max())
            rows.append({"data": name, "n": len(texts), "how": f"packed, rows of {length}, {per_call} texts/call",
                         "per_s": len(texts) / t, "slots": token_slots_packed(enc, texts, length, per_call),
                         "real": real, "max_diff": diff})
            print(f"  {name}: {rows[-1]['how']}: {rows[-1]['per_s']:.0f} texts/s, max |diff| {diff:.1e}  [{load()}]",
                  flush=True)
            if diff > 1e-5:
                print(f"  WARNING: packed embeddings differ from padded by {diff:.2e} (> 1e-5)", flush=True)
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    from configs.base import DATA
    from embedjax import hf

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: embedjax.hf.minilm_l6())")
    ap.add_argument("--data", type=Path, default=DATA, help="data root with stsb/ and sick/ (default: configs.base.DATA)")
    ap.add_argument("--docs", type=int, default=100_000, help="synthetic corpus size")
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--batch-size", type=int, default=128, help="encode batch size, both libraries")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device-texts", type=int, default=4000, help="STS-B sentences for the devices section")
    ap.add_argument("--sim-devices", type=int, default=8, help="simulated CPU devices for the devices section")
    ap.add_argument("--pack-texts", type=int, default=4000, help="texts per dataset for the packing section")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--quick", action="store_true", help="5k docs, 200 queries, 2 repeats, 1.5k texts elsewhere")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--worker", choices=["devices"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or hf.minilm_l6()
    if args.quick:
        args.docs, args.queries, args.repeats = 5000, 200, 2
        args.device_texts = args.pack_texts = 1500
    if args.worker == "devices":
        print(json.dumps(devices_worker(args.model, args.data, args.device_texts, args.batch_size, args.repeats)))
        return
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    import jax
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    import embedjax

    threads = len(os.sched_getaffinity(0))  # XLA's CPU client uses every core it may run on
    torch.set_num_threads(threads)
    print(f"machine: {machine()}; jax {jax.__version__} ({len(jax.devices())} {jax.default_backend()} device(s)), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), sentence-transformers "
          f"{sentence_transformers.__version__}; model {args.model}; batch {args.batch_size}; {load()}", flush=True)
    enc = embedjax.load_pretrained(args.model)
    st_model = SentenceTransformer(args.model, device="cpu")
    results: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}

    if "sts" in only:
        print("\n== 1. STS suite (STS-B dev + STS-B train + SICK trial, 4 similarities x Spearman/Pearson)", flush=True)
        r = results["sts"] = sts_suite(enc, st_model, args.data, args.batch_size, args.repeats)
        print(f"  pairs {r['pairs']}; texts encoded: embedjax {r['texts_embedjax']} (distinct), "
              f"sentence-transformers {r['texts_st']} (both sides)")
        print(f"  embedjax {r['embedjax_s']:.2f} s, sentence-transformers {r['st_s']:.2f} s "
              f"(medians of {args.repeats}; all: {[round(x, 2) for x in r['embedjax_all_s']]} / "
              f"{[round(x, 2) for x in r['st_all_s']]})  [{load()}]")
        print(f"  ratio ST / embedjax: {r['st_s'] / r['embedjax_s']:.2f}x")
        for n, (a, b) in r["spearman"].items():
            print(f"  {n}: cosine Spearman x100 embedjax {a:.4f}, sentence-transformers {b:.4f} (diff {a - b:+.1e})")

    if "retrieval" in only:
        print(f"\n== 2. Retrieval, synthetic corpus ({args.docs} docs, {args.queries} queries)", flush=True)
        r = results["retrieval"] = retrieval(enc, st_model, args.data, args.docs, args.queries, args.batch_size,
                                             args.repeats)
        e, s, sr = r["embedjax"], r["st"], r["search"]
        print(f"  {'':>22} {'total s':>8} {'encode s':>9} {'docs/s':>7} {'search+metrics s':>17} {'nDCG@10':>8} {'R@100':>6}")
        for name, x in (("embedjax", e), ("sentence-transformers", s)):
            print(f"  {name:>22} {x['total_s']:8.1f} {x['encode_s']:9.1f} {(r['docs'] + r['queries']) / x['encode_s']:7.0f} "
                  f"{x['rest_s']:17.2f} {100 * x['ndcg@10']:8.2f} {100 * x['recall@100']:6.2f}")
        print(f"  ratio ST / embedjax: end to end {s['total_s'] / e['total_s']:.2f}x, encode "
              f"{s['encode_s'] / e['encode_s']:.2f}x, search+metrics {s['rest_s'] / e['rest_s']:.2f}x")
        q = r["queries"]
        print(f"  search alone (top-100 cosine, same arrays, alternating, median of {sr['rounds']}): sharded_topk "
              f"{sr['embedjax_s']:.3f} s = {q / sr['embedjax_s']:.0f} queries/s; semantic_search {sr['st_s']:.3f} s = "
              f"{q / sr['st_s']:.0f} queries/s; ratio {sr['st_s'] / sr['embedjax_s']:.2f}x; "
              f"top-1 agreement {100 * sr['top1_agreement']:.1f}%  [{load()}]", flush=True)
        print(f"  binary first stage + exact rescoring (binary_rescored_topk; same arrays, top-100, exact search "
              f"timed alternately):")
        print(f"  {'multiplier':>12} {'s':>7} {'queries/s':>10} {'vs exact':>9} {'top-100 overlap':>16} {'top-1 =':>8} "
              f"{'nDCG@10':>8} {'R@100':>6}")
        for b in r["binary"]:
            print(f"  {b['multiplier']:>12} {b['s']:7.3f} {q / b['s']:10.0f} {b['exact_s'] / b['s']:8.2f}x "
                  f"{100 * b['overlap']:15.2f}% {100 * b['top1']:7.1f}% {100 * b['ndcg@10']:8.2f} "
                  f"{100 * b['recall@100']:6.2f}")

    if "devices" in only:
        print(f"\n== 3. Encode throughput: all local devices (base.encode) vs one (Encoder.encode), "
              f"{args.device_texts} STS-B sentences", flush=True)
        rows = results["devices"] = devices(args)
        for x in rows:
            print(f"  {x['devices']} {x['backend']} device(s): all {x['all_per_s']:.0f} texts/s, one "
                  f"{x['one_per_s']:.0f} texts/s, ratio all / one {x['all_per_s'] / x['one_per_s']:.2f}x, "
                  f"max |diff| {x['max_abs_diff']:.1e}")
        print(f"  [{load()}]", flush=True)

    if "packing" in only:
        print(f"\n== 4. Packed vs padded encoding ({args.pack_texts} texts per dataset)", flush=True)
        rows = results["packing"] = packing(enc, args.data, args.pack_texts, args.repeats, (64, 128),
                                            ((64, 128), (128, 256), (256, 512)))
        print(f"  {'data':>16} {'how':>38} {'texts/s':>8} {'token slots':>12} {'real/slots':>10} {'vs padded 128':>14}")
        for x in rows:
            base_rate = next(y["per_s"] for y in rows if y["data"] == x["data"] and y["how"] == "padded, batch 128")
            print(f"  {x['data']:>16} {x['how']:>38} {x['per_s']:8.0f} {x['slots']:12d} "
                  f"{x['real'] / x['slots']:10.2f} {x['per_s'] / base_rate:13.2f}x")
    print(f"\n{load()}")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
