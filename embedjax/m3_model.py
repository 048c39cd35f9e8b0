"""``load_m3`` and ``M3Encoder``: BGE-M3's three heads on one backbone (embedjax/m3.py), loaded from
FlagEmbedding's layout, encoded, and seen as three retrievers.

BGE-M3's checkpoint (``BAAI/bge-m3``) is a transformers model (XLM-RoBERTa there; any BERT-family
backbone here) plus ``sparse_linear.pt`` (``Linear(H, 1)``) and ``colbert_linear.pt``
(``Linear(H, H)``), torch state dicts: reading them needs torch. ``save_m3`` writes that layout
(the ``.pt`` files when torch is installed) and ``m3_heads.safetensors`` with the same weights,
which ``load_m3`` prefers (no torch needed).

``M3Encoder.dense()``, ``.lexical()`` and ``.multi_vector()`` are each head as a retriever the
evaluators take (``RetrievalEvaluator``, ``SparseRetrievalEvaluator``, ``LateRetrievalEvaluator``),
and ``embedjax.eval.fusion.FusedRetrievalEvaluator`` fuses them as BGE-M3 does. The multi-vector
view's query vectors are divided by the query's token count, so the MaxSim sums the late
evaluators compute are BGE-M3's means over query tokens (the same ranking; the fusion's scale).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from embedjax import hf, m3, tokenize
from embedjax.encoders.statedict import CheckpointError
from embedjax.model import Encoder, _check_texts

HEADS_FILE = "m3_heads.safetensors"
TORCH_FILES = {"sparse": "sparse_linear.pt", "colbert": "colbert_linear.pt"}


HEADS_KEY = "m3_heads"  # params key of the lexical and multi-vector heads (m3.init_heads' tree)


@dataclasses.dataclass
class M3Encoder:
    """A loaded three-head model: ``params`` (the backbone's tree plus ``params["m3_heads"]``), the
    backbone's static config, its tokenizer, and the special ids the lexical head zeroes. The dense
    head is the backbone's [CLS] state, normalised."""

    params: Any
    cfg: Any
    tokenizer: tokenize.Tokenizer
    special_ids: tuple
    max_length: int = 512
    path: Path | None = None
    # the last encode's (texts, options) and outputs: the lexical and multi-vector views of one
    # evaluation read the same corpus, encoded once
    _last: tuple = dataclasses.field(default=(None, None), init=False, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return int(self.params["embeddings"]["word"].shape[0])

    @property
    def encoder(self) -> Encoder:
        """The backbone as a dense ``Encoder`` ([CLS] pooled, normalised): the dense head."""
        backbone = {k: v for k, v in self.params.items() if k != HEADS_KEY}
        return Encoder(params=backbone, cfg=self.cfg, tokenizer=self.tokenizer, pooling="cls",
                       max_length=self.max_length, path=self.path, normalize=True)

    def encode(self, texts: Sequence[str], *, batch_size: int = 32, prompt: str | None = None) -> dict:
        """``{"dense": (N, H), "lexical": CSR (N, V), "tokens": [(n_i, H)]}`` float32, each text's
        multi-vector tokens without padding, in the caller's order."""
        from embedjax.sparse_index import to_csr

        texts = _check_texts(list(texts))
        key = (tuple(texts), batch_size, prompt)
        if self._last[0] == key:
            return self._last[1]
        tok = self.tokenizer
        backbone = {k: v for k, v in self.params.items() if k != HEADS_KEY}
        encodings = tok.encode([(prompt or "") + t for t in texts])
        dense, lexical, tokens = [], [], []
        order = np.argsort([-len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tok.pad([encodings[i] for i in chunk], tokenize.rows_for(len(chunk), batch_size))
            d, lx, tv = _outputs_jit(backbone, self.cfg, self.params[HEADS_KEY], batch.input_ids,
                                     batch.attention_mask, special_ids=self.special_ids)
            d, lx, tv = np.asarray(d), np.asarray(lx), np.asarray(tv)
            lexical.append(to_csr(lx[: len(chunk)]))  # sparse at once: never an (N, V) dense block
            for r, i in enumerate(chunk):
                dense.append((i, d[r]))
                tokens.append((i, tv[r, : len(encodings[i].ids) - 1]))
        by_text = lambda pairs: [v for _, v in sorted(pairs, key=lambda p: p[0])]  # noqa: E731
        if not dense:
            return {"dense": np.zeros((0, self.cfg.hidden_size), np.float32),
                    "lexical": sp.csr_matrix((0, self.vocab_size), dtype=np.float32), "tokens": []}
        out = {"dense": np.stack(by_text(dense)), "tokens": by_text(tokens),
               "lexical": sp.vstack(lexical, format="csr")[np.argsort(order, kind="stable")]}
        self._last = (key, out)
        return out

    def dense(self) -> Encoder:
        """The dense head: the backbone, [CLS] pooled and normalised (any dense evaluator takes it)."""
        return self.encoder

    def lexical(self) -> M3Lexical:
        """The lexical head as a sparse retriever (``SparseRetrievalEvaluator`` takes it)."""
        return M3Lexical(self)

    def multi_vector(self) -> M3MultiVector:
        """The multi-vector head as a late-interaction retriever (``LateRetrievalEvaluator`` takes it)."""
        return M3MultiVector(self)


@dataclasses.dataclass
class M3Lexical:
    """An ``M3Encoder``'s lexical head, with a ``SparseEncoder``'s ``encode``."""

    model: M3Encoder
    retrieval_kind = "sparse"
    prompts: dict = dataclasses.field(default_factory=dict)

    def encode(self, texts, *, batch_size: int = 32, top_k: int | None = None, prompt: str | None = None,
               **_) -> sp.csr_matrix:
        from embedjax import sparse
        from embedjax.sparse_index import to_csr

        out = self.model.encode(texts, batch_size=batch_size, prompt=prompt)["lexical"]
        return out if not top_k else to_csr(np.asarray(sparse.top_k(out.toarray(), top_k)))


@dataclasses.dataclass
class M3MultiVector:
    """An ``M3Encoder``'s multi-vector head, with a ``ColbertEncoder``'s ``encode_queries`` /
    ``encode_documents`` (queries scaled by 1 / their token count: MaxSim sums are BGE-M3's means)."""

    model: M3Encoder
    retrieval_kind = "late"

    def encode_queries(self, texts, *, batch_size: int = 32, **_) -> list[np.ndarray]:
        return [t / max(len(t), 1) for t in self.model.encode(texts, batch_size=batch_size)["tokens"]]

    def encode_documents(self, texts, *, batch_size: int = 32, pool_factor: int = 1, **_) -> list[np.ndarray]:
        from embedjax import colbert

        tokens = self.model.encode(texts, batch_size=batch_size)["tokens"]
        return tokens if pool_factor == 1 else [colbert.pool_tokens(t, pool_factor, protected=0) for t in tokens]


@functools.partial(jax.jit, static_argnames=("cfg", "special_ids"))
def _outputs_jit(params, cfg, heads, input_ids, attention_mask, *, special_ids):
    return m3.outputs(params, cfg, heads, input_ids, attention_mask, special_ids=special_ids,
                      token_type_ids=jnp.zeros_like(input_ids))


def _special_ids(tokenizer: tokenize.Tokenizer, pad_token_id: int) -> tuple:
    """The ids BGE-M3's lexical head zeroes: [CLS] / <s>, [SEP] / </s>, padding and unknown."""
    backend = tokenizer.backend
    ids = {pad_token_id}
    for name in ("[CLS]", "[SEP]", "[UNK]", "<s>", "</s>", "<unk>"):
        found = backend.token_to_id(name)
        if found is not None:
            ids.add(int(found))
    return tuple(sorted(ids))


def _heads_from_torch(directory: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{directory}: BGE-M3's heads are torch files ({', '.join(TORCH_FILES.values())}); "
                              "install torch to read them (or save_m3 writes m3_heads.safetensors)") from None
    heads = {}
    for head, name in TORCH_FILES.items():
        state = torch.load(directory / name, map_location="cpu", weights_only=True)
        heads[head] = {"kernel": state["weight"].float().numpy().T.copy(), "bias": state["bias"].float().numpy()}
    return heads


def load_m3(name_or_path: str | os.PathLike, *, max_length: int | None = None, seed: int = 0) -> M3Encoder:
    """Loads a three-head model: FlagEmbedding's BGE-M3 layout (or ``save_m3``'s); a checkpoint
    without heads gets fresh ones from ``seed`` (``m3.init_heads``: a model to train)."""
    from safetensors.numpy import load_file

    from embedjax.model import load_pretrained

    directory = hf.resolve(name_or_path)
    encoder = load_pretrained(directory, pooling="cls", max_length=max_length)
    hidden = encoder.cfg.hidden_size
    if (directory / HEADS_FILE).is_file():
        flat = load_file(str(directory / HEADS_FILE))
        heads = {h: {"kernel": flat[f"{h}.kernel"], "bias": flat[f"{h}.bias"]} for h in TORCH_FILES}
    elif all((directory / name).is_file() for name in TORCH_FILES.values()):
        heads = _heads_from_torch(directory)
    else:
        heads = m3.init_heads(hidden, jax.random.key(seed))
    if heads["sparse"]["kernel"].shape != (hidden, 1) or heads["colbert"]["kernel"].shape != (hidden, hidden):
        raise CheckpointError(f"{directory}: heads of shapes {heads['sparse']['kernel'].shape} / "
                              f"{heads['colbert']['kernel'].shape}, the backbone is {hidden} wide")
    return M3Encoder(params=jax.device_put({**encoder.params, HEADS_KEY: heads}), cfg=encoder.cfg,
                     tokenizer=encoder.tokenizer, special_ids=_special_ids(encoder.tokenizer, encoder.cfg.pad_token_id),
                     max_length=encoder.max_length, path=directory)


def save_m3(model: M3Encoder, directory: str | os.PathLike, *, params=None) -> Path:
    """Writes ``model`` (or these ``params``) in BGE-M3's layout: the backbone (``save_pretrained``, [CLS]
    pooling, normalised), ``m3_heads.safetensors`` and, with torch installed, FlagEmbedding's
    ``sparse_linear.pt`` / ``colbert_linear.pt``."""
    from safetensors.numpy import save_file

    from embedjax.export import save_pretrained

    directory = Path(directory)
    params = jax.device_get(model.params if params is None else params)
    save_pretrained(dataclasses.replace(model, params=params).encoder, directory)
    heads = params[HEADS_KEY]
    save_file({f"{h}.{k}": np.ascontiguousarray(np.asarray(v, np.float32)) for h, p in heads.items() for k, v in p.items()},
              str(directory / HEADS_FILE))
    try:
        import torch
    except ImportError:
        return directory
    for head, name in TORCH_FILES.items():
        torch.save({"weight": torch.from_numpy(np.array(np.asarray(heads[head]["kernel"], np.float32).T, order="C")),
                    "bias": torch.from_numpy(np.array(heads[head]["bias"], np.float32))}, directory / name)
    return directory


def save_trained(model: M3Encoder, params, directory: str | os.PathLike) -> None:
    """A trained three-head model's export (a run's, into its workdir, local or ``gs://``): LoRA adapters
    merged into the weights, written by ``save_m3`` (``export.save_merged``)."""
    from embedjax.export import save_merged

    save_merged(save_m3, model, params, directory)

__all__ = ["HEADS_KEY", "M3Encoder", "M3Lexical", "M3MultiVector", "load_m3", "save_m3", "save_trained"]
