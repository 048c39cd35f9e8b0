"""BEIR retrieval training records (embedjax.data.retrieval_training): graded qrels, documents held
once, per-epoch draws of positives and negatives that a resumed pipeline repeats, the mined-negatives
file and its errors, the batch fields they fill; mining a BEIR corpus (embedjax.mine.mine_beir,
scripts/mine.py --beir) never returns a judged-relevant document."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grain
import numpy as np
import pytest

from embedjax.data import pipeline as P
from embedjax.data.readers import DataError
from embedjax.data.retrieval_readers import read_beir
from embedjax.data.retrieval_training import read_beir_training, write_hard_negatives

pytestmark = pytest.mark.fast_compile  # data logic and a tiny model's mining (conftest.py)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mine.py"

DOCS = {  # id -> (title, text)
    "d0": ("Vitamin D", "vitamin d lowers the risk of fractures"),
    "d1": ("", "fractures heal faster with calcium"),
    "d2": ("", "judged but not relevant: bones"),
    "d3": ("Sleep", "short sleep raises blood pressure"),
    "d4": ("", "coffee and the heart"),
    "d5": ("", "tea and the heart"),
    "d6": ("", "cocoa and the heart"),
    "d7": ("", "nothing relevant here"),
    "d8": ("", "coffee and the heart"),  # the same text as d4: a copy of a relevant document
    "d9": ("", "the moon is made of rock"),
}
QUERIES = {"q0": "does vitamin d prevent fractures", "q1": "sleep and blood pressure",
           "q2": "which drinks help the heart", "q3": "a query with no positive", "q4": "a query of another split"}
QRELS = [("q0", "d0", 2), ("q0", "d1", 1), ("q0", "d2", 0), ("q1", "d3", 1), ("q2", "d4", 1), ("q2", "d5", 1),
         ("q2", "d6", 1), ("q3", "d7", 0)]


def blake_int32(text):
    """The documented text hash, recomputed here independently of the pipeline."""
    return int(np.frombuffer(hashlib.blake2b(text.encode(), digest_size=4).digest(), "<i4")[0]) or 1


def joined(doc_id):
    title, text = DOCS[doc_id]
    return f"{title} {text}" if title else text


def write_beir(d: Path, qrels=QRELS, split="train") -> Path:
    (d / "qrels").mkdir(parents=True, exist_ok=True)
    (d / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                            for i, (t, x) in DOCS.items()))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in QUERIES.items()))
    (d / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{c}\t{s}\n"
                                                                                      for q, c, s in qrels))
    return d


@pytest.fixture
def beir(tmp_path):
    return write_beir(tmp_path / "beir")


def test_records_follow_the_graded_qrels_and_hold_documents_once(beir):
    records = read_beir_training(beir, "train")
    assert records.query_ids == ("q0", "q1", "q2")  # q3 has only a 0 judgment, q4 none
    assert records.skipped_queries == 1
    # documents joined exactly as the retrieval evaluator joins them, once, in corpus order
    assert records.documents == read_beir(beir, "train").corpus_texts == tuple(joined(d) for d in DOCS)
    r0 = records[0]
    assert r0["text_a"] == QUERIES["q0"]
    assert r0["text_b"] in (joined("d0"), joined("d1"))
    assert any(r0["text_b"] is t for t in records.documents)  # a reference, not a copy
    assert sorted(r0["relevant"]) == sorted(blake_int32(joined(d)) for d in ("d0", "d1"))  # not d2 (grade 0)

    strict = read_beir_training(beir, "train", min_grade=2)
    assert strict.query_ids == ("q0",)
    assert all(strict.record_at(0, e, 0)["text_b"] == joined("d0") for e in range(10))
    assert sorted(strict[0]["relevant"]) == sorted(r0["relevant"])  # d1 is still never a negative
    with pytest.raises(DataError, match=r"train.tsv: no query has a document of relevance >= 3"):
        read_beir_training(beir, "train", min_grade=3)
    with pytest.raises(ValueError, match="min_grade must be an int >= 1"):
        read_beir_training(beir, "train", min_grade=0)
    with pytest.raises(DataError, match=r"no qrels for split 'dev'.*splits found: \['train'\]"):
        read_beir_training(beir, "dev")
    with pytest.raises(ValueError, match="positives must be an int >= 1 or 'all'"):
        read_beir_training(beir, "train", positives=0)


def test_bad_qrels_line_is_named_as_the_evaluator_names_it(tmp_path):
    d = write_beir(tmp_path / "b", qrels=[("q0", "d0", 1), ("q1", "d99", 1)])
    with pytest.raises(DataError, match=r"qrels/train.tsv:3: corpus-id 'd99' is not in corpus.jsonl"):
        read_beir_training(d, "train")


def test_positive_draws_are_pure_per_seed_epoch_and_record(beir):
    records = read_beir_training(beir, "train")
    q2 = {joined(d) for d in ("d4", "d5", "d6")}
    draws = [records.record_at(2, epoch, 0)["text_b"] for epoch in range(300)]
    assert draws == [records.record_at(2, epoch, 0)["text_b"] for epoch in range(300)]  # pure
    counts = Counter(draws)
    assert set(counts) == q2 and min(counts.values()) > 60  # uniform over its 3 positives
    assert draws != [records.record_at(2, epoch, 1)["text_b"] for epoch in range(300)]  # the seed matters

    two = read_beir_training(beir, "train", positives=2)
    for epoch in range(20):
        b = two.record_at(2, epoch, 0)["text_b"]
        assert len(b) == 2 and len(set(b)) == 2 and set(b) <= q2
    assert two.record_at(1, 0, 0)["text_b"] == (joined("d3"), None)  # one positive: an empty slot

    every = read_beir_training(beir, "train", positives="all")
    assert every.slots == 3
    assert every[0]["text_b"] == (joined("d0"), joined("d1"), None)  # best grade first
    assert set(every[2]["text_b"]) == q2


def test_mined_negatives_file_and_its_errors(beir, tmp_path):
    mined = tmp_path / "neg.jsonl"
    write_hard_negatives(mined, ["q0", "q1", "q2"], [["d9", "d7", "d3"], ["d9"], ["d0", "d9"]])
    records = read_beir_training(beir, "train", hard_negatives=mined, num_negatives=2)
    for epoch in range(10):
        n0 = records.record_at(0, epoch, 0)["text_n"]
        assert len(n0) == 2 and len(set(n0)) == 2 and set(n0) <= {joined("d9"), joined("d7"), joined("d3")}
    assert records.record_at(1, 0, 0)["text_n"] == (joined("d9"), joined("d9"))  # short list: repeats

    def bad(lines, message, line=None):
        mined.write_text("".join(json.dumps(x) + "\n" for x in lines))
        where = f"neg.jsonl:{line}: " if line else "neg.jsonl: "
        with pytest.raises(DataError, match=where + message):
            read_beir_training(beir, "train", hard_negatives=mined, num_negatives=1)

    ok = [{"query_id": "q0", "negatives": ["d9"]}, {"query_id": "q1", "negatives": ["d9"]}]
    bad(ok + [{"query_id": "q2", "negatives": ["d4"]}], "negative 'd4' is judged relevant to query 'q2'", 3)
    bad(ok + [{"query_id": "q2", "negatives": ["nope"]}], "negative 'nope' is not in corpus.jsonl", 3)
    bad(ok + [{"query_id": "q9", "negatives": ["d9"]}], "query_id 'q9' is not a query of this split", 3)
    bad(ok + [{"query_id": "q0", "negatives": ["d9"]}], r"query_id 'q0' again \(first on line 1\)", 3)
    bad(ok + [{"query_id": "q2", "negatives": "d9"}], "negatives must be a list of corpus ids", 3)
    bad([{"query_id": "q0", "negatives": []}], r"no training query of .* \(train\) has a hard negative")
    # a query the miner left without negatives draws random documents it has no relevance for
    mined.write_text("".join(json.dumps(x) + "\n" for x in ok + [{"query_id": "q2", "negatives": []}]))
    records = read_beir_training(beir, "train", hard_negatives=mined, num_negatives=2)
    drawn = {t for e in range(30) for t in records.record_at(2, e, 0)["text_n"]}
    # d4's text comes back as d8 (a copy nobody judged; the loss masks it by its hash), d5 and d6 never
    assert len(drawn) > 3 and not drawn & {joined("d5"), joined("d6")}
    with pytest.raises(ValueError, match="needs a file of mined hard negatives"):
        read_beir_training(beir, "train", num_negatives=1)


def test_batches_carry_positive_slots_and_relevant_sets(beir, tmp_path, minilm):
    mined = tmp_path / "neg.jsonl"
    write_hard_negatives(mined, ["q0", "q1", "q2"], [["d9", "d7"], ["d9", "d2"], ["d0", "d9"]])
    records = read_beir_training(beir, "train", positives=2, hard_negatives=mined, num_negatives=1)
    one_host = grain.sharding.ShardOptions(shard_index=0, shard_count=1)
    it = P.train_pipeline(records, minilm.tokenizer, global_batch_size=3, seed=5, shard_options=one_host)
    batch = next(it)
    assert batch.b.ids.shape[:2] == (3, 2) and batch.n.ids.shape[:2] == (3, 1)
    assert batch.relevant.shape == (3, 8)  # widths are powers of two, at least 8
    for row, i in enumerate(batch.index):
        record = records.record_at(i, 0, 5)
        want_b = [0 if t is None else blake_int32(t) for t in record["text_b"]]
        np.testing.assert_array_equal(batch.b.hashes[row], want_b)
        if record["text_b"][1] is None:  # an empty slot: just the special tokens of an empty text
            assert batch.b.mask[row, 1].sum() == len(minilm.tokenizer.encode([""])[0].ids)
        rel = [blake_int32(joined(d)) for q, d, g in QRELS if q == records.query_ids[i] and g > 0]
        assert sorted(batch.relevant[row][batch.relevant[row] != 0]) == sorted(rel)
    sig = batch.shape_signature()
    assert sig[-1] == 8
    wider = batch.padded_to(np.concatenate([sig[:-1], [16]]), minilm.tokenizer.pad_token_id)
    assert wider.relevant.shape == (3, 16) and (wider.relevant[:, 8:] == 0).all()


@pytest.mark.parametrize("stop", [2, 4])  # mid first epoch, mid second (3 batches an epoch)
def test_a_resumed_pipeline_draws_what_the_straight_one_drew(beir, minilm, stop):
    records = read_beir_training(beir, "train")
    one_host = grain.sharding.ShardOptions(shard_index=0, shard_count=1)

    def run():
        return P.train_pipeline(records, minilm.tokenizer, global_batch_size=1, seed=3, shard_options=one_host,
                                packing=P.Packing(length=32))

    straight = run()
    want = [next(straight) for _ in range(9)]
    first = run()
    for _ in range(stop):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = run()
    resumed.set_state(state)
    for w in want[stop:]:
        got = next(resumed)
        np.testing.assert_array_equal(got.b.hashes, w.b.hashes)
        np.testing.assert_array_equal(got.packed.ids, w.packed.ids)
    # epochs draw anew: over 3 epochs q2 (3 positives) is not stuck on one
    q2 = [int(b.b.hashes[0]) for b in want if records.query_ids[int(b.index[0])] == "q2"]
    assert len(q2) == 3 and q2 == [blake_int32(records.record_at(2, e, 3)["text_b"]) for e in range(3)]


def test_training_order_is_what_the_pipeline_trains_on(beir, tmp_path, minilm):
    """The untokenized order another trainer is fed (benchmarks/retrieval_finetune.py): step by
    step and epoch after epoch, the records of the pipeline's global batches, whatever the host count."""
    mined = tmp_path / "neg.jsonl"
    write_hard_negatives(mined, ["q0", "q1", "q2"], [["d9", "d7"], ["d9", "d2"], ["d0", "d9"]])
    records = read_beir_training(beir, "train", hard_negatives=mined, num_negatives=1)
    order = P.training_order(records, global_batch_size=2, seed=4)
    hosts = [P.train_pipeline(records, minilm.tokenizer, global_batch_size=2, seed=4,
                              shard_options=grain.sharding.ShardOptions(shard_index=h, shard_count=2)) for h in (0, 1)]
    for step in range(4):  # one batch an epoch: 4 epochs
        items = order[step]
        rows = [next(h) for h in hosts]
        assert [i for i, _ in items] == [int(r.index[0]) for r in rows]
        for (i, record), row in zip(items, rows):
            assert record == records.record_at(i, step, 4)
            assert int(row.b.hashes[0]) == blake_int32(record["text_b"])
            assert int(row.n.hashes[0, 0]) == blake_int32(record["text_n"][0])


def test_mine_beir_never_returns_a_judged_relevant_document(beir, tiny_model, tmp_path):
    import embedjax
    from embedjax.mine import mine_beir

    enc = embedjax.load_pretrained(tiny_model)
    stats = {}
    # the window and the count take the whole corpus: everything not excluded comes back
    query_ids, negatives, scores = mine_beir(enc, beir, "train", num_negatives=10, rank_window=(0, 10),
                                             batch_size=4, stats=stats)
    assert query_ids == ["q0", "q1", "q2"]
    relevant = {q: {d for qq, d, g in QRELS if qq == q and g > 0} for q in query_ids}
    relevant["q2"].add("d8")  # the same text as d4: excluded with it
    for q, negs, s in zip(query_ids, negatives, scores):
        assert set(negs) == set(DOCS) - relevant[q]  # d2 (judged 0) and d7 may be negatives
        assert s == sorted(s, reverse=True)
    assert stats["short"] == 3 and stats["corpus"] == len(DOCS)

    out = tmp_path / "mined.jsonl"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_model), "--beir", str(beir),
                           "--output", str(out), "--num_negatives", "2", "--range_max", "5"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 queries" in proc.stdout and "6 negatives written (3 lines" in proc.stdout, proc.stdout
    records = read_beir_training(beir, "train", hard_negatives=out, num_negatives=2)  # what training reads
    assert len(records) == 3
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_model), "--beir", str(beir),
                           "--pairs", str(out), "--output", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "give one of --pairs" in proc.stderr, proc.stderr[-2000:]


def test_train_script_on_two_beir_sources_with_a_guide(beir, tiny_model, tmp_path):
    """scripts/train.py end to end: a mixture of two BEIR sources (two positive slots; mined negatives
    with the initial model as guide), evaluated by retrieval, the run's frozen model loaded once."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_train import run_train

    mined = tmp_path / "neg.jsonl"
    write_hard_negatives(mined, ["q0", "q1", "q2"], [["d9", "d7"], ["d9", "d2"], ["d0", "d9"]])
    mixture = {"slots": {"kind": "beir", "train": str(beir), "positives": 2, "task": "find the abstract",
                         "prompts": {"query": "Instruct: {task}\nQuery: "}},
               "mined": {"kind": "beir", "train": str(beir), "hard_negatives": str(mined), "num_negatives": 1,
                         "objective": {"guide": "initial", "loss_kwargs": {"fn_margin": 0.1}}}}
    overrides = {"model": tiny_model, "num_steps": 4, "batch_size": 2, "log_every": 1, "eval_every": 2,
                 "checkpoint.every": 2,
                 "objective.loss": "infonce", "objective.loss_kwargs": "{}", "data.mixture": repr(mixture),
                 "data.mixture_mode": "round_robin",
                 "evals": repr({"beir": {"type": "retrieval", "path": str(beir), "split": "train"}}),
                 "select_metric": "beir/ndcg@10"}
    proc = run_train(tmp_path / "wd", overrides, devices=1)
    rows = [json.loads(x) for x in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: (k.split("/", 1)[1], v) for r in rows for k, v in r.items() if k.startswith("loss/")}
    assert [losses[s][0] for s in range(1, 5)] == ["mined", "slots", "mined", "slots"], proc.stderr[-2000:]
    assert all(np.isfinite(v) for _, v in losses.values())
    summary = json.loads((tmp_path / "wd" / "summary.json").read_text())
    assert 0 <= summary["after"]["beir/ndcg@10"] <= 1
    # the source's own instruction, its {task} filled, is recorded with the model by name
    exported = json.loads((tmp_path / "wd" / "config_sentence_transformers.json").read_text())
    assert exported["prompts"] == {"slots-query": "Instruct: find the abstract\nQuery: "}


def test_source_prompts_and_what_is_exported(beir, minilm):
    from embedjax.train import tasks
    from embedjax.train.config import DataConfig, SourceConfig

    run = {"query": "Instruct: {task}\nQuery: ", "document": "passage: "}
    ir = DataConfig(kind="beir", train=str(beir), task="retrieve abstracts")
    sts = DataConfig(kind="stsb", train="x", prompts={"query": "sts: ", "document": "sts: "})
    assert tasks.source_prompts(run, ir) == {"query": "Instruct: retrieve abstracts\nQuery: ", "document": "passage: "}
    assert tasks.source_prompts(run, sts) == {"query": "sts: ", "document": "sts: "}
    with pytest.raises(ValueError, match=r"has a \{task\} placeholder: set data.task"):
        tasks.source_prompts(run, DataConfig(kind="beir", train=str(beir)))
    specs = {n: SourceConfig(n, d, {}) for n, d in (("scifact", ir), ("stsb", sts))}
    assert tasks.exported_prompts(run, specs) == {
        "document": "passage: ", "scifact-query": "Instruct: retrieve abstracts\nQuery: ",
        "scifact-document": "passage: ", "stsb-query": "sts: ", "stsb-document": "sts: "}

    # the source's batches carry its prompt: query tokens start with the instruction's
    from configs.base import base_config
    from embedjax.train.config import parse_sources

    c = base_config()
    c.objective.loss = "infonce"
    c.data.kind, c.data.train, c.data.task = "beir", str(beir), "retrieve abstracts"
    (spec,) = parse_sources(c.data, c.objective).values()
    source = tasks.build_source(spec, minilm, teacher=None, batch_size=3, seed=0, prompts=run)
    batch = next(source.iterator)
    ids = batch.packed.ids[batch.packed.segments == batch.a.text_index[0] + 1]
    text = minilm.tokenizer.backend.decode(ids.tolist(), skip_special_tokens=True)
    assert text.startswith("instruct : retrieve abstracts query :"), text


def test_data_section_of_a_beir_source(beir, tmp_path):
    from configs.base import base_config
    from embedjax.train import sources
    from embedjax.train.config import DataConfig

    c = base_config()
    c.data.kind, c.data.train = "beir", str(beir)
    c.data.every_positive = True
    records = sources.train_source(DataConfig.from_config(c.data))
    assert records.slots == 3 and records.query_ids == ("q0", "q1", "q2")
    c.data.every_positive, c.data.num_negatives = False, 2
    with pytest.raises(ValueError, match="data.num_negatives=2 needs data.hard_negatives"):
        DataConfig.from_config(c.data)
    c.data.num_negatives, c.data.positives = 0, 0
    with pytest.raises(ValueError, match="data.positives must be an integer >= 1"):
        DataConfig.from_config(c.data)
