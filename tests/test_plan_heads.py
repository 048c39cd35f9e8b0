"""plan.step_memory on SPLADE, ColBERT and three-head configs: the run's own step from a config.json
alone, and its temporaries grow at least by the tensors those heads add (first principles: the
vocabulary-wide logits, the MaxSim block, the per-text vocabulary vectors)."""

import sys
from pathlib import Path

import jax

from embedjax.train import plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import beir_colbert, beir_m3, beir_splade  # noqa: E402

BERT = {"model_type": "bert", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64}
BATCH, TOKENS, F32 = 8, 32, 4


def _per_device() -> int:
    return BATCH // jax.device_count()


def test_a_splade_step_grows_by_its_vocabulary_wide_logits():
    config = beir_splade.get_config("smoke")
    config.batch_size, config.max_length = BATCH, TOKENS
    small, large = (plan.step_memory(config, {**BERT, "vocab_size": v}).temporaries for v in (256, 4096))
    # each side's (texts, tokens, vocabulary) float32 logits, queries and documents
    assert large - small >= 2 * _per_device() * TOKENS * (4096 - 256) * F32


def test_a_colbert_step_grows_with_its_query_length():
    sizes = {}
    for query_length in (8, 32):
        config = beir_colbert.get_config("smoke")
        config.batch_size, config.max_length = BATCH, None
        config.colbert.query_length, config.colbert.document_length = query_length, TOKENS
        sizes[query_length] = plan.step_memory(config, BERT).temporaries
    # the MaxSim block: local queries x every device's documents x query tokens x document tokens
    assert sizes[32] - sizes[8] >= _per_device() * BATCH * (32 - 8) * TOKENS * F32


def test_a_three_head_step_grows_by_its_lexical_vectors():
    sizes = {}
    for vocab in (256, 4096):
        config = beir_m3.get_config("smoke")
        config.batch_size, config.max_length = BATCH, TOKENS
        sizes[vocab] = plan.step_memory(config, {**BERT, "vocab_size": vocab}).temporaries
    # a (texts, vocabulary) lexical vector per side
    assert sizes[4096] - sizes[256] >= 2 * _per_device() * (4096 - 256) * F32
