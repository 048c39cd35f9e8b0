"""embedjax: text-embedding models in JAX.

Public API::

    enc = embedjax.load_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    vectors = enc.encode(["a sentence", "another one"])          # (2, 384) float32
    z = embedjax.embed(enc.params, enc.cfg, ids, mask)            # the pure function
    loss = embedjax.losses.infonce(za, zb)                        # pure losses of embeddings
    s = embedjax.similarity.matrix(za, zb)                        # the shared similarity core
    scores = embedjax.load_cross_encoder(path).predict([("a query", "a document")])  # cross-encoders
    terms = embedjax.load_sparse_encoder(path).encode(["a query"])  # SPLADE: scipy CSR (1, vocabulary)
    tokens = embedjax.load_colbert(path).encode_queries(["a query"])  # ColBERT: [(query_length, dim)]
"""

from embedjax import losses, pooling, similarity
from embedjax.colbert_model import ColbertEncoder, load_colbert, save_colbert
from embedjax.cross_model import CrossEncoder, load_cross_encoder, save_cross_encoder
from embedjax.embed import embed
from embedjax.encoders.bert import BertConfig
from embedjax.export import save_pretrained
from embedjax.model import Encoder, load_pretrained
from embedjax.sparse_model import SparseEncoder, load_sparse_encoder, save_sparse_encoder

__version__ = "0.1.0"

__all__ = ["BertConfig", "ColbertEncoder", "load_colbert", "save_colbert", "CrossEncoder", "Encoder", "embed", "load_cross_encoder", "load_pretrained", "losses", "pooling",
           "save_cross_encoder", "save_pretrained", "similarity", "SparseEncoder", "load_sparse_encoder",
           "save_sparse_encoder", "__version__"]
