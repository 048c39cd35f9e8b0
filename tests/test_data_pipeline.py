"""TFDS builders (array_record, no TensorFlow) and grain pipelines: determinism, epochs,
sharding, static bucket shapes, exact resume, duplicate-text hashes."""

import hashlib
import json
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from embedjax.data import pipeline as P
from embedjax.data import readers as R
from embedjax.data import tfds_builders as T
from embedjax.tokenize import bucket_for

tfds.disable_progress_bar()


def blake_int32(text):
    """The documented hash, recomputed here independently of the pipeline."""
    return int(np.frombuffer(hashlib.blake2b(text.encode(), digest_size=4).digest(), "<i4")[0])


def shard(i, n):
    return grain.sharding.ShardOptions(shard_index=i, shard_count=n)


def take(it, k):
    return [next(it) for _ in range(k)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(y)):
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def tok(minilm):
    return minilm.tokenizer


@pytest.fixture(scope="module")
def records(stsb_dir):
    return R.read_stsb(stsb_dir / "sts-dev.csv")[:61]  # 61 = 7 batches of 8 + 5 left over


def train(records, tok, **kw):
    kw.setdefault("global_batch_size", 8)
    kw.setdefault("seed", 0)
    kw.setdefault("shard_options", shard(0, 1))
    return P.train_pipeline(records, tok, **kw)


# ---------------------------------------------------------------------------- pipeline


def test_batch_contents_match_the_records(records, tok):
    for batch in take(train(records, tok), 8):
        idx = batch.index
        assert batch.valid.all() and (idx >= 0).all()
        assert batch.labels.dtype == np.float32
        np.testing.assert_allclose(batch.labels, [records[i].score for i in idx], rtol=1e-6)
        assert list(batch.a.hashes) == [blake_int32(records[i].text_a) for i in idx]
        assert list(batch.b.hashes) == [blake_int32(records[i].text_b) for i in idx]
        for side, field in (("a", "text_a"), ("b", "text_b")):
            for row, i in enumerate(idx):
                ids = tok.backend.encode(getattr(records[i], field)).ids
                assert getattr(batch, side).ids[row, : len(ids)].tolist() == ids
                assert getattr(batch, side).mask[row].sum() == len(ids)


def test_deterministic_given_seed(records, tok):
    a = take(train(records, tok, seed=3), 16)
    b = take(train(records, tok, seed=3), 16)
    assert_batches_equal(a, b)
    c = take(train(records, tok, seed=4), 16)
    assert [x.index.tolist() for x in a] != [x.index.tolist() for x in c]


def test_every_example_once_per_epoch_and_epochs_shuffle_differently(records, tok):
    n, rows = len(records), 8
    it = train(records, tok, num_epochs=3)
    per_epoch = n // rows
    assert it.batches_per_epoch == per_epoch == P.steps_per_epoch(n, rows)
    batches = list(it)  # finite: 3 epochs
    assert len(batches) == 3 * per_epoch
    orders = []
    for e in range(3):
        seen = np.concatenate([b.index for b in batches[e * per_epoch:(e + 1) * per_epoch]])
        assert len(seen) == len(set(seen.tolist())) == per_epoch * rows  # nothing twice; drop_remainder
        assert set(seen.tolist()) <= set(range(n))
        orders.append(seen.tolist())
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert orders[0] != sorted(orders[0])  # shuffled, not in source order
    assert it.epoch == 3


def test_hosts_get_disjoint_shards(records, tok):
    n = len(records)
    hosts = [train(records, tok, global_batch_size=8, shard_options=shard(h, 2)) for h in range(2)]
    one = train(records, tok, global_batch_size=8, shard_options=shard(0, 1))
    assert hosts[0].batches_per_epoch == hosts[1].batches_per_epoch == one.batches_per_epoch == n // 8
    per_epoch = hosts[0].batches_per_epoch
    for epoch in range(2):
        per_host = [[b.index.tolist() for b in take(h, per_epoch)] for h in hosts]
        seen = [sum(batches, []) for batches in per_host]
        assert all(len(s) == per_epoch * 4 == len(set(s)) for s in seen)
        assert not set(seen[0]) & set(seen[1])
        assert set(seen[0]) | set(seen[1]) <= set(range(n))
        # step by step, the hosts' rows together are the one-host global batch, in order
        for k, batch in enumerate(take(one, per_epoch)):
            assert per_host[0][k] + per_host[1][k] == batch.index.tolist()
    # the host batch is the global batch divided by the host count
    assert next(hosts[0]).a.ids.shape[0] == 4
    with pytest.raises(ValueError, match="multiple of the host count"):
        train(records, tok, global_batch_size=9, shard_options=shard(0, 2))


def test_shapes_are_static_length_buckets(records, tok):
    lengths = {"a": set(), "b": set()}
    differ = False
    for batch in take(train(records, tok), 14):
        for side, field in (("a", "text_a"), ("b", "text_b")):
            longest = max(len(tok.backend.encode(getattr(records[i], field)).ids) for i in batch.index)
            shape = getattr(batch, side).ids.shape
            assert shape == (8, bucket_for(longest, tok.buckets)) and shape[1] in tok.buckets
            assert getattr(batch, side).mask.shape == getattr(batch, side).types.shape == shape
            assert getattr(batch, side).ids.dtype == np.int32
            lengths[side].add(shape[1])
        differ |= batch.a.ids.shape != batch.b.ids.shape
    assert len(lengths["a"] | lengths["b"]) > 1 and differ  # the test exercised real bucketing


@pytest.mark.parametrize("stop", [3, 10])  # mid first epoch; mid second epoch (7 batches an epoch)
def test_resume_gives_the_remaining_batches(records, tok, stop):
    straight = take(train(records, tok, seed=7), 20)

    first = train(records, tok, seed=7)
    assert_batches_equal(take(first, stop), straight[:stop])
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
    assert state["next_batch"] == stop
    assert (state["epoch"], state["batch_in_epoch"]) == divmod(stop, 7)
    del first

    resumed = train(records, tok, seed=7)
    resumed.set_state(state)
    assert resumed.epoch == stop // 7
    assert_batches_equal(take(resumed, 20 - stop), straight[stop:])


def test_resume_through_grain_orbax_handler(records, tok, tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler, CheckpointRestore, CheckpointSave

    straight = take(train(records, tok, seed=1), 6)
    it = train(records, tok, seed=1)
    take(it, 4)
    CheckpointHandler().save(epath.Path(tmp_path), args=CheckpointSave(it))
    fresh = train(records, tok, seed=1)
    CheckpointHandler().restore(epath.Path(tmp_path), args=CheckpointRestore(fresh))
    assert_batches_equal(take(fresh, 2), straight[4:])


def test_state_from_another_pipeline_is_refused(records, tok):
    state = train(records, tok, seed=1).get_state()
    with pytest.raises(ValueError, match="another pipeline"):
        train(records, tok, seed=2).set_state(state)
    with pytest.raises(ValueError, match="another pipeline"):
        train(records, tok, seed=1, global_batch_size=4).set_state(state)


def test_duplicate_texts_hash_equal(tok):
    texts = ["A man plays.", "A dog runs.", "A man plays.", "Cats sleep.", "A dog runs.", "a man plays."]
    source = [R.Pair(texts[i], texts[(i + 1) % len(texts)]) for i in range(len(texts))]
    batch = next(P.eval_pipeline(source, tok, global_batch_size=8, shard_options=shard(0, 1)))
    side_texts = {"a": [p.text_a for p in source], "b": [p.text_b for p in source]}
    cells = [(s, i) for s in "ab" for i in range(len(source))]
    for s1, i in cells:
        for s2, j in cells:
            same_text = side_texts[s1][i] == side_texts[s2][j]
            assert (getattr(batch, s1).hashes[i] == getattr(batch, s2).hashes[j]) == same_text
    assert len(set(batch.a.hashes[: len(source)].tolist())) == len(set(texts))


def test_eval_pipeline_covers_everything_once_in_step_across_hosts(records, tok):
    n = len(records)
    per_host = []
    for h in range(3):
        batches = list(P.eval_pipeline(records, tok, global_batch_size=24, shard_options=shard(h, 3)))
        per_host.append(batches)
        for b in batches:
            assert b.a.ids.shape[0] == 8
            assert (b.index >= 0).tolist() == b.valid.tolist()
            assert not b.a.mask[~b.valid].any() and not b.labels[~b.valid].any()
    assert len({len(b) for b in per_host}) == 1  # hosts stay in step
    seen = np.concatenate([b.index[b.valid] for bs in per_host for b in bs]).tolist()
    assert seen == list(range(n))  # in order, nothing dropped, nothing twice


def test_triplets_and_sentences(tok):
    triplets = [R.Triplet(f"anchor {i}", f"positive {i}", f"negative {i}") for i in range(10)]
    batch = next(train(triplets, tok, global_batch_size=4))
    assert all(x is not None for x in (batch.n.ids, batch.n.mask, batch.n.types, batch.n.hashes))
    assert batch.labels is None
    assert list(batch.n.hashes) == [blake_int32(triplets[i].text_n) for i in batch.index]
    sentences = [f"sentence number {i}" for i in range(10)]
    batch = next(train(sentences, tok, global_batch_size=4, preprocess=str.upper))
    assert set(batch.sides) == {"a"} and batch.a.ids is not None and batch.labels is None
    assert list(batch.a.hashes) == [blake_int32(sentences[i]) for i in batch.index]  # raw text
    first = tok.backend.encode(sentences[batch.index[0]].upper()).ids
    assert batch.a.ids[0, : len(first)].tolist() == first  # preprocess applies before tokenizing


def test_too_little_data_for_a_batch(tok):
    with pytest.raises(ValueError, match="no full batch"):
        train([R.Pair("a", "b")] * 5, tok, global_batch_size=8)
    with pytest.raises(KeyError, match="no text_b"):
        list(train([R.Pair("a", "b")] * 3 + ["c"] * 5, tok, global_batch_size=8, num_epochs=1))


# ---------------------------------------------------------------------------- TFDS builders


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, stsb_dir, sick_dir):
    root = tmp_path_factory.mktemp("tfds")
    T.prepare("embedjax_stsb", root, source_dir=stsb_dir)
    T.prepare("embedjax_sick", root, source_dir=sick_dir)
    return root


def raw_by_line(path):
    return {i: line.split("\t") for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1)
            if line.strip()}


@pytest.mark.parametrize("split,file,count", [("train", "sts-train.csv", 5749), ("dev", "sts-dev.csv", 1500)])
def test_tfds_stsb_matches_the_raw_files(tfds_dir, stsb_dir, split, file, count):
    ds = tfds.data_source("embedjax_stsb", split=split, data_dir=tfds_dir, download=False)
    raw = raw_by_line(stsb_dir / file)
    assert len(ds) == len(raw) == count
    lines = []
    for i in range(len(ds)):
        r = ds[i]
        cols = raw[int(r["line"])]
        assert (r["text_a"].decode(), r["text_b"].decode(), r["genre"].decode()) == (cols[5], cols[6], cols[0])
        assert r["score"] == np.float32(cols[4])
        lines.append(int(r["line"]))
    assert sorted(lines) == sorted(raw)  # every line once, those with extra columns included
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("split,file,count", [("train", "SICK_train.txt", 4500), ("trial", "SICK_trial.txt", 500)])
def test_tfds_sick_matches_the_raw_files(tfds_dir, sick_dir, split, file, count):
    builder = tfds.builder("embedjax_sick", data_dir=tfds_dir)
    assert builder.info.splits[split].num_examples == count
    names = builder.info.features["label"].names
    ds = builder.as_data_source(split=split)
    raw = raw_by_line(sick_dir / file)
    for i in range(0, len(ds), 7):
        r = ds[i]
        cols = raw[int(r["line"])]
        assert (int(r["pair_id"]), r["text_a"].decode(), r["text_b"].decode()) == (int(cols[0]), cols[1], cols[2])
        assert r["score"] == np.float32(cols[3]) and names[r["label"]] == cols[4]
    assert "tensorflow" not in sys.modules


def test_tfds_text_files_builder(tmp_path):
    files = {
        "pairs": ("p.tsv", "q\tp\nA cat.\tA kitten.\nA dog.\tA puppy.\n", {"columns": {"text_a": "q", "text_b": "p"}}),
        "triplets": ("t.jsonl", '{"a": "x", "p": "y", "n": "z"}\n\n{"a": "u", "p": "v", "n": "w"}\n',
                     {"columns": {"text_a": "a", "text_b": "p", "text_n": "n"}}),
        "scored": ("s.csv", 'one,"two, too",0.5\nthree,four,1\n', {"score_range": (0, 1)}),
        "sentences": ("u.txt", "First.\nSecond.\n\nThird.\n", {}),
    }
    for kind, (name, content, options) in files.items():
        path = tmp_path / name
        path.write_text(content)
        T.build_text_files(tmp_path / "tfds", f"my_{kind}", kind, {"train": path}, **options)
        ds = tfds.data_source(f"embedjax_text_files/my_{kind}", split="train", data_dir=tmp_path / "tfds",
                              download=False)
        expected = R.read_records(path, kind, **options)
        got = sorted((int(r["line"]), P.as_record(r)) for r in ds)
        assert [line for line, _ in got] == expected.lines
        assert [rec for _, rec in got] == [P.as_record(x) for x in expected]
    assert "tensorflow" not in sys.modules


def test_tfds_text_files_rebuilds_when_the_file_changes_and_reports_bad_rows(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("a\tb\n")
    b = T.build_text_files(tmp_path / "tfds", "p", "pairs", {"train": path})
    assert b.info.splits["train"].num_examples == 1
    path.write_text("a\tb\nc\td\n")
    b = T.build_text_files(tmp_path / "tfds", "p", "pairs", {"train": path})
    assert len(b.as_data_source("train")) == 2
    path.write_text("a\tb\nc\td\te\n")
    with pytest.raises(R.DataError, match=r"p\.tsv:2: expected 2 tab-separated columns"):
        T.build_text_files(tmp_path / "tfds", "p", "pairs", {"train": path})
    b = T.build_text_files(tmp_path / "tfds", "p", "pairs", {"train": path}, skip_bad=True)
    assert len(b.as_data_source("train")) == 1


def test_tfds_by_name_with_a_column_mapping(tfds_dir):
    plain = tfds.data_source("embedjax_stsb", split="dev", data_dir=tfds_dir, download=False)
    swapped = T.tfds_source("embedjax_stsb", "dev", {"text_a": "text_b", "text_b": "text_a", "score": "score"},
                            data_dir=tfds_dir, download=False)
    assert len(swapped) == len(plain)
    for i in (0, 1, 777, len(plain) - 1):
        assert swapped[i] == {"text_a": plain[i]["text_b"].decode(), "text_b": plain[i]["text_a"].decode(),
                              "score": float(plain[i]["score"])}
    assert swapped.__getitems__([3, 4]) == [swapped[3], swapped[4]]
    default = T.tfds_source("embedjax_sick", "trial", data_dir=tfds_dir, download=False)
    assert set(default[0]) == {"text_a", "text_b", "score"}
    with pytest.raises(KeyError, match="sentence1"):
        T.tfds_source("embedjax_stsb", "dev", {"text_a": "sentence1", "text_b": "text_b"},
                      data_dir=tfds_dir, download=False)


def test_pipeline_reads_a_tfds_source(tfds_dir, tok):
    source = tfds.data_source("embedjax_sick", split="trial", data_dir=tfds_dir, download=False)
    batch = next(P.train_pipeline(source, tok, global_batch_size=16, seed=0, shard_options=shard(0, 1)))
    for row, i in enumerate(batch.index):
        assert batch.a.hashes[row] == blake_int32(source[int(i)]["text_a"].decode())
        assert batch.labels[row] == source[int(i)]["score"]


def test_build_and_read_with_tensorflow_blocked(tfds_dir, tmp_path):
    """A fresh interpreter where tensorflow cannot be found: build, then read via tfds.data_source."""
    script = textwrap.dedent(f"""
        import importlib.util, sys
        attempts = []
        class Hide:  # every finder answers "no such module" for tensorflow: as if not installed
            def __init__(self, finder):
                self.finder = finder
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorflow":
                    attempts.append(name)
                    return None
                return self.finder.find_spec(name, path, target)
            def invalidate_caches(self):
                getattr(self.finder, "invalidate_caches", lambda: None)()
        sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
        assert importlib.util.find_spec("tensorflow") is None
        try:
            import tensorflow
            raise SystemExit("tensorflow is not blocked")
        except ImportError:
            pass
        import tensorflow_datasets as tfds
        tfds.disable_progress_bar()
        from embedjax.data import tfds_builders as T
        path = {str(tmp_path / 'pairs.tsv')!r}
        open(path, "w").write("x\\ty\\nz\\tw\\n")
        T.build_text_files({str(tmp_path / 'tfds')!r}, "blocked", "pairs", {{"train": path}})
        ds = tfds.data_source("embedjax_text_files/blocked", split="train", data_dir={str(tmp_path / 'tfds')!r})
        assert sorted(r["text_a"] for r in ds) == [b"x", b"z"], list(ds)
        dev = tfds.data_source("embedjax_stsb", split="dev", data_dir={str(tfds_dir)!r}, download=False)
        assert len(dev) == 1500 and dev[0]["text_a"]
        assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
        print("OK", len(attempts))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout
