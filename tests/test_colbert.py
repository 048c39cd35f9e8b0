"""ColBERT's pure functions (embedjax/colbert.py): query augmentation, markers and the skiplist
against hand-built expectations in PyLate's layout, and token vectors (projected, normalised)
against transformers' BertModel, scored by MaxSim as a NumPy loop."""

import numpy as np
import pytest
import torch

from embedjax import colbert, similarity

pytestmark = pytest.mark.fast_compile  # checks logic, not speed (conftest.py)

CLS, SEP, MASK, Q, D = 101, 102, 103, 1, 2


def test_query_inputs_pad_with_mask_tokens_after_the_marker():
    ids, attention, score = colbert.query_inputs([CLS, 7, 8, SEP], 8, marker_id=Q, mask_token_id=MASK)
    assert ids.tolist() == [CLS, Q, 7, 8, SEP, MASK, MASK, MASK]
    assert attention.tolist() == [1, 1, 1, 1, 1, 0, 0, 0] and score.tolist() == [1] * 8
    _, attention, _ = colbert.query_inputs([CLS, 7, SEP], 5, marker_id=Q, mask_token_id=MASK, attend_to_expansion=True)
    assert attention.tolist() == [1] * 5
    ids, attention, _ = colbert.query_inputs([CLS, 7, SEP], 5, marker_id=None, mask_token_id=MASK)
    assert ids.tolist() == [CLS, 7, SEP, MASK, MASK] and attention.tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="does not fit query_length=4"):
        colbert.query_inputs([CLS, 7, 8, SEP], 4, marker_id=Q, mask_token_id=MASK)


def test_document_inputs_insert_the_marker_and_skip_punctuation(minilm_path):
    import json

    vocab = json.loads((minilm_path / "tokenizer.json").read_text())["model"]["vocab"]
    skip = colbert.skiplist_ids(vocab)
    assert len(skip) == len(colbert.SKIPLIST_WORDS) and vocab["."] in skip and vocab["the"] not in skip
    ids, attention, score = colbert.document_inputs([CLS, vocab["the"], vocab["."], SEP], marker_id=D,
                                                    skiplist_ids=skip)
    assert ids.tolist() == [CLS, D, vocab["the"], vocab["."], SEP]
    assert attention.tolist() == [1] * 5 and score.tolist() == [1, 1, 1, 0, 1]
    assert colbert.skiplist_ids({"a": 5, ".": 9}) == (9,)  # words the vocabulary lacks are dropped


def test_token_vectors_equal_transformers_projected_and_normalised(tiny_masked_lm):
    import transformers

    from embedjax import hf

    params, cfg, _ = hf.load_checkpoint(tiny_masked_lm)
    projection = colbert.init_projection(cfg.hidden_size, 16)
    queries = [colbert.query_inputs([CLS, 1000 + i, 1200 + i, SEP], 8, marker_id=Q, mask_token_id=MASK)
               for i in range(2)]
    docs = [colbert.document_inputs([CLS, *range(1500 + i, 1505 + 2 * i), 1010, SEP], marker_id=D,
                                    skiplist_ids=(1010,)) for i in range(3)]

    def stack(rows):
        width = max(len(r[0]) for r in rows)
        pad = lambda a: np.pad(a, (0, width - len(a)))  # noqa: E731
        return [np.stack([pad(r[k]) for r in rows]) for k in range(3)]

    q_ids, q_att, q_score = stack(queries)
    d_ids, d_att, d_score = stack(docs)
    ours_q = np.asarray(colbert.token_vectors(params, cfg, projection, q_ids, q_att))
    ours_d = np.asarray(colbert.token_vectors(params, cfg, projection, d_ids, d_att))
    assert ours_q.shape == (2, 8, 16)
    np.testing.assert_allclose(np.linalg.norm(ours_q, axis=-1), 1.0, rtol=1e-5)

    bert = transformers.BertModel.from_pretrained(tiny_masked_lm, add_pooling_layer=False).eval()
    kernel = torch.from_numpy(np.asarray(projection["kernel"]))

    def reference(ids, att):
        with torch.no_grad():
            h = bert(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(att).long()).last_hidden_state
        return torch.nn.functional.normalize(h @ kernel, dim=-1).numpy()

    ref_q, ref_d = reference(q_ids, q_att), reference(d_ids, d_att)
    np.testing.assert_allclose(ours_q, ref_q, atol=1e-5)  # mask-token outputs too: they score
    np.testing.assert_allclose(ours_d * d_att[..., None], ref_d * d_att[..., None], atol=1e-5)

    # MaxSim of the reference vectors, a NumPy loop: every query token, the best kept document token
    want = np.array([[sum(max(float(ref_q[i, a] @ ref_d[j, b]) for b in range(d_ids.shape[1]) if d_score[j, b])
                          for a in range(8) if q_score[i, a]) for j in range(3)] for i in range(2)])
    got = np.asarray(similarity.maxsim_matrix(ours_q, ours_d, q_score, d_score))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_projection_state_dict_round_trip_and_refusals():
    projection = colbert.init_projection(32, 8)
    bound = 1 / np.sqrt(32)
    assert np.abs(np.asarray(projection["kernel"])).max() <= bound
    state = colbert.projection_to_state_dict(projection)
    assert state["linear.weight"].shape == (8, 32)
    np.testing.assert_array_equal(colbert.projection_from_state_dict(state)["kernel"], projection["kernel"])
    with pytest.raises(ValueError, match="has a bias"):
        colbert.projection_from_state_dict({**state, "linear.bias": np.zeros(8)})
    with pytest.raises(KeyError, match="linear.weight"):
        colbert.projection_from_state_dict({})
