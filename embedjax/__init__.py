"""embedjax: text-embedding models in JAX.

Public API::

    enc = embedjax.load_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    vectors = enc.encode(["a sentence", "another one"])          # (2, 384) float32
    z = embedjax.embed(enc.params, enc.cfg, ids, mask)            # the pure function
    loss = embedjax.losses.infonce(za, zb)                        # pure losses of embeddings
    s = embedjax.similarity.matrix(za, zb)                        # the shared similarity core
"""

from embedjax import losses, pooling, similarity
from embedjax.embed import embed
from embedjax.encoders.bert import BertConfig
from embedjax.export import save_pretrained
from embedjax.model import Encoder, load_pretrained

__version__ = "0.1.0"

__all__ = ["BertConfig", "Encoder", "embed", "load_pretrained", "losses", "pooling", "save_pretrained", "similarity",
           "__version__"]
