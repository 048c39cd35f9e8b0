"""The CLIs under scripts/ on real weights and data."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_script_reports_the_zero_shot_spearman(minilm_path, small_dev, stsb_dev_pairs, minilm_stsb_dev, capsys):
    """On ``small_dev``, the first 200 STS-B dev pairs (the full set's 86.72 is test_model's): the grid's
    full-model cell is scipy's Spearman of the session's MiniLM embeddings of those pairs (which
    equal sentence-transformers', test_model) against the gold scores."""
    from scipy.stats import spearmanr

    from embedjax.data import read_stsb

    results = load("eval").main([str(minilm_path), "--task", f"sts:{small_dev} metrics=cosine",
                                 "--dims", "384", "64", "--layers", "6", "2"])
    n = len(read_stsb(small_dev))
    a, b = minilm_stsb_dev["a"][:n], minilm_stsb_dev["b"][:n]
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    want = 100 * spearmanr(cosine, [p.score for p in stsb_dev_pairs[:n]]).statistic
    full = results["dev/cosine_spearman@L6@384"]
    assert abs(full - want) < 0.01, (full, want)
    assert results["dev/cosine_spearman@L2@64"] < full
    out = capsys.readouterr().out
    assert "6 layers" in out and f"{full:.2f}" in out  # the grid table


def test_eval_script_runs_several_tasks_quantized_and_writes_json(tiny_model, small_dev, small_beir, sick_dir,
                                                                   tmp_path, capsys):
    """--task of every type, --quantize, --json; the JSON holds what each evaluator reports on its own."""
    import json

    import embedjax
    from embedjax.data.retrieval_readers import read_beir
    from embedjax.eval import QuantizedEvaluator, RetrievalEvaluator

    rerank = tmp_path / "rerank.jsonl"
    rerank.write_text("".join(json.dumps({"query": f"q{i}", "positive": [f"p{i}"], "negative": ["n1", f"n{i}x"]}) + "\n"
                              for i in range(5)))
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"sentence {i}\tsentence {i + i % 2}\t{1 - i % 2}\n" for i in range(12)))
    out = tmp_path / "res" / "out.json"
    results = load("eval").main([str(tiny_model), "--task", f"sts:{small_dev}", "--task",
                                 f"retrieval:{small_beir} split=dev name=ir k_values=1,10",
                                 "--task", f"reranking:{rerank}", "--task", f"pair_classification:{pairs}",
                                 "--task", f"sts:{sick_dir / 'SICK_trial.txt'} metrics=cosine",
                                 "--quantize", "int8,binary", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["metrics"] == pytest.approx(results)
    assert saved["tasks"]["SICK_trial"]["format"] == "sick"  # inferred from the name
    for key in ("dev/cosine_spearman", "dev/cosine_spearman@int8", "dev/hamming_spearman@binary", "ir/ndcg@10",
                "ir/ndcg@10@binary", "rerank/map", "pairs/max_ap", "SICK_trial/cosine_spearman"):
        assert key in results, key
    want = QuantizedEvaluator(RetrievalEvaluator(read_beir(small_beir, "dev"), name="ir", k_values=(1, 10)),
                              precisions=("float32", "int8", "binary"))(embedjax.load_pretrained(tiny_model))
    for key, value in want.items():
        assert results[key] == pytest.approx(value, abs=1e-6), key
    assert "ir/ndcg@10" in capsys.readouterr().out


@pytest.mark.parametrize("task, message", [
    ("sts", "expected TYPE:PATH"),
    ("nope:/x", "unknown type 'nope'"),
    ("sts:/no/such/file.csv", "/no/such/file.csv"),
    ("retrieval:{beir} colour=red", "colour"),
    ("sts:{dev} metrics=cosine oops", "option 'oops' is not key=value"),
])
def test_eval_script_bad_tasks_are_one_line_errors(task, message, small_dev, small_beir, capsys):
    import subprocess
    import sys

    task = task.format(beir=small_beir, dev=small_dev)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "eval.py"), "--task", task], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_encode_and_export_scripts(minilm, minilm_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    texts = ["first line", "second, longer line of text", "third"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    emb = load("encode").main(["--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.npy"),
                               "--model", str(minilm_path), "--dim", "64"])
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), emb)
    np.testing.assert_allclose(emb, minilm.encode(texts, dim=64), atol=1e-6)

    out = load("export").main(["--model", str(minilm_path), "--output", str(tmp_path / "exported")])
    ref = SentenceTransformer(str(out), device="cpu").encode(texts)
    np.testing.assert_allclose(ref, minilm.encode(texts), atol=1e-5)
