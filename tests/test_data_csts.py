"""C-STS (embedjax/data/csts.py, embedjax/eval/csts.py): the reader's errors, the dev split by
sentence pair, the real training file, and the evaluator against sentence-transformers'
embeddings scored by scipy."""

import numpy as np
import pytest
from scipy import stats

from conftest import SHARED_DATA
from embedjax.data import DataError
from embedjax.data.csts import CSTSExample, conditioned_pairs, read_csts, split_by_pair
from embedjax.eval import suite

HEADER = "sentence1,sentence2,condition,label\n"
ROWS = [("A man rides a red bike.", "A woman rides a blue bike.", "the colour of the bike", 1.0),
        ("A man rides a red bike.", "A woman rides a blue bike.", "the vehicle", 5.0),
        ("Two dogs play in snow.", "Three dogs run on grass.", "the number of animals", 2.0),
        ("Two dogs play in snow.", "Three dogs run on grass.", "the kind of animal", 5.0),
        ("A chef cooks pasta, slowly.", "A cook boils noodles.", "the food", 4.0),
        ("A chef cooks pasta, slowly.", "A cook boils noodles.", "the speed of the action", 2.0)]


def write(path, text):
    path.write_text(text)
    return path


def csv_text(rows):
    return HEADER + "".join(f'"{a}","{b}","{c}",{y}\n' for a, b, c, y in rows)


def test_reader_reads_any_column_order_and_names_file_and_line(tmp_path):
    got = read_csts(write(tmp_path / "c.csv", csv_text(ROWS)))
    assert got[4] == CSTSExample(*ROWS[4]) and got.lines[4] == 6  # the quoted comma stays in the text
    swapped = "label,condition,sentence2,sentence1\n3,the colour,b,a\n"
    assert read_csts(write(tmp_path / "s.csv", swapped))[0] == CSTSExample("a", "b", "the colour", 3.0)
    cases = {
        "sentence1,sentence2,label\na,b,3\n": r"h\.csv:1: header .* lacks the column\(s\) \['condition'\]",
        HEADER + "a,b,c,3\na,b,c,7\n": r"h\.csv:3: label 7.0 is out of range \(expected a number in 1.0..5.0\)",
        HEADER + "a,b,c,3\na,b,c\n": r"h\.csv:3: 3 field\(s\), expected 4",
        HEADER + "a,b, ,3\n": r"h\.csv:2: empty condition",
        HEADER + "a,b,c,high\n": r"h\.csv:2: label 'high' is not a number",
    }
    for text, message in cases.items():
        with pytest.raises(DataError, match=message):
            read_csts(write(tmp_path / "h.csv", text))
    kept = read_csts(write(tmp_path / "k.csv", HEADER + "a,b,c,3\na,b,c,9\n"), skip_bad=True)
    assert len(kept) == 1 and kept.skipped == 1
    multiline = read_csts(write(tmp_path / "m.csv", HEADER + '"a\nsecond line",b,c,3\n\nd,e,f,4\n'))
    assert multiline[0].sentence1 == "a\nsecond line" and multiline.lines == [2, 5]
    with pytest.raises(DataError, match=r"q\.csv:3: malformed CSV"):
        read_csts(write(tmp_path / "q.csv", HEADER + 'a,b,c,3\n"a,b,c,3\n'))


def test_split_by_pair_keeps_both_conditions_together_on_the_real_file():
    examples = read_csts(SHARED_DATA / "csts" / "train.csv")
    assert len(examples) == 11342 and {e.label for e in examples} <= {1.0, 2.0, 3.0, 4.0, 5.0}
    train, dev = split_by_pair(examples, dev_fraction=0.1, seed=0)
    key = lambda e: frozenset((e.sentence1, e.sentence2))  # noqa: E731
    assert len(train) + len(dev) == len(examples)
    assert not {key(e) for e in train} & {key(e) for e in dev}
    assert len({key(e) for e in dev}) == int(np.ceil(0.1 * len({key(e) for e in examples})))
    assert all(sum(key(d) == key(e) for e in dev[max(0, i - 3):i + 3]) >= 2 for i, d in enumerate(dev[:50]))
    assert split_by_pair(examples, seed=0)[1] == dev and split_by_pair(examples, seed=1)[1] != dev
    with pytest.raises(ValueError, match="dev_fraction"):
        split_by_pair(examples, dev_fraction=1.0)


def test_csts_evaluator_is_spearman_of_sentence_transformers_cosines(tmp_path, minilm, st_minilm):
    path = write(tmp_path / "c.csv", csv_text(ROWS))
    template = "{condition}: {sentence}"
    evaluator = suite.build("csts", {"type": "csts", "path": str(path), "split": "all", "template": template,
                                     "metrics": ["cosine"]})
    got = dict(evaluator.run(minilm))
    pairs = conditioned_pairs(read_csts(path), template)
    assert pairs[0].text_a == "the colour of the bike: A man rides a red bike."
    a = st_minilm.encode([p.text_a for p in pairs], normalize_embeddings=True)
    b = st_minilm.encode([p.text_b for p in pairs], normalize_embeddings=True)
    cos = np.sum(a * b, axis=1)
    gold = [p.score for p in pairs]
    np.testing.assert_allclose(got["csts/cosine_spearman"], 100 * stats.spearmanr(cos, gold)[0], atol=1e-3)
    np.testing.assert_allclose(got["csts/cosine_pearson"], 100 * stats.pearsonr(cos, gold)[0], atol=1e-3)
    dev = suite.build("dev", {"type": "csts", "path": str(path), "dev_fraction": 0.3})
    assert len(dev.pairs) == 2  # one sentence pair of three, both its conditions
    with pytest.raises(ValueError, match="unknown keys"):
        suite.build("bad", {"type": "csts", "path": str(path), "format": "stsb"})
    with pytest.raises(ValueError, match="template"):
        conditioned_pairs(read_csts(path), "{sentence1}")
