"""Bad input never silently changes results: non-finite dev metrics are never "best", a degenerate
AnglE label_range is refused, a TFDS source_dir that is not there is an error (not a download),
encode.py keeps one row per line, and the CLIs report bad input as one line with exit status 2."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import embedjax
from embedjax import cli
from embedjax.checkpoint import Checkpointer
from embedjax.data import DataError, read_sentences
from embedjax.losses import angle as A

pytestmark = pytest.mark.fast_compile  # checks errors and logic, not speed or PyTorch parity (conftest.py)

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- best checkpoint


def offer(tmp_path, mode, values):
    ckpt = Checkpointer(tmp_path / mode, best_metric="dev", best_mode=mode, async_save=False)
    saved = [ckpt.save_best(step, {"w": jnp.full((2,), float(step))}, {"dev": v, "other": 1.0})
             for step, v in enumerate(values, start=1)]
    return ckpt, saved


def test_non_finite_dev_metric_is_never_best(tmp_path):
    ckpt, saved = offer(tmp_path, "max", [50.0, math.nan, math.inf, 60.0, math.nan])
    assert saved == [True, False, False, True, False]
    assert ckpt.best_step() == 4
    params, metrics, step = ckpt.restore_best({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    assert step == 4 and metrics["dev"] == 60.0
    np.testing.assert_array_equal(params["w"], [4.0, 4.0])
    ckpt.close()

    ckpt, _ = offer(tmp_path, "min", [5.0, -math.inf, 3.0, math.nan, math.inf])
    assert ckpt.best_step() == 3
    ckpt.close()


def test_restore_best_after_a_nan_first_step(tmp_path):
    ckpt, saved = offer(tmp_path, "max", [math.nan, 2.0])
    assert saved == [False, True]
    assert ckpt.restore_best({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})[2] == 2
    ckpt.close()

    ckpt, _ = offer(tmp_path / "all_nan", "max", [math.nan, -math.inf])
    with pytest.raises(FileNotFoundError, match=r"non-finite dev .*step 1: nan.*step 2: -inf"):
        ckpt.restore_best({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    ckpt.close()


def test_a_nan_best_left_on_disk_by_an_older_run_ranks_last(tmp_path):
    """Orbax re-reads the saved metrics on restart; a NaN there must not win either."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path / "best", options=ocp.CheckpointManagerOptions(
            max_to_keep=3, best_fn=lambda m: m["dev"], best_mode="max", create=True,
            enable_async_checkpointing=False)) as old:
        for step, v in ((1, 40.0), (2, math.nan)):
            old.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": jnp.zeros(2)}),
                                                   metrics=ocp.args.JsonSave({"dev": v})), metrics={"dev": v})
    ckpt = Checkpointer(tmp_path, best_metric="dev", keep_best=3, async_save=False)
    assert ckpt.best_step() == 1
    ckpt.close()


def test_a_missing_best_metric_is_named(tmp_path):
    ckpt = Checkpointer(tmp_path, best_metric="dev", async_save=False)
    with pytest.raises(KeyError, match="best_metric 'dev'.*'other'"):
        ckpt.save_best(1, {"w": jnp.zeros(2)}, {"other": 1.0})
    ckpt.close()


# ---------------------------------------------------------------------------- AnglE label_range


@pytest.mark.parametrize("label_range", [(1.0, 1.0), (5.0, 0.0), (0.0, math.inf), (0.0,), "05"])
def test_degenerate_label_range_is_refused(label_range):
    a = jax.random.normal(jax.random.key(0), (4, 8))
    b = jax.random.normal(jax.random.key(1), (4, 8))
    y = jnp.array([0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="label_range"):
        A.check_label_range(label_range)
    with pytest.raises(ValueError, match="label_range"):
        A.ibn_pair_weights(y, label_range=label_range)
    with pytest.raises(ValueError, match="label_range"):
        A.angle_loss(a, b, y, label_range=label_range)
    with pytest.raises(ValueError, match="label_range"):  # even when no term reads it
        A.angle_loss(a, b, y, ibn_w=0.0, cosine_w=1.0, label_range=label_range)


def test_valid_label_range_passes():
    assert A.check_label_range((0, 5)) == (0.0, 5.0)
    np.testing.assert_array_equal(A.ibn_pair_weights(jnp.array([4.0, 2.0]), label_range=(0.0, 5.0)), [1.0, 0.0])


# ---------------------------------------------------------------------------- TFDS source_dir


@pytest.fixture
def no_download(monkeypatch):
    """Any download attempt raises, so a fallback to the internet cannot pass unnoticed."""
    import tensorflow_datasets as tfds

    class Downloaded(Exception):
        pass

    def refuse(self, *args, **kwargs):
        raise Downloaded("a download was attempted")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", refuse)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", refuse)
    return Downloaded


@pytest.mark.parametrize("name, present, missing", [
    ("embedjax_stsb", ["sts-dev.csv"], "sts-train.csv"),
    ("embedjax_sick", ["SICK_train.txt"], "SICK_trial.txt"),
])
def test_tfds_source_dir_missing_empty_or_incomplete_is_an_error(name, present, missing, tmp_path, no_download,
                                                                   stsb_dir, sick_dir):
    from embedjax.data import tfds_builders as T

    src = tmp_path / "src"
    with pytest.raises(FileNotFoundError, match=rf"source_dir {src} does not exist.*{missing}"):
        T.prepare(name, tmp_path / "tfds", source_dir=src)
    src.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"source_dir {src} is empty.*{missing}"):
        T.prepare(name, tmp_path / "tfds", source_dir=src)
    for f in present:
        shutil.copyfile((stsb_dir if "sts" in f else sick_dir) / f, src / f)
    with pytest.raises(FileNotFoundError, match=rf"source_dir {src} lacks {missing}"):
        T.prepare(name, tmp_path / "tfds", source_dir=src)

    # the builders themselves: an explicit manual dir is checked just as strictly
    import tensorflow_datasets as tfds

    builder = T.BUILDERS[name](data_dir=os.fspath(tmp_path / "tfds"), file_format="array_record")
    with pytest.raises(FileNotFoundError, match=rf"{src} lacks {missing}"):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(src)))


def test_tfds_download_stays_for_no_source_dir(tmp_path, no_download, stsb_dir):
    from embedjax.data import tfds_builders as T

    with pytest.raises(no_download):
        T.prepare("embedjax_stsb", tmp_path / "tfds")
    # an incomplete copy in TFDS's default manual dir is an error, not a download
    manual = tmp_path / "tfds2" / "downloads" / "manual"
    manual.mkdir(parents=True)
    shutil.copyfile(stsb_dir / "sts-dev.csv", manual / "sts-dev.csv")
    with pytest.raises(FileNotFoundError, match=rf"manual dir {manual} lacks sts-train.csv"):
        T.prepare("embedjax_stsb", tmp_path / "tfds2")


# ---------------------------------------------------------------------------- encode.py rows


def test_read_sentences_keep_blank(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"one\r\n\n  two  \n \t \nthree\n\n")
    assert read_sentences(path) == ["one", "two", "three"]
    rows = read_sentences(path, keep_blank=True)
    assert rows == ["one", "", "two", "", "three", ""] and rows.lines == [1, 2, 3, 4, 5, 6]
    path.write_bytes(b"one\n\nlast without newline")
    assert read_sentences(path, keep_blank=True) == ["one", "", "last without newline"]
    with pytest.raises(ValueError, match="keep_blank"):
        read_sentences(tmp_path / "x.csv", keep_blank=True)


def load_script(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encode_keeps_one_row_per_line(tiny_model, tmp_path):
    lines = ["first line", "", "third, after a blank one", "", "", "sixth", "", ""]
    path = tmp_path / "in.csv"  # the suffix must not turn the text into columns ("third" <- "third, after ...")
    path.write_text("\n".join(lines) + "\n")
    assert len(path.read_text().splitlines()) == len(lines) == 8
    emb = load_script("encode").main(["--input", str(path), "--output", str(tmp_path / "out.npy"),
                                      "--model", str(tiny_model)])
    assert emb.shape == (len(lines), 32)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), emb)
    encoder = embedjax.load_pretrained(tiny_model)
    for i, line in enumerate(lines):
        np.testing.assert_allclose(emb[i], encoder.encode(line), atol=1e-6, err_msg=f"line {i + 1}")
    assert not np.allclose(emb[0], emb[1])  # the blank line is not a copy of its neighbour


# ---------------------------------------------------------------------------- one-line errors


def test_one_line_messages():
    assert cli.one_line(ValueError("a:\n  b\n\n  c\nd")) == "a: b; c; d"
    assert cli.one_line(KeyError("no such key")) == "no such key"
    assert cli.one_line(ValueError()) == "ValueError"
    assert cli.one_line(ValueError("x" * 50), max_chars=10).startswith("xxxxxxxxxx... (40 more")


def test_run_with_a_plain_callable(capsys):
    def bad(argv):
        raise DataError("f.txt", 3, "expected\nsomething")

    with pytest.raises(SystemExit) as exit_:
        cli.run(bad, ["x"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: f.txt:3: expected; something\n"
    with pytest.raises(SystemExit):
        cli.run(bad, ["x"], debug=True)
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError: f.txt:3: expected" in err

    seen = []
    assert cli.run(lambda argv: seen.append(argv) or 7, ["a", "--debug", "--", "--debug"], strip_debug=True) == 7
    assert seen == [["a", "--", "--debug"]]
    with pytest.raises(ZeroDivisionError):  # a bug is not a user error
        cli.run(lambda argv: 1 / 0, [])


def run_script(name, *args, env=None):
    proc = subprocess.run([sys.executable, f"scripts/{name}.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})
    return proc


def assert_one_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_encode_cli_bad_input_is_one_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\n\nstill fine\nbad \xff byte\n")
    args = ["--input", path, "--output", tmp_path / "out.npy", "--model", tmp_path / "no_model_needed"]
    line = assert_one_line(run_script("encode", *args), "bad.txt:4:", "expected UTF-8")
    assert not (tmp_path / "out.npy").exists(), line
    debug = run_script("encode", *args, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "bad.txt:4:" in debug.stderr


def test_eval_cli_bad_row_and_default_data_path(tmp_path):
    data = tmp_path / "data" / "stsb"
    data.mkdir(parents=True)
    (data / "sts-dev.csv").write_text("main\tf\t2012\t1\t4.0\tA cat.\tA cat sits.\n"
                                      "main\tf\t2012\t2\t7.5\tA dog.\tA dog runs.\n")
    # no --task: EMBEDJAX_DATA decides, and the bad row (line 2) is reported before any model is loaded
    assert_one_line(run_script("eval", "--model", tmp_path / "no_model", env={"EMBEDJAX_DATA": str(tmp_path / "data")}),
                    f"{data / 'sts-dev.csv'}:2:", "expected a number in 0.0..5.0")


def test_eval_cli_rejects_dims_and_layers_outside_the_model(tiny_model, tmp_path, stsb_dir):
    task = f"sts:{stsb_dir / 'sts-dev.csv'}"
    assert_one_line(run_script("eval", tiny_model, "--task", task, "--dims", "32", "64"), "--dims 64", "1..32")
    assert_one_line(run_script("eval", tiny_model, "--task", task, "--layers", "0"), "--layers 0")
    assert_one_line(run_script("eval", tiny_model, "--task", task, "--layers", "3"), "--layers 3", "1..2")


def test_eval_rejects_out_of_range_before_evaluating(tiny_model, stsb_dir, monkeypatch):
    from embedjax.eval import base

    module = load_script("eval")
    called = []
    monkeypatch.setattr(base, "encode", lambda *a, **k: called.append(1))  # what every evaluator embeds with
    for flag, value in (("--dims", "33"), ("--layers", "3"), ("--dims", "0")):
        with pytest.raises(ValueError, match=f"{flag} {value}: expected"):
            module.main([str(tiny_model), "--task", f"sts:{stsb_dir / 'sts-dev.csv'}", flag, value])
    assert not called


def test_export_cli_bad_checkpoint_is_one_line(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "config.json").write_text('{\n  "hidden_size": 32,\n  "num_layers" 2\n}\n')
    proc = run_script("export", "--model", model, "--output", tmp_path / "out")
    assert_one_line(proc, "config.json", "line 3")
    debug = run_script("export", "--model", model, "--output", tmp_path / "out", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr
