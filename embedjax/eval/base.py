"""The one evaluator interface, and evaluation's encoding on every device.

Every evaluator (``sts``, ``retrieval``, ``reranking``, ``pair_classification``) is a small
dataclass with

* ``name``: the prefix of every key it reports, e.g. ``"stsb_dev"``;
* ``main_metric``: its headline key without the prefix, e.g. ``"cosine_spearman"``, ``"ndcg@10"``;
* ``embed(encoder, *, num_layers=None) -> Embeddings``: every text it needs, embedded once
  (a dict of named ``(N, D)`` arrays, e.g. ``{"a": ..., "b": ...}`` or ``{"queries": ...,
  "corpus": ...}``), through ``encode`` below;
* ``score(embeddings, *, reference=None) -> dict[str, float]``: the metrics of those
  embeddings, keys without the prefix. Arrays may be float32, int8 (scored as floats) or
  packed sign bits (``uint8``, scored by negative Hamming distance: see ``metrics_for``);
  ``reference`` holds the float32 embeddings when the arrays are quantised (for rescoring);
* ``run(encoder)``: yields ``(f"{name}/{key}", value)``: ``prefixed(self.name, self.score(self.embed(encoder)))``.

Splitting ``embed`` from ``score`` is what lets the wrappers reuse any evaluator:
``grid`` embeds once per depth and scores every Matryoshka width of it, ``quantized``
scores int8 and binary versions of the same embeddings next to float32.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np

Embeddings = dict[str, np.ndarray]


class Evaluator(Protocol):
    name: str
    main_metric: str

    def embed(self, encoder, *, num_layers: int | None = None) -> Embeddings: ...

    def score(self, embeddings: Embeddings, *, reference: Embeddings | None = None) -> dict[str, float]: ...

    def run(self, encoder) -> Iterator[tuple[str, float]]: ...


def prefixed(name: str, scores: Mapping[str, float]) -> Iterator[tuple[str, float]]:
    """``(f"{name}/{key}", float(value))`` for every score."""
    for key, value in scores.items():
        yield f"{name}/{key}", float(value)


def is_binary(x: np.ndarray) -> bool:
    """Packed sign bits (``embedjax.eval.quantize.binary``): uint8, 8 dimensions per byte."""
    return np.asarray(x).dtype == np.uint8


def metrics_for(x: np.ndarray, metrics: Sequence[str]) -> tuple[str, ...]:
    """The similarities to score ``x`` with: ``("hamming",)`` for packed bits, else ``metrics``."""
    return ("hamming",) if is_binary(x) else tuple(metrics)


def as_scorable(x: np.ndarray) -> np.ndarray:
    """What the similarity core takes: packed bits stay uint8, anything else becomes float32."""
    x = np.asarray(x)
    return x if is_binary(x) else x.astype(np.float32)


def encode(encoder, texts: Sequence[str], *, batch_size: int = 128, prompt: str | None = None,
           num_layers: int | None = None, mesh=None, normalize: bool | None = None) -> np.ndarray:
    """Evaluation's encoding: float32 ``(N, D)`` in the order of ``texts``.

    Normalised as the checkpoint says (``Encoder.normalize``, as ``SentenceTransformer.encode``
    does), so scores match sentence-transformers' evaluators; ``normalize`` overrides it. Each
    batch is split over every local device (``mesh``, default ``embedjax.sharding.local_mesh()``);
    on several hosts each host encodes a strided share of the texts and the shares are gathered,
    so every host returns the same full array.
    """
    from embedjax import sharding

    mesh = sharding.local_mesh() if mesh is None else mesh
    kw = dict(batch_size=batch_size, prompt=prompt, num_layers=num_layers, mesh=mesh, normalize=normalize)
    return on_every_host(lambda share: encoder.encode(share, **kw), list(texts), filler="")


def on_every_host(compute, items: list, *, filler) -> np.ndarray:
    """``compute(items)``, split over the hosts: each computes a strided share (padded with
    ``filler`` to equal shapes for the allgather) and every host returns the full array, rows in
    the order of ``items``. One host: ``compute(items)``."""
    import jax

    from embedjax import distributed

    n_proc, me = jax.process_count(), jax.process_index()
    if n_proc == 1:
        return compute(items)
    share = items[me::n_proc]
    per_host = -(-len(items) // n_proc)
    gathered = distributed.allgather(compute(share + [filler] * (per_host - len(share))))  # (n_proc, per_host, ...)
    out = np.empty((len(items), *gathered.shape[2:]), gathered.dtype)
    for p in range(n_proc):
        out[p::n_proc] = gathered[p, : len(items[p::n_proc])]
    return out
