"""Data for distillation and multi-task mixtures: several hard negatives and teacher scores per
record (readers, batches padded / packed / agreed across hosts, what the objective embeds),
and the mixture schedule and its exactly resumable iterator."""

import dataclasses
import hashlib
import json
import math

import grain
import jax
import numpy as np
import pytest

from embedjax import distributed, tiny, tokenize
from embedjax.data import mixture as M
from embedjax.data import pipeline as P
from embedjax.data import readers as R

WORDS = "alpha beta gamma delta query passage negative mined teacher score river stone cloud light".split()


def blake_int32(text):
    """The documented text hash, recomputed independently of the pipeline."""
    return int(np.frombuffer(hashlib.blake2b(text.encode(), digest_size=4).digest(), "<i4")[0])


def sentence(rng, lo=1, hi=12):
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    backend = tiny.train_tokenizer([sentence(rng) for _ in range(200)], vocab_size=300)
    return tokenize.Tokenizer(backend, 64, backend.token_to_id(tiny.PAD))


def distill_records(n, k, seed=0):
    rng = np.random.default_rng(seed)
    return [R.DistillRecord(f"q{i} " + sentence(rng), f"p{i} " + sentence(rng),
                            tuple(f"n{i}.{j} " + sentence(rng) for j in range(k)),
                            tuple(float(x) for x in rng.normal(size=1 + k)))
            for i in range(n)]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------------------- readers


def test_triplets_accept_a_list_of_negatives(tmp_path):
    path = write(tmp_path, "t.jsonl", jsonl([{"text_a": "q", "text_b": "p", "text_n": ["n1", "n2"]},
                                            {"text_a": "q2", "text_b": "p2", "text_n": ["m1", "m2"]}]))
    assert R.read_triplets(path) == [R.Triplet("q", "p", ("n1", "n2")), R.Triplet("q2", "p2", ("m1", "m2"))]
    single = write(tmp_path, "s.jsonl", jsonl([{"text_a": "q", "text_b": "p", "text_n": "n"}]))
    assert R.read_triplets(single) == [R.Triplet("q", "p", "n")]  # one string stays one string


def test_distill_records_from_jsonl_tsv_and_csv(tmp_path):
    rows = [{"text_a": "q", "text_b": "p", "text_n": ["n1", "n2"], "teacher": [9, 2.5, -1e-3]},
            {"text_a": "q2", "text_b": "p2", "text_n": ["m1", "m, 2"], "teacher": [1, 0, 0.5]}]
    want = [R.DistillRecord("q", "p", ("n1", "n2"), (9.0, 2.5, -1e-3)),
            R.DistillRecord("q2", "p2", ("m1", "m, 2"), (1.0, 0.0, 0.5))]
    assert R.read_distill(write(tmp_path, "d.jsonl", jsonl(rows))) == want
    got = R.read_distill(write(tmp_path, "d.tsv", "".join(
        f"{r['text_a']}\t{r['text_b']}\t{json.dumps(r['text_n'])}\t{json.dumps(r['teacher'])}\n" for r in rows)))
    assert got == want
    csv_ = 'q,p,"[""n1"", ""n2""]","[9, 2.5, -0.001]"\nq2,p2,"[""m1"", ""m, 2""]","[1, 0, 0.5]"\n'
    assert R.read_records(write(tmp_path, "d.csv", csv_), "distill") == want
    # a plain text cell is one negative (k = 1); named columns map as for any kind
    columns = {"text_a": "q", "text_b": "p", "text_n": "n", "teacher": "teach"}
    one = write(tmp_path, "one.tsv", "teach\tn\tq\tp\n[0.9, 0.1]\tneg [1]\tq\tp\n")
    assert R.read_records(one, "distill", columns=columns) == [R.DistillRecord("q", "p", ("neg [1]",), (0.9, 0.1))]
    # a cell starting with "[" is JSON: a text that starts so is written as a list, never guessed
    bracket = write(tmp_path, "b.tsv", "teach\tn\tq\tp\n[0.9, 0.1]\t[citation] neg\tq\tp\n")
    with pytest.raises(R.DataError, match=r"b.tsv:2: text_n \(column 'n'\) '\[citation\] neg' is not valid JSON"):
        R.read_records(bracket, "distill", columns=columns)
    listed = write(tmp_path, "l.tsv", 'teach\tn\tq\tp\n[0.9, 0.1]\t["[citation] neg"]\tq\tp\n')
    assert R.read_records(listed, "distill", columns=columns)[0].text_n == ("[citation] neg",)
    # distill text_n as one JSON string: k = 1, still a tuple
    assert R.read_distill(write(tmp_path, "s.jsonl", jsonl([{"text_a": "q", "text_b": "p", "text_n": "n",
                                                              "teacher": [1, 2]}])))[0].text_n == ("n",)


ROW = {"text_a": "q", "text_b": "p", "text_n": ["n1", "n2"], "teacher": [1.0, 0.5, 0.2]}


@pytest.mark.parametrize("bad, expected", [
    ({"text_n": ["n1"], "teacher": [1, 2]}, ["holds 1 negative(s), expected 2 negative(s) as on line 1"]),
    ({"teacher": [1, 2]}, ["teacher (column 'teacher') has 2 number(s)", "list of 3 finite numbers"]),
    ({"teacher": [1, "0.5", 2]}, ["item 1 '0.5' is not a finite number"]),
    ({"teacher": [1, True, 2]}, ["item 1 True is not a finite number"]),
    ({"teacher": [1, float("nan"), 2]}, ["item 1 nan is not a finite number"]),
    ({"teacher": 0.5}, ["teacher (column 'teacher') is float 0.5", "list of 3 finite numbers"]),
    ({"text_n": ["n1", " "]}, ["text_n (column 'text_n') item 1 is empty"]),
    ({"text_n": []}, ["must be a non-empty list of texts"]),
    ({"text_n": ["n1", 3]}, ["item 1 must be a string, found int 3"]),
    ({"text_n": {"a": 1}}, ["must be a text or a non-empty list of texts, found dict"]),
    ({"text_b": ""}, ["text_b (column 'text_b') is empty"]),
])
def test_distill_errors_name_file_line_and_expectation(tmp_path, bad, expected):
    path = write(tmp_path, "d.jsonl", jsonl([ROW, ROW, {**ROW, **bad}]))
    with pytest.raises(R.DataError) as err:
        R.read_distill(path)
    assert str(err.value).startswith(f"{path}:3: ")
    for fragment in expected:
        assert fragment in str(err.value)
    # skip_bad: the bad row is counted and left out
    rows = R.read_distill(path, skip_bad=True)
    assert len(rows) == 2 and rows.skipped == 1


def test_negative_counts_must_agree_in_a_file(tmp_path):
    mixed = write(tmp_path, "t.jsonl", jsonl([{"text_a": "q", "text_b": "p", "text_n": "n"},
                                             {"text_a": "q", "text_b": "p", "text_n": ["n"]}]))
    with pytest.raises(R.DataError, match=r"t.jsonl:2: .*holds 1 negative\(s\), expected a single text, not a list "
                                          r"as on line 1"):
        R.read_triplets(mixed)
    # the first GOOD row sets k: a bad first row skipped does not
    path = write(tmp_path, "d.jsonl", jsonl([{**ROW, "teacher": [1]}, {**ROW, "text_n": ["a"], "teacher": [1, 2]},
                                            ROW]))
    rows = R.read_distill(path, skip_bad=True)
    assert [len(r.text_n) for r in rows] == [1] and rows.skipped == 2
    bad_json = write(tmp_path, "d.tsv", "q\tp\t[\"n\"]\t[1, 2\n")
    with pytest.raises(R.DataError, match=r"d.tsv:1: teacher \(column 3\) .* is not valid JSON .*expected a JSON "
                                          r"list of 2 numbers"):
        R.read_distill(bad_json)


# ---------------------------------------------------------------------------- batches


def collate(records, tok, rows=None, **kw):
    rows = rows or len(records)
    return P.collate(list(enumerate(records)), tok, rows, P.fields_of(records), **kw)


def test_as_record_keeps_lists_of_negatives_and_teacher_scores():
    rec = P.as_record({"text_a": b"q", "text_n": [b"n1", "n2"], "teacher": np.array([1, 2], np.int64)})
    assert rec == {"text_a": "q", "text_n": ("n1", "n2"), "teacher": (1.0, 2.0)}
    assert all(type(x) is float for x in rec["teacher"])
    assert P.as_record(R.Triplet("a", "b", "c"))["text_n"] == "c"
    assert P.fields_of(distill_records(2, 3)) == ("text_a", "text_b", "text_n", "teacher")
    with pytest.raises(TypeError, match="teacher must be a list"):
        P.as_record({"text_a": "q", "teacher": 0.5})


@pytest.mark.parametrize("common_length", [False, True])
def test_padded_batch_with_k_negatives(tok, common_length):
    k, rows = 3, 8
    records = distill_records(6, k)
    prompt = "negative: "
    batch = collate(records, tok, rows, common_length=common_length, prompts={"n": prompt}, include_prompt=False)
    length = batch.n.ids.shape[-1]
    for key in ("ids", "mask", "types", "pool"):
        value = getattr(batch.n, key)
        assert value.shape == (rows, k, length) and value.dtype == np.int32, key
    assert batch.n.hashes.shape == (rows, k) and batch.teacher.shape == (rows, 1 + k)
    assert batch.teacher.dtype == np.float32
    skip = len(tok.backend.encode(prompt).ids)  # this BPE adds no special tokens: all prompt tokens skipped
    longest = max(len(tok.backend.encode(prompt + t).ids) for r in records for t in r.text_n)
    assert length == tokenize.bucket_for(longest, tok.buckets)
    for i, r in enumerate(records):
        np.testing.assert_allclose(batch.teacher[i], r.teacher, rtol=1e-6)
        for j, text in enumerate(r.text_n):
            ids = tok.backend.encode(prompt + text).ids
            assert batch.n.ids[i, j, :len(ids)].tolist() == ids
            assert (batch.n.ids[i, j, len(ids):] == tok.pad_token_id).all()
            assert batch.n.mask[i, j].tolist() == [1] * len(ids) + [0] * (length - len(ids))
            assert batch.n.pool[i, j].tolist() == [0] * skip + [1] * (len(ids) - skip) + [0] * (length - len(ids))
            assert batch.n.hashes[i, j] == blake_int32(text)  # the hash is of the text without its prompt
    assert not batch.teacher[6:].any() and not batch.n.mask[6:].any() and not batch.n.hashes[6:].any()
    if common_length:
        assert batch.a.ids.shape[-1] == batch.b.ids.shape[-1] == length


def test_single_negative_keeps_the_flat_layout(tok):
    records = [R.Triplet(f"a {i}", f"b {i}", f"n {i}") for i in range(4)]
    padded, packed = collate(records, tok), collate(records, tok, packing=P.Packing(16))
    assert padded.n.ids.ndim == 2 and padded.n.hashes.shape == (4,) and padded.teacher is None
    assert packed.n.text_index.shape == (4,)
    # teacher scores with a single-text negative: 1 + 1 per record
    dicts = [{"text_a": r.text_a, "text_b": r.text_b, "text_n": r.text_n, "teacher": [1.0, 0.5]} for r in records]
    assert collate(dicts, tok, 6).teacher.tolist() == [[1.0, 0.5]] * 4 + [[0.0, 0.0]] * 2


def test_packed_batch_with_k_negatives(tok):
    k, rows = 2, 6
    records = distill_records(rows, k, seed=1)
    batch = collate(records, tok, rows, packing=P.Packing(length=32, rows_multiple=2))
    assert batch.n.text_index.shape == (rows, k) and batch.a.text_index.shape == (rows,) and batch.n.ids is None
    assert batch.n.hashes.shape == (rows, k) and batch.teacher.shape == (rows, 1 + k)
    seen = []
    for side, field in (("a", "text_a"), ("b", "text_b"), ("n", "text_n")):
        for i, r in enumerate(records):
            texts = getattr(r, field)
            for j, text in enumerate(texts if isinstance(texts, tuple) else (texts,)):
                g = getattr(batch, side).text_index[i, j] if side == "n" else getattr(batch, side).text_index[i]
                seen.append(int(g))
                got = batch.packed.ids[batch.packed.segments == g + 1]
                assert got.tolist() == tok.backend.encode(text).ids, (side, i, j)
    assert sorted(seen) == list(range(rows * (2 + k)))  # every text packed exactly once


def test_collate_refuses_ragged_negatives_and_teacher_scores(tok):
    records = distill_records(3, 2)
    ragged = records[:2] + [R.DistillRecord("q", "p", ("n",), (1.0, 0.0))]
    with pytest.raises(ValueError, match=r"record 2 has 1 negative\(s\) in text_n, expected 2 negative\(s\)"):
        collate(ragged, tok)
    short = records[:2] + [R.DistillRecord("q", "p", ("n", "m"), (1.0, 0.0))]
    with pytest.raises(ValueError, match=r"record 2 has 2 teacher score\(s\), expected 1 \+ 2"):
        collate(short, tok)


def test_train_pipeline_batches_follow_their_records(tok):
    records = distill_records(20, 2, seed=2)
    it = P.train_pipeline(records, tok, global_batch_size=4, seed=0,
                          shard_options=grain.sharding.ShardOptions(shard_index=0, shard_count=1))
    for _ in range(6):  # past the first epoch (5 batches)
        batch = next(it)
        for row, i in enumerate(batch.index):
            np.testing.assert_allclose(batch.teacher[row], records[i].teacher, rtol=1e-6)
            assert batch.n.hashes[row].tolist() == [blake_int32(t) for t in records[i].text_n]


def test_hosts_agree_on_k_negative_batches(tok):
    """Two hosts' halves, padded to the agreed sizes and stacked, are the one-host batch; packed,
    the global text indices of every host point at that host's own texts."""
    k = 3
    records = distill_records(8, k, seed=3)
    # host 1's negatives are longer: its side n pads to a larger bucket than host 0's
    records[5] = R.DistillRecord("q", "p", ("long " * 20, "n", "m"), (1.0, 0.1, 0.2, 0.3))
    halves = [list(enumerate(records))[:4], list(enumerate(records))[4:]]
    hosts = [P.collate(h, tok, 4, P.fields_of(records)) for h in halves]
    assert hosts[0].n.ids.shape[-1] < hosts[1].n.ids.shape[-1]
    target = np.max([b.shape_signature() for b in hosts], axis=0)
    agreed = [distributed.agree_batch(b, target, pad_token_id=tok.pad_token_id, process_index=h)
              for h, b in enumerate(hosts)]
    whole = collate(records, tok)
    stacked = jax.tree.map(lambda *xs: np.concatenate(xs), *agreed)
    assert jax.tree.structure(stacked) == jax.tree.structure(whole)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(stacked), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))

    packing = P.Packing(length=32, rows_multiple=2)
    hosts = [P.collate(h, tok, 4, P.fields_of(records), packing=packing) for h in halves]
    target = np.max([b.shape_signature() for b in hosts], axis=0)
    agreed = [distributed.agree_batch(b, target, pad_token_id=tok.pad_token_id, process_index=h)
              for h, b in enumerate(hosts)]
    indices = []
    for h, batch in enumerate(agreed):
        assert batch.n.text_index.shape == (4, k) and batch.packed.ids.shape == tuple(target[3:5])
        for i in range(4):
            for j, text in enumerate(records[4 * h + i].text_n):
                g = batch.n.text_index[i, j]
                indices.append(int(g))
                assert batch.packed.ids[batch.packed.segments == g + 1].tolist() == tok.backend.encode(text).ids
    assert len(set(indices)) == 8 * k  # no two hosts' negatives share a global index


@pytest.fixture(scope="module")
def tiny_bert(tok):
    """A random 1-layer BERT over the test tokenizer's vocabulary: (cfg, params)."""
    from embedjax.encoders import registry

    cfg = registry.config_from_hf({"model_type": "bert", "vocab_size": tok.backend.get_vocab_size(),
                                   "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "max_position_embeddings": 128, "type_vocab_size": 2,
                                   "pad_token_id": tok.pad_token_id})
    return cfg, jax.jit(lambda key: registry.of(cfg).init(cfg, key))(jax.random.key(0))


def test_objective_embeds_each_negative_as_alone(tok, tiny_bert):
    """The (rows, k, T) batch and the packed (rows, k) indices give the objective zn (rows, k, D),
    zn[i, j] the embedding of negative j of record i encoded alone."""
    from embedjax.embed import embed
    from embedjax.train.objective import Objective, batch_loss, embed_batch

    (cfg, params), k = tiny_bert, 2
    records = distill_records(4, k, seed=4)
    objective = Objective(loss="infonce", pooling="mean", dropout=False)
    model = lambda b: dataclasses.replace(b.model_inputs(), labels=None, teacher=None)  # noqa: E731
    padded = model(collate(records, tok))
    packed = model(collate(records, tok, packing=P.Packing(length=32)))
    key = jax.random.key(0)
    embed_and_loss = jax.jit(lambda b: (embed_batch(params, cfg, objective, b, key)[2],
                                        batch_loss(params, cfg, objective, b, key)))
    zn, loss = embed_and_loss(padded)
    zn_packed, loss_packed = embed_and_loss(packed)
    assert zn.shape == zn_packed.shape == (4, k, cfg.hidden_size)
    # reference: every negative in a row of its own (padding is masked out)
    alone = tok([t for r in records for t in r.text_n])
    want = jax.jit(lambda i, m: embed(params, cfg, i, m, pooling="mean", normalize=False))(
        alone.input_ids, alone.attention_mask)
    np.testing.assert_allclose(np.asarray(zn), np.asarray(want).reshape(4, k, -1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(zn_packed), np.asarray(zn), atol=1e-5)
    np.testing.assert_allclose(float(loss_packed), float(loss), rtol=1e-5)


# ---------------------------------------------------------------------------- mixture schedule


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (1.0, 1.0, 8.0)])
def test_sampled_proportions_match_the_weights(weights):
    names, steps = ("a", "b", "c"), 20_000
    drawn = [M.schedule(names, weights, "sampled", 7, t) for t in range(steps)]
    for name, w in zip(names, weights):
        p = w / sum(weights)
        assert abs(drawn.count(name) - steps * p) <= 4 * math.sqrt(steps * p * (1 - p)), name


def test_round_robin_patterns():
    rr = lambda names, weights, n: "".join(M.schedule(names, weights, "round_robin", 0, t) for t in range(n))
    assert rr("ABC", (1, 1, 1), 9) == "ABCABCABC"
    assert rr("AB", (2, 1), 9) == "ABAABAABA"
    assert rr("AB", (2.0, 1.0), 9) == rr("AB", (0.2, 0.1), 9) == "ABAABAABA"  # only the ratios matter
    ten = rr("AB", (0.7, 0.3), 10)
    assert ten.count("A") == 7 and "BB" not in ten and rr("AB", (0.7, 0.3), 30) == ten * 3
    assert M.integer_weights((0.5, 0.5, 1.0)) == (1, 1, 2)
    assert rr("AB", (1, 1), 4) == rr("AB", (1, 1), 4)  # round robin ignores the seed
    with pytest.raises(ValueError, match="repeat only every"):  # ratios of large primes: a huge period
        M.schedule("ABC", (1 / 997, 1 / 991, 1 / 983), "round_robin", 0, 0)


def test_schedule_is_deterministic_per_seed_and_step():
    names, weights = ("x", "y", "z"), (1, 2, 3)
    run = lambda seed: [M.schedule(names, weights, "sampled", seed, t) for t in range(300)]
    assert run(1) == run(1)
    assert run(1) != run(2)
    assert M.schedule(names, weights, "sampled", 1, 299) == run(1)[299]  # no history


@pytest.mark.parametrize("args, match", [
    ((("a", "b"), (1, 0), "sampled", 0, 0), "weight of source 'b' is 0"),
    ((("a", "b"), (1,), "sampled", 0, 0), "1 weights for 2 sources"),
    ((("a", "a"), (1, 1), "sampled", 0, 0), "distinct"),
    ((("a",), (1,), "shuffled", 0, 0), "mode must be one of"),
    ((("a",), (1,), "sampled", -1, 0), "seed must be an integer >= 0"),
    ((("a",), (1,), "sampled", 0, -3), "step must be an integer >= 0"),
])
def test_schedule_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        M.schedule(*args)


# ---------------------------------------------------------------------------- mixture iterator


def sources(tok):
    """Two small in-memory sources: 'nli' 12 triplets (3 batches an epoch), 'sts' 40 scored pairs (10)."""
    rng = np.random.default_rng(5)
    nli = [R.Triplet(f"nli {i} " + sentence(rng), sentence(rng), sentence(rng)) for i in range(12)]
    sts = [R.ScoredPair(f"sts {i} " + sentence(rng), sentence(rng), float(i % 5)) for i in range(40)]
    return {"sts": sts, "nli": nli}


def pipelines(tok, seeds=None, **kw):
    shard = grain.sharding.ShardOptions(shard_index=0, shard_count=1)
    seeds = seeds or {"nli": 1, "sts": 2}
    return {name: P.train_pipeline(src, tok, global_batch_size=4, seed=seeds[name], shard_options=shard, **kw)
            for name, src in sources(tok).items()}


def assert_steps_equal(xs, ys):
    assert [n for n, _ in xs] == [n for n, _ in ys]
    for (name, x), (_, y) in zip(xs, ys):
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(y)):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("mode", M.MODES)
def test_mixture_resumes_exactly(tok, mode):
    weights = {"nli": 1.0, "sts": 1.0}
    straight = M.MixtureIterator(pipelines(tok), weights, mode=mode, seed=3)
    steps = [next(straight) for _ in range(16)]
    names = [n for n, _ in steps]
    assert names == [M.schedule(("nli", "sts"), (1.0, 1.0), mode, 3, t) for t in range(16)]
    assert names.count("nli") > 3  # the small source is into its second epoch
    # each source is read only when picked: its k-th draw is its own k-th batch
    alone = pipelines(tok)
    for name, batch in steps:
        assert_steps_equal([(name, batch)], [(name, next(alone[name]))])

    first = M.MixtureIterator(pipelines(tok), weights, mode=mode, seed=3)
    head = [next(first) for _ in range(8)]
    state = first.get_state()
    assert state["step"] == 8 and set(state["sources"]) == {"nli", "sts"}
    restored = json.loads(json.dumps(state))  # JSON-able, and still resumes after the round trip
    for resumed_state in (state, restored):
        resumed = M.MixtureIterator(pipelines(tok), {"sts": 1.0, "nli": 1.0}, mode=mode, seed=3)  # order irrelevant
        resumed.set_state(resumed_state)
        assert_steps_equal(head + [next(resumed) for _ in range(8)], steps)


def test_mixture_refuses_foreign_states_and_finite_sources(tok):
    mix = M.MixtureIterator(pipelines(tok), {"nli": 1, "sts": 1}, mode="sampled", seed=0)
    state = mix.get_state()
    for other in (M.MixtureIterator(pipelines(tok), {"nli": 2, "sts": 1}, mode="sampled", seed=0),
                  M.MixtureIterator(pipelines(tok), {"nli": 1, "sts": 1}, mode="round_robin", seed=0),
                  M.MixtureIterator(pipelines(tok), {"nli": 1, "sts": 1}, mode="sampled", seed=1),
                  M.MixtureIterator(pipelines(tok, seeds={"nli": 1, "sts": 9}), {"nli": 1, "sts": 1}, seed=0)):
        with pytest.raises(ValueError, match="another mixture") as err:
            other.set_state(state)
        assert state["fingerprint"] in str(err.value) and other.fingerprint in str(err.value)
    with pytest.raises(ValueError, match=r"missing \['sts'\]"):
        M.MixtureIterator(pipelines(tok), {"nli": 1}, seed=0)
    with pytest.raises(ValueError, match="must repeat forever"):
        M.MixtureIterator(pipelines(tok, num_epochs=1), {"nli": 1, "sts": 1}, seed=0)


def test_mixture_steps_per_epoch():
    assert M.mixture_steps_per_epoch({"a": 10, "b": 25}, 4) == 2 + 6
    assert M.mixture_steps_per_epoch({"a": 10, "b": 25}, 4, host_count=2) == 2 + 6
    with pytest.raises(ValueError, match="source 'a' has 3 examples"):
        M.mixture_steps_per_epoch({"a": 3, "b": 25}, 4)
    with pytest.raises(ValueError, match="multiple of the host count"):
        M.mixture_steps_per_epoch({"a": 10}, 4, host_count=3)
