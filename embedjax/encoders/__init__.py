"""Pure-function transformer encoders: ``init(cfg, key)`` and ``apply(params, cfg, ...)``."""

from embedjax.encoders import bert, layers
from embedjax.encoders.bert import BertConfig

__all__ = ["bert", "layers", "BertConfig"]
