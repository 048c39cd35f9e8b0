"""Backbones as pure functions: ``init(cfg, key)`` and ``apply(params, cfg, ids, mask, ...)``.

One ``registry.Backbone`` per Hugging Face ``model_type``: the BERT family (``bert``: BERT,
MiniLM, BGE, E5, GTE, RoBERTa, XLM-R) and decoder LLMs (``decoder``: Llama, Mistral, Qwen2,
Qwen3, Gemma 2, Gemma 3), both on the shared blocks of ``layers``, and static token tables
(``static``: model2vec, sentence-transformers' StaticEmbedding); ``registry.of(cfg)`` finds a
config's backbone, ``statedict`` does the PyTorch name bookkeeping.
"""

from embedjax.encoders import bert, layers
from embedjax.encoders.bert import BertConfig

__all__ = ["bert", "layers", "BertConfig"]
