"""Tiny random checkpoints: a decoder (or encoder) of any registered family, written as a
Hugging Face directory (``config.json``, ``model.safetensors``, ``tokenizer.json``) from
embedjax's own ``init``, with a small byte-level BPE tokenizer trained on given texts.

Smoke configs and tests train on them in seconds, on a machine without the hub; the
directory loads in ``embedjax.load_pretrained`` and in transformers' ``AutoModel`` alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import jax
import numpy as np
from safetensors.numpy import save_file

from embedjax.encoders import registry

EOS, PAD, BOS = "<|endoftext|>", "<|pad|>", "<s>"

# Hugging Face config.json fields of each family at a tiny size (hidden 64, 2 layers, 4 query
# heads sharing 2 key/value heads): what the real checkpoints' config.json files carry.
_FAMILIES = {
    "qwen3": {"architectures": ["Qwen3Model"], "head_dim": 16, "attention_bias": False, "hidden_act": "silu",
              "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "qwen2": {"architectures": ["Qwen2Model"], "hidden_act": "silu", "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
    "llama": {"architectures": ["LlamaModel"], "hidden_act": "silu", "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "attention_bias": False, "mlp_bias": False},
    "mistral": {"architectures": ["MistralModel"], "hidden_act": "silu", "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                "sliding_window": None},
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, *, add_bos: bool = False):
    """A byte-level BPE ``tokenizers.Tokenizer`` learnt from ``texts`` (deterministic), with
    ``<|endoftext|>`` (EOS) and ``<|pad|>``; a ``<s>`` prepended to every text when ``add_bos``
    (Llama-style). No EOS is appended: like Qwen's and Llama's tokenizers, so last-token pooling
    appends one itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [EOS, PAD] + ([BOS] if add_bos else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def write_random_checkpoint(directory: str | Path, model_type: str = "qwen3", *, texts: Iterable[str],
                            vocab_size: int = 512, seed: int = 0, lm_head: bool = False, **overrides) -> Path:
    """Writes a random ``model_type`` checkpoint (tiny by default; ``overrides`` are config.json
    fields, e.g. ``num_hidden_layers=4``) with a tokenizer learnt from ``texts``; returns the directory.
    ``lm_head``: a ``*ForCausalLM`` checkpoint with its own random LM head (``lm_head.weight``,
    ``tie_word_embeddings`` false) instead of one tied to the embedding.
    """
    if model_type not in _FAMILIES:
        raise ValueError(f"no tiny recipe for model_type={model_type!r}; choose one of {sorted(_FAMILIES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    add_bos = model_type in ("llama", "mistral")
    tok = train_tokenizer(texts, vocab_size, add_bos=add_bos)
    tok.save(str(directory / "tokenizer.json"))
    ids = {name: tok.token_to_id(name) for name in (EOS, PAD, BOS)}
    hf = {"model_type": model_type, "vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
          "tie_word_embeddings": True, "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
          "bos_token_id": ids[BOS], "torch_dtype": "float32", **_FAMILIES[model_type], **overrides}
    if lm_head:
        hf["tie_word_embeddings"] = False
        hf["architectures"] = [hf["architectures"][0].replace("Model", "ForCausalLM")]
    cfg = registry.config_from_hf(hf)
    backbone = registry.of(cfg)
    params = backbone.init(cfg, jax.random.key(seed))
    state = backbone.state_dict_from_params(params, cfg)
    if lm_head:  # transformers' *ForCausalLM layout: the backbone under "model.", the head beside it
        state = {f"model.{k}": v for k, v in state.items()}
        shape = (cfg.vocab_size, cfg.hidden_size)
        state["lm_head.weight"] = np.asarray(0.02 * jax.random.normal(jax.random.key(seed + 1), shape), np.float32)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    causal_lm = {"architectures": hf["architectures"]} if lm_head else {}  # to_hf names the base model
    (directory / "config.json").write_text(json.dumps({**hf, **cfg.to_hf(), **causal_lm}, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "pad_token": PAD, "bos_token": BOS if add_bos else None,
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}, indent=2) + "\n")
    return directory
