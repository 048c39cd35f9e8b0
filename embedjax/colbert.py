"""ColBERT (late interaction, arXiv:2004.12832; ColBERTv2 arXiv:2112.01488) as pure functions: the
per-token projection, the query and document inputs (marker token, query augmentation with mask
tokens, the punctuation skiplist), and token vectors; scoring is the similarity core's MaxSim
(``embedjax.similarity.maxsim_*``).

The layout follows PyLate's ``ColBERT`` (what its checkpoints hold):

* a marker token id is inserted right after ``[CLS]``: ``[Q] `` for queries, ``[D] `` for
  documents (so the tokenizer truncates at ``length - 1``);
* a query is padded to ``query_length`` with ``[MASK]`` tokens (query augmentation): they are not
  attended to (unless ``attend_to_expansion``) but their output vectors all score;
* a document keeps its real tokens except the skiplist's (punctuation), which do not score;
* every token's hidden state goes through a linear projection without bias (128 wide by
  default) and is L2-normalised, so MaxSim sums cosines.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedjax import similarity
from embedjax.encoders import registry

DEFAULT_DIM = 128
SKIPLIST_WORDS = tuple(string.punctuation)  # PyLate's default skiplist: ASCII punctuation


def init_projection(hidden_size: int, dim: int = DEFAULT_DIM, key=None) -> dict:
    """A fresh projection ``{"kernel": (hidden_size, dim)}``, as ``torch.nn.Linear`` initialises
    one (uniform in +-1/sqrt(hidden_size)): what PyLate's Dense starts from on a plain backbone."""
    key = jax.random.key(0) if key is None else key
    bound = 1.0 / np.sqrt(hidden_size)
    return {"kernel": jax.random.uniform(key, (hidden_size, dim), jnp.float32, -bound, bound)}


def projection_from_state_dict(state: dict[str, np.ndarray]) -> dict:
    """PyLate's Dense module (``linear.weight`` (dim, hidden), no bias) as ``{"kernel": (hidden, dim)}``."""
    if "linear.weight" not in state:
        raise KeyError(f"a ColBERT projection holds 'linear.weight', found {sorted(state)}")
    if "linear.bias" in state:
        raise ValueError("this ColBERT projection has a bias; embedjax reads PyLate's bias-free Dense")
    return {"kernel": np.ascontiguousarray(np.asarray(state["linear.weight"], np.float32).T)}


def projection_to_state_dict(projection: dict) -> dict[str, np.ndarray]:
    """``projection_from_state_dict``'s inverse."""
    return {"linear.weight": np.ascontiguousarray(np.asarray(projection["kernel"], np.float32).T)}


def token_vectors(params, cfg, projection: dict, input_ids, attention_mask, *, token_type_ids=None,
                  dropout_key=None, remat: bool | str = False, unroll: bool | int = True):
    """Token ids (B, T) -> unit token vectors (B, T, dim) float32: the backbone's last hidden
    states, projected and L2-normalised (padding positions too: masks decide what scores)."""
    hidden = registry.of(cfg).apply(params, cfg, input_ids, attention_mask, token_type_ids=token_type_ids,
                                    all_layers=False, dropout_key=dropout_key, remat=remat, unroll=unroll)
    return similarity.l2_normalize(hidden.astype(jnp.float32) @ projection["kernel"])


def insert_marker(ids: Sequence[int], marker_id: int | None) -> list[int]:
    """``ids`` with the query / document marker right after the first ([CLS]) token; unchanged
    when ``marker_id`` is None (a model without markers)."""
    ids = list(ids)
    return ids if marker_id is None else ids[:1] + [int(marker_id)] + ids[1:]


def query_inputs(ids: Sequence[int], query_length: int, *, marker_id: int | None, mask_token_id: int,
                 attend_to_expansion: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One query's ``(input_ids, attention_mask, score_mask)``, each (query_length,): its tokens
    (already truncated to ``query_length - 1`` with the marker, ``query_length`` without), padded
    with ``mask_token_id`` (query augmentation), the marker inserted. The mask tokens are attended
    to only with ``attend_to_expansion``; every position scores."""
    room = query_length - (marker_id is not None)
    if len(ids) > room:
        raise ValueError(f"a query of {len(ids)} tokens does not fit query_length={query_length} "
                         f"({room} tokens before the marker): truncate it when tokenizing")
    padded = list(ids) + [int(mask_token_id)] * (room - len(ids))
    attended = [1] * len(ids) + [int(attend_to_expansion)] * (room - len(ids))
    out_ids = np.asarray(insert_marker(padded, marker_id), np.int32)
    mask = np.asarray(attended[:1] + [1] + attended[1:] if marker_id is not None else attended, np.int32)
    return out_ids, mask, np.ones(query_length, np.int32)


def document_inputs(ids: Sequence[int], *, marker_id: int | None, skiplist_ids: Sequence[int] = ()
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One document's ``(input_ids, attention_mask, score_mask)``: its tokens with the marker
    inserted, all attended to; the skiplist's tokens do not score."""
    out_ids = np.asarray(insert_marker(ids, marker_id), np.int32)
    attention = np.ones(len(out_ids), np.int32)
    return out_ids, attention, skiplist_mask(out_ids, attention, skiplist_ids)


def skiplist_mask(input_ids, attention_mask, skiplist_ids: Sequence[int]):
    """``attention_mask`` with the positions holding a skiplist id set to 0 (NumPy or jnp arrays)."""
    xp = jnp if isinstance(input_ids, jax.Array) else np
    if len(skiplist_ids) == 0:
        return attention_mask
    skipped = xp.isin(input_ids, xp.asarray(list(skiplist_ids)))
    return xp.where(skipped, 0, attention_mask).astype(attention_mask.dtype)


def skiplist_ids(vocab: dict[str, int], words: Sequence[str] = SKIPLIST_WORDS) -> tuple[int, ...]:
    """The token ids of the skiplist's words that the vocabulary holds (PyLate's
    ``convert_tokens_to_ids`` of each; a word it lacks is dropped rather than mapped to [UNK])."""
    return tuple(sorted({vocab[w] for w in words if w in vocab}))


def pool_tokens(vectors: np.ndarray, pool_factor: int, *, protected: int = 1) -> np.ndarray:
    """A document's token vectors ``(n, dim)`` shrunk about ``pool_factor``-fold for the index, as
    PyLate's ``pool_embeddings_hierarchical`` (arXiv:2409.14683): the first ``protected`` tokens
    (the [CLS]) are kept; the others are clustered (Ward linkage on cosine distance, cut at
    ``(n - protected) // pool_factor`` clusters) and each cluster becomes its mean vector, in
    cluster-label order. Unchanged when that would not shrink it."""
    from scipy.cluster import hierarchy

    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    vectors = np.asarray(vectors, np.float32)
    kept, rest = vectors[:protected], vectors[protected:]
    clusters = max(len(rest) // pool_factor, 1)
    if clusters >= len(rest):
        return vectors
    distance = 1.0 - rest @ rest.T
    labels = hierarchy.fcluster(hierarchy.linkage(distance[np.triu_indices(len(rest), k=1)], method="ward"),
                                t=clusters, criterion="maxclust") - 1
    used = np.unique(labels)  # fcluster may return fewer clusters than asked
    means = np.stack([rest[labels == c].mean(axis=0) for c in used])
    return np.concatenate([kept, means])


@dataclasses.dataclass(frozen=True)
class ColbertFormat:
    """Training batches in ColBERT's layout, made on the host from padded batches
    (``embedjax.data.batch.Batch``): side ``a`` holds queries (``query_inputs``: the marker,
    expansion to ``query_length``), sides ``b`` and ``n`` documents (``document_inputs``: the
    marker, the skiplist). Each side's ``pool`` becomes its score mask (1 on the tokens whose
    vectors score), which the ColBERT objective reads.

    The batches come tokenized at the documents' length; a longer query is cut to
    ``query_length`` tokens keeping its last token ([SEP]), as the query tokenizer's own
    truncation does (``ColbertEncoder.encode_queries``).
    """

    query_length: int
    query_marker_id: int | None
    document_marker_id: int | None
    mask_token_id: int
    skiplist_ids: tuple = ()
    attend_to_expansion: bool = False
    do_query_expansion: bool = True
    pad_token_id: int = 0

    def __call__(self, batch):
        sides = {"a": self._side(batch.a, query=True)}
        for name in ("b", "n"):
            if getattr(batch, name) is not None:
                sides[name] = self._side(getattr(batch, name), query=False)
        return dataclasses.replace(batch, **sides)

    def query_row(self, ids: Sequence[int]):
        """One query's ``(input_ids, attention_mask, score_mask)``."""
        room = self.query_length - (self.query_marker_id is not None)
        ids = list(ids) if len(ids) <= room else list(ids[:room - 1]) + [ids[-1]]
        if self.do_query_expansion:
            return query_inputs(ids, self.query_length, marker_id=self.query_marker_id,
                                mask_token_id=self.mask_token_id, attend_to_expansion=self.attend_to_expansion)
        out_ids, attention, _ = document_inputs(ids, marker_id=self.query_marker_id)
        return out_ids, attention, attention

    def document_row(self, ids: Sequence[int]):
        """One document's ``(input_ids, attention_mask, score_mask)``."""
        return document_inputs(ids, marker_id=self.document_marker_id, skiplist_ids=self.skiplist_ids)

    def _side(self, side, *, query: bool):
        if side.packed:
            raise ValueError("a ColBERT run reads padded batches: set data.pack_length=0")
        ids, mask = np.asarray(side.ids), np.asarray(side.mask)
        lead, width = ids.shape[:-1], ids.shape[-1]
        rows = [(self.query_row if query else self.document_row)(r[m.astype(bool)])
                for r, m in zip(ids.reshape(-1, width), mask.reshape(-1, width))]
        out_width = self.query_length if query and self.do_query_expansion else width + (
            (self.query_marker_id if query else self.document_marker_id) is not None)
        out = [np.zeros((len(rows), out_width), np.int32) for _ in range(3)]
        out[0][:] = self.pad_token_id
        for i, row in enumerate(rows):
            for buffer, values in zip(out, row):
                buffer[i, :len(values)] = values
        new_ids, attention, score = (x.reshape(*lead, out_width) for x in out)
        return dataclasses.replace(side, ids=new_ids, mask=attention, types=np.zeros_like(new_ids), pool=score)
