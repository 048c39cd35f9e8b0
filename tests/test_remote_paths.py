"""gs:// workdirs and export directories, through the same etils.epath code as local paths.

No network here: ``fake_gcs`` registers an in-memory fsspec filesystem for ``gs://`` (what
``epath`` uses for gs:// when TensorFlow is absent; gcsfs in real use), so every remote
code path (temp-dir-and-copy export, rewrite-instead-of-append metrics, download before
loading) runs for real. Orbax's own gs:// writes go through tensorstore's GCS driver, which
cannot be faked in memory: the training test keeps the checkpoints on a local directory.
"""

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

import embedjax
from embedjax import paths
from embedjax.checkpoint import Checkpointer
from embedjax.train import loop, workdir as workdirs
from embedjax.train.metrics import MetricsWriter

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["A man is playing a guitar.", "Two dogs run in the snow.", "short"]


class FakeGCS(MemoryFileSystem):
    """gs:// in memory (its own store, emptied by the fixture)."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    def __init__(self, *args, finalize_on_close: bool = False, **kwargs):  # gcsfs's option, passed by epath
        super().__init__(*args, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """``gs://`` served from memory for this test; returns the store (``"gs://..." -> file``).
    The working directory is ``tmp_path``, so a gs:// path mangled into a local one (pathlib
    turns ``gs://b`` into ``gs:/b``) would show up there as a ``gs:`` directory."""
    from etils.epath import backend, gpath

    registry = importlib.import_module("fsspec.registry")._registry
    for name in FakeGCS.protocol:
        monkeypatch.setitem(registry, name, FakeGCS)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # the fsspec backend even with TF installed
    backend.fsspec_backend._get_filesystem.cache_clear()
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    monkeypatch.chdir(tmp_path)
    yield FakeGCS.store
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert not (tmp_path / "gs:").exists(), "a gs:// path was written as a local path"


def remote_files(store, prefix: str) -> dict[str, bytes]:
    """Relative path -> bytes of every fake-GCS file under ``prefix``."""
    return {k[len(prefix) + 1:]: bytes(f.getbuffer()) for k, f in store.items() if k.startswith(prefix + "/")}


def local_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_paths_helpers(fake_gcs, tmp_path):
    assert paths.is_remote("gs://b/run") and paths.is_remote(epath.Path("gs://b/run"))
    assert not paths.is_remote("runs/a") and not paths.is_remote(tmp_path)
    assert str(paths.path("gs://b/run")) == "gs://b/run"
    assert paths.path("runs/a") == tmp_path / "runs" / "a"  # local: made absolute (cwd is tmp_path)

    with paths.staged(tmp_path / "here") as d:  # local: the directory itself
        assert d == tmp_path / "here"
    with paths.staged("gs://b/run/model") as d:
        assert d.is_dir() and not paths.is_remote(d)
        (d / "config.json").write_text("{}")
        (d / "1_Pooling").mkdir()
        (d / "1_Pooling" / "config.json").write_text('{"x": 1}')
        assert fake_gcs == {}  # copied only when the block ends
    assert remote_files(fake_gcs, "gs://b/run/model") == {"config.json": b"{}", "1_Pooling/config.json": b'{"x": 1}'}
    with pytest.raises(RuntimeError), paths.staged("gs://b/failed") as d:
        (d / "half.json").write_text("{}")
        raise RuntimeError("an export that fails uploads nothing")
    assert not remote_files(fake_gcs, "gs://b/failed")

    # a workdir: the model files and the sentence-transformers modules are downloaded, not the checkpoints
    run = epath.Path("gs://b/run")
    (run / "modules.json").write_text(json.dumps([{"path": ""}, {"path": "1_Pooling"}]))
    (run / "1_Pooling").mkdir()
    (run / "1_Pooling" / "config.json").write_text("{}")
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "checkpoints" / "2" / "big").write_bytes(b"state")
    with paths.local_copy(run) as d:
        assert sorted(local_files(d)) == ["1_Pooling/config.json", "modules.json"]
    with paths.local_copy(run / "model") as d:  # no modules.json: top-level files only
        assert sorted(local_files(d)) == ["config.json"]
    with paths.local_copy("org/name") as d:  # a hub id or a local path: as given
        assert d == "org/name"


def test_export_to_gs_writes_what_a_local_export_writes(fake_gcs, tiny_model, tmp_path, monkeypatch):
    """save_pretrained and scripts/export.py to gs:// write the same bytes as to a local
    directory (via a local temp dir and an epath copy); the model loads back and embeds the same."""
    encoder = embedjax.load_pretrained(tiny_model)
    local = embedjax.save_pretrained(encoder, tmp_path / "local")
    out = embedjax.save_pretrained(encoder, "gs://bucket/model")
    assert isinstance(out, epath.Path) and str(out) == "gs://bucket/model"
    assert remote_files(fake_gcs, "gs://bucket/model") == local_files(local)
    with paths.local_copy(out) as copy:
        np.testing.assert_allclose(embedjax.load_pretrained(copy).encode(TEXTS), encoder.encode(TEXTS), atol=1e-6)

    # a later export without the sentence-transformers modules removes the earlier modules.json there too
    embedjax.save_pretrained(encoder, tmp_path / "local", sentence_transformers=False)
    embedjax.save_pretrained(encoder, "gs://bucket/model", sentence_transformers=False)
    assert "modules.json" not in remote_files(fake_gcs, "gs://bucket/model")
    assert remote_files(fake_gcs, "gs://bucket/model").keys() == local_files(local).keys()

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    export = importlib.import_module("export")
    assert str(export.main(["--model", "gs://bucket/model", "--output", "gs://bucket/again"])) == "gs://bucket/again"
    with paths.local_copy("gs://bucket/again") as copy:
        np.testing.assert_allclose(embedjax.load_pretrained(copy).encode(TEXTS), encoder.encode(TEXTS), atol=1e-6)


def test_metrics_and_rerun_check_on_gs(fake_gcs, monkeypatch):
    """metrics.jsonl on gs:// (no append on object stores: rewritten whole) holds what a local
    one would, a resumed run's lines after the earlier ones; the rerun check reads a gs:// config."""
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # metrics.jsonl only
    for workdir in ("gs://bucket/run", "local_run"):
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        first = MetricsWriter(epath.Path(workdir))
        first.write(0, {"dev": 0.5})
        first.write(1, {"loss": 2.0})
        MetricsWriter(epath.Path(workdir)).write(2, {"loss": 1.0})  # a resumed run's writer
    assert (epath.Path("gs://bucket/run") / "metrics.jsonl").read_text() == Path("local_run/metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in Path("local_run/metrics.jsonl").read_text().splitlines()] == [0, 1, 2]

    from test_train import config_with

    config = config_with({"num_steps": 3})
    (epath.Path("gs://bucket/run") / workdirs.CONFIG_FILE).write_text(config.to_json_best_effort())
    (epath.Path("gs://bucket/run") / "summary.json").write_text("{}")  # a finished run: something to rerun
    assert workdirs.check_rerun("gs://bucket/run", config, allow_change=False) == []
    with pytest.raises(ValueError, match="num_steps: 3 -> 4"):
        workdirs.check_rerun("gs://bucket/run", config_with({"num_steps": 4}), allow_change=False)


def test_training_into_a_gs_workdir_matches_a_local_one(fake_gcs, tiny_train_overrides, tmp_path, monkeypatch):
    """The same two runs (4 steps, then resumed to 6 with --allow_config_change) into a local
    workdir and into gs://: the config, metrics, summary and export land in gs:// (through epath,
    the export via a local temp dir) and equal the local run's; every host's final evaluation
    reads the gs:// export back. Orbax keeps its checkpoints on a local stand-in (see module doc)."""
    from test_train import config_with

    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    stand_in = tmp_path / "orbax"

    def checkpointer(workdir, **kwargs):  # gs://bucket/run -> a local directory, for Orbax only
        return Checkpointer(stand_in / str(workdir).replace("://", "/") if paths.is_remote(workdir) else workdir,
                            **kwargs)

    monkeypatch.setattr(loop, "Checkpointer", checkpointer)
    overrides = {**tiny_train_overrides, "num_steps": 4, "eval_every": 2}
    summaries = {}
    for workdir in (str(tmp_path / "local"), "gs://bucket/run"):
        loop.train_and_evaluate(config_with(overrides), workdir)
        summaries[workdir] = loop.train_and_evaluate(config_with({**overrides, "num_steps": 6}), workdir,
                                                     allow_config_change=True)  # resumes from step 4
        assert loop.train_and_evaluate(config_with({**overrides, "num_steps": 6}), workdir)["finished_before"]
    local, remote = local_files(tmp_path / "local"), remote_files(fake_gcs, "gs://bucket/run")
    assert (stand_in / "gs" / "bucket" / "run" / "checkpoints").is_dir()

    exported = {name for name in local if not name.startswith(("checkpoints/", "best/"))}
    assert exported == set(remote)  # config, metrics, summary and the model files, nothing else
    for name in ("model.safetensors", "config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json",
                 workdirs.CONFIG_FILE):
        assert remote[name] == local[name], name

    def curve(data: bytes) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in map(json.loads, data.decode().splitlines()) if "loss" in r}

    assert sorted(curve(remote["metrics.jsonl"])) == list(range(1, 7))  # steps 5-6 appended after the resume
    assert curve(remote["metrics.jsonl"]) == pytest.approx(curve(local["metrics.jsonl"]), rel=1e-6)
    gs_summary, local_summary = summaries["gs://bucket/run"], summaries[str(tmp_path / "local")]
    assert json.loads(remote["summary.json"]) == gs_summary
    assert gs_summary["best_step"] == local_summary["best_step"]
    assert gs_summary["after"] == pytest.approx(local_summary["after"], rel=1e-6)
