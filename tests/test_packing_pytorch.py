"""Packed encoding against PyTorch: several texts per row give each text's hidden states as the
Hugging Face model computes them on that text alone (fully optimised, as parity tests compile)."""

import numpy as np
import pytest
from test_encoders import ARCHS, make_tiny, torch_hidden
from test_packing import fake_encodings, fake_tokenizer, packed_hidden_per_text

from embedjax import hf
from embedjax.encoders import bert


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_encoder_matches_pytorch_run_text_by_text(arch, tmp_path):
    """Several texts per row, attention masked by segment, positions restarting per text:
    every hidden state of every text equals the PyTorch model's on that text alone."""
    model = make_tiny(arch, tmp_path)
    params, cfg, _ = hf.load_checkpoint(tmp_path)
    rng = np.random.default_rng(1)
    lengths = [12, 3, 7, 1, 9, 5, 11, 2]
    encs = fake_encodings(lengths, rng, vocab=cfg.vocab_size, types=cfg.type_vocab_size > 1)
    for e in encs:
        e.ids = [max(t, cfg.pad_token_id + 1) for t in e.ids]  # real tokens are never the pad id
    packed = fake_tokenizer(cfg.pad_token_id, buckets=(8, 16, 32)).pack(encs, length=16)
    assert packed.input_ids.shape[0] < len(encs)  # really packed
    got = np.asarray(bert.apply(params, cfg, packed.input_ids, packed.segment_ids > 0,
                                token_type_ids=packed.token_type_ids, segment_ids=packed.segment_ids,
                                positions=packed.positions))
    for e, mine in zip(encs, packed_hidden_per_text(got, packed, len(encs))):
        ids = np.asarray([e.ids]); want = torch_hidden(model, ids, np.ones_like(ids), np.asarray([e.type_ids]))
        np.testing.assert_allclose(mine, want[:, 0], atol=2e-5, rtol=0)
