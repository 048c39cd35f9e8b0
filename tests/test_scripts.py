"""The CLIs under scripts/ on real weights and data."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_script_reports_the_zero_shot_spearman(minilm_path, stsb_dir, capsys):
    results = load("eval").main(["--model", str(minilm_path), "--data", str(stsb_dir / "sts-dev.csv"),
                                 "--metrics", "cosine", "--dims", "384", "64", "--layers", "6", "2"])
    assert abs(results["sts-dev/cosine_spearman@L6@384"] - 86.72) < 0.01
    assert results["sts-dev/cosine_spearman@L2@64"] < results["sts-dev/cosine_spearman@L6@384"]
    assert "sts-dev/cosine_spearman@L6@384" in capsys.readouterr().out


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
