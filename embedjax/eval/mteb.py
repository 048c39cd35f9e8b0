"""Run MTEB (arXiv:2210.07316) on an embedjax ``Encoder``.

``MTEBEncoder(encoder)`` implements mteb 2.x's encoder protocol
(``mteb.models.models_protocols.EncoderProtocol``: ``encode(inputs, *, task_metadata,
hf_split, hf_subset, prompt_type, **kwargs)``, ``similarity``, ``similarity_pairwise`` and
``mteb_model_meta``), so any mteb task runs on it::

    import mteb
    results = mteb.evaluate(MTEBEncoder(encoder), mteb.get_tasks(tasks=["STSBenchmark"]))

Texts are embedded on every local device through ``embedjax.eval.base.encode`` (normalised as
the checkpoint says); scores come from ``embedjax.similarity``. mteb is imported only when it is
needed (``mteb_model_meta``), so it is no dependency of embedjax: install it yourself (it is in
the test extra).

Prompts are chosen per call as sentence-transformers' mteb wrapper does (``resolve_prompt``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from embedjax import similarity
from embedjax.eval import base

SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")


def resolve_prompt(prompts: Mapping[str, str] | None, task_name: str | None, task_type: str | None,
                   prompt_type: str | None) -> str | None:
    """The prompt for one ``encode`` call, the most specific key winning:

    1. ``"{task_name}-{prompt_type}"``, 2. ``task_name``, 3. ``"{task_type}-{prompt_type}"``,
    4. ``task_type``, 5. ``prompt_type`` (``"query"`` or ``"document"``); None if no key matches.
    This is the order of mteb's ``get_prompt_name`` (used by its sentence-transformers wrapper).
    """
    if not prompts:
        return None
    keys = []
    if task_name:
        keys += [f"{task_name}-{prompt_type}"] if prompt_type else []
        keys.append(task_name)
    if task_type:
        keys += [f"{task_type}-{prompt_type}"] if prompt_type else []
        keys.append(task_type)
    if prompt_type:
        keys.append(prompt_type)
    for key in keys:
        if key in prompts:
            return prompts[key]
    return None


class MTEBEncoder:
    """An embedjax ``Encoder`` as an mteb 2.x encoder.

    Args:
      encoder: the ``embedjax.Encoder``.
      prompts: ``{key: prompt text}``, keys as in ``resolve_prompt`` (task names, task types such
        as ``"Retrieval"``, ``"query"`` / ``"document"`` and their ``-`` combinations). Default:
        the checkpoint's own ``Encoder.prompts``; a dict given here replaces them (as in
        sentence-transformers' mteb wrapper). With no matching key the encoder's own default
        applies (``Encoder.default_prompt_name``, usually none).
      batch_size: texts per forward pass; None takes mteb's ``encode_kwargs["batch_size"]``
        (32 unless set in ``mteb.evaluate(..., encode_kwargs=...)``).
      similarity_fn: how mteb scores embeddings against each other (retrieval, STS's and pair
        classification's ``similarity`` entries): one of ``SIMILARITIES``.
      name / revision: what mteb records (and caches results under); name must be ``org/model``.
        Default ``"embedjax/<checkpoint directory name>"``.
      mesh: passed to ``base.encode`` (default: every local device).
    """

    def __init__(self, encoder, *, prompts: Mapping[str, str] | None = None, batch_size: int | None = None,
                 similarity_fn: str = "cosine", name: str | None = None, revision: str | None = None, mesh=None):
        if similarity_fn not in SIMILARITIES:
            raise ValueError(f"similarity_fn must be one of {SIMILARITIES}, got {similarity_fn!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if name is None:
            path = getattr(encoder, "path", None)
            name = f"embedjax/{Path(path).name if path else 'encoder'}"
        if "/" not in name:
            raise ValueError(f"name must look like 'organization/model' (mteb's rule), got {name!r}")
        self.encoder = encoder
        self.prompts = dict(prompts) if prompts is not None else dict(getattr(encoder, "prompts", None) or {})
        self.batch_size = batch_size
        self.similarity_fn = similarity_fn
        self.name, self.revision, self.mesh = name, revision, mesh
        self._meta = None

    @property
    def mteb_model_meta(self):
        """mteb's ``ModelMeta`` for this encoder (imports mteb)."""
        if self._meta is None:
            from mteb.models.model_meta import ModelMeta, ScoringFunction

            self._meta = ModelMeta.create_empty(overwrites=dict(
                name=self.name,
                revision=self.revision,
                embed_dim=int(self.encoder.dim),
                max_tokens=int(self.encoder.max_length),
                similarity_fn_name=ScoringFunction(self.similarity_fn),
                framework=["JAX"],
                use_instructions=bool(self.prompts),
            ))
        return self._meta

    def prompt_for(self, task_metadata, prompt_type) -> str | None:
        """The prompt ``encode`` uses for this task and side (``resolve_prompt``)."""
        side = getattr(prompt_type, "value", prompt_type)
        return resolve_prompt(self.prompts, task_metadata.name, task_metadata.type, side)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        """Embeds every text of mteb's ``DataLoader`` (batches with a ``"text"`` column): ``(N, D)`` float32."""
        texts = [text for batch in inputs for text in batch["text"]]
        batch_size = self.batch_size or int(kwargs.get("batch_size") or 32)
        prompt = self.prompt_for(task_metadata, prompt_type)
        return base.encode(self.encoder, texts, batch_size=batch_size, prompt=prompt, mesh=self.mesh)

    def similarity(self, embeddings1, embeddings2) -> np.ndarray:
        """Every row of ``embeddings1`` against every row of ``embeddings2``: ``(N, M)``."""
        a, b = _matrix_2d(embeddings1), _matrix_2d(embeddings2)
        return np.array(similarity.matrix(a, b, self.similarity_fn))  # writable: mteb wraps it in torch

    def similarity_pairwise(self, embeddings1, embeddings2) -> np.ndarray:
        """Row i of ``embeddings1`` against row i of ``embeddings2``: ``(N,)``."""
        a, b = _matrix_2d(embeddings1), _matrix_2d(embeddings2)
        return np.array(similarity.pairwise(a, b, self.similarity_fn))


def _matrix_2d(x) -> np.ndarray:
    """A float32 ``(N, D)`` array from a numpy array, torch tensor or list; ``(D,)`` -> ``(1, D)``."""
    if hasattr(x, "detach"):  # a torch tensor (mteb passes some back as such)
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x, np.float32)
    return x[None] if x.ndim == 1 else x
