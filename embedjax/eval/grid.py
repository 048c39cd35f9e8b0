"""Any evaluator over a (layers x dims) grid: 2D Matryoshka evaluation (2DMSE, arXiv:2402.14776).

``GridEvaluator(inner, layers, dims)`` embeds once per depth (``inner.embed(encoder,
num_layers=k)``: the transformer really runs only its first k layers) and scores every width
``d`` as the slice ``[:, :d]`` of that depth's embeddings (``inner.score``). Keys are the inner
keys with ``@L{k}`` and ``@{d}`` appended (``cosine_spearman@L3@128``; nothing for ``None``, the
full depth / width), plus ``{inner.main_metric}_mean`` over every cell with ``mean=True``.

Normalisation of a slice, matched to sentence-transformers: ``SentenceTransformer(...,
truncate_dim=d)`` truncates the *output* of the module pipeline, i.e. after its ``Normalize``
module, and re-normalises only when ``encode(normalize_embeddings=True)`` is asked for. So by
default (``renormalize=False``) a cell is the plain slice of the embeddings as the checkpoint gives
them (unit vectors for a normalising checkpoint, their slices generally not), exactly what
``SentenceTransformer.encode(truncate_dim=d)`` returns. ``renormalize=True`` L2-normalises every
slice (what ``Encoder.encode(dim=d)`` does for a normalising checkpoint, and what
sentence-transformers' quantised evaluators ask for). Cosine scores are the same either way.

Compose with quantisation as ``GridEvaluator(QuantizedEvaluator(inner))``: the grid slices the
float embeddings and the quantiser quantises each slice (packed bits cannot be sliced per
dimension, so the other order is refused).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from embedjax.eval import base

_SEP = "|"  # between the depth tag and the inner key in embed's dict


def cell_suffix(num_layers: int | None, dim: int | None) -> str:
    """``"@L{k}@{d}"``, each part left out for ``None`` (the full depth / width)."""
    return ("" if num_layers is None else f"@L{num_layers}") + ("" if dim is None else f"@{dim}")


def _depth_tag(num_layers: int | None) -> str:
    return "full" if num_layers is None else f"L{num_layers}"


def truncate(x: np.ndarray, dim: int | None, *, renormalize: bool = False) -> np.ndarray:
    """The first ``dim`` dimensions of float embeddings ``(N, D)``, L2-normalised if asked."""
    x = np.asarray(x)
    if dim is not None and not 1 <= dim <= x.shape[-1]:
        raise ValueError(f"dim {dim} is outside 1..{x.shape[-1]} (the embeddings' width)")
    x = x[:, :dim].astype(np.float32)
    if renormalize:
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
        x = x / np.maximum(norms, 1e-12)  # as torch.nn.functional.normalize
    return x


@dataclasses.dataclass
class GridEvaluator:
    """``inner`` over every (num_layers, dim) cell; follows the evaluator contract itself.

    Args:
      inner: any evaluator (``name``, ``main_metric``, ``embed``, ``score``).
      layers: depths to evaluate (``None`` = every layer); each is one ``inner.embed`` call.
      dims: widths (``None`` = full); each a slice of its depth's embeddings.
      renormalize: L2-normalise every slice (default False: the slice as
        ``SentenceTransformer.encode(truncate_dim=d)`` gives it; see the module docstring).
      mean: also report ``{inner.main_metric}_mean``, the mean of the main metric over the cells
        (a checkpoint-selection metric for 2D Matryoshka training).
    """

    inner: base.Evaluator
    layers: Sequence[int | None] = (None, 6, 3, 1)
    dims: Sequence[int | None] = (None, 256, 128, 64)
    renormalize: bool = False
    mean: bool = True

    def __post_init__(self):
        self.layers, self.dims = tuple(self.layers), tuple(self.dims)
        for label, values in (("layers", self.layers), ("dims", self.dims)):
            if not values:
                raise ValueError(f"GridEvaluator: {label} is empty (use (None,) for the full model)")
            bad = [v for v in values if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                                           or v < 1)]
            if bad:
                raise ValueError(f"GridEvaluator: {label} must be positive integers or None, got {bad}")
            if len(set(values)) != len(values):
                raise ValueError(f"GridEvaluator: {label} {list(values)} has duplicates")

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def cells(self) -> list[tuple[int | None, int | None]]:
        """Every (num_layers, dim), depth-major (the order keys are reported in)."""
        return [(k, d) for k in self.layers for d in self.dims]

    @property
    def main_metric(self) -> str:
        """``{inner.main_metric}_mean`` with ``mean`` and several cells, else the first cell's main key."""
        if self.mean and len(self.cells) > 1:
            return f"{self.inner.main_metric}_mean"
        return self.inner.main_metric + cell_suffix(*self.cells[0])

    def embed(self, encoder, *, num_layers: int | None = None) -> base.Embeddings:
        """``inner.embed(encoder, num_layers=k)`` for every depth k, keys ``"{L{k}|full}|{inner key}"``."""
        if num_layers is not None:
            raise ValueError("GridEvaluator.embed chooses its own depths (layers=...); num_layers must be None")
        out = {}
        for k in self.layers:
            for key, value in self.inner.embed(encoder, num_layers=k).items():
                out[f"{_depth_tag(k)}{_SEP}{key}"] = value
        return out

    def _depth(self, embeddings: Mapping[str, np.ndarray] | None, k: int | None) -> dict[str, np.ndarray] | None:
        if embeddings is None:
            return None
        prefix = _depth_tag(k) + _SEP
        part = {key[len(prefix):]: v for key, v in embeddings.items() if key.startswith(prefix)}
        if not part:
            raise ValueError(f"GridEvaluator: no embeddings for depth {_depth_tag(k)!r} (have {sorted(embeddings)}); "
                             f"pass what GridEvaluator.embed returns")
        return part

    def score(self, embeddings: base.Embeddings, *, reference: base.Embeddings | None = None) -> dict[str, float]:
        """Every cell's ``inner.score`` on the sliced embeddings, keys ``{key}@L{k}@{d}`` (+ the mean)."""
        quantised = [key for key, v in embeddings.items() if not np.issubdtype(np.asarray(v).dtype, np.floating)]
        if quantised:
            raise ValueError(f"GridEvaluator slices float embeddings, got {quantised} as "
                             f"{np.asarray(embeddings[quantised[0]]).dtype}: put the quantiser inside the grid, "
                             f"GridEvaluator(QuantizedEvaluator(inner))")
        out, main = {}, []
        for k in self.layers:
            depth, ref = self._depth(embeddings, k), self._depth(reference, k)
            for d in self.dims:
                sliced = {key: truncate(v, d, renormalize=self.renormalize) for key, v in depth.items()}
                ref_sliced = None if ref is None else {key: truncate(v, d, renormalize=self.renormalize)
                                                       for key, v in ref.items()}
                scores = self.inner.score(sliced, reference=ref_sliced)
                suffix = cell_suffix(k, d)
                out.update({f"{key}{suffix}": float(v) for key, v in scores.items()})
                if self.mean:
                    if self.inner.main_metric not in scores:
                        raise KeyError(f"GridEvaluator: the inner main metric {self.inner.main_metric!r} is not "
                                       f"among its scores {sorted(scores)}")
                    main.append(scores[self.inner.main_metric])
        if self.mean and len(main) > 1:
            out[f"{self.inner.main_metric}_mean"] = float(np.mean(main))
        return out

    def run(self, encoder) -> Iterator[tuple[str, float]]:
        """Yields ``(f"{name}/{key}@L{k}@{d}", value)`` for every cell (and the mean)."""
        yield from base.prefixed(self.name, self.score(self.embed(encoder)))

    def __call__(self, encoder) -> dict[str, float]:
        return dict(self.run(encoder))

    # ------------------------------------------------------------------ reporting

    def matrix(self, results: Mapping[str, float], metric: str | None = None) -> np.ndarray:
        """``(len(layers), len(dims))`` values of ``metric`` (default ``inner.main_metric``) from
        ``score``'s or ``run``'s results (with or without the ``{name}/`` prefix); NaN where absent."""
        metric = metric or self.inner.main_metric
        grid = np.full((len(self.layers), len(self.dims)), np.nan)
        found = False
        for i, k in enumerate(self.layers):
            for j, d in enumerate(self.dims):
                key = metric + cell_suffix(k, d)
                for candidate in (key, f"{self.name}/{key}"):
                    if candidate in results:
                        grid[i, j], found = results[candidate], True
        if not found:
            raise KeyError(f"no {metric!r} cell in the results (keys like {sorted(results)[:4]})")
        return grid

    def _labels(self) -> tuple[list[str], list[str]]:
        rows = ["all layers" if k is None else f"{k} layers" for k in self.layers]
        cols = ["full" if d is None else str(d) for d in self.dims]
        return rows, cols

    def table(self, results: Mapping[str, float], metric: str | None = None) -> str:
        """A text table of ``metric``: one row per depth, one column per width, 2 decimals."""
        grid = self.matrix(results, metric)
        rows, cols = self._labels()
        first = max(len(r) for r in rows + [metric or self.inner.main_metric])
        width = max(8, *(len(c) for c in cols))
        lines = [f"{metric or self.inner.main_metric:<{first}}" + "".join(f"{c:>{width}}" for c in cols)]
        for label, values in zip(rows, grid):
            lines.append(f"{label:<{first}}" + "".join(f"{v:>{width}.2f}" for v in values))
        return "\n".join(lines)

    def heatmap(self, results: Mapping[str, float], metric: str | None = None, path=None) -> Path:
        """A PNG heatmap of ``metric`` (rows = depths, columns = widths, values written in the cells).

        matplotlib is imported here, and drawn through its Agg canvas (no display, no global backend).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if path is None:
            raise ValueError("heatmap needs a path for the PNG")
        metric = metric or self.inner.main_metric
        grid = self.matrix(results, metric)
        rows, cols = self._labels()
        fig = Figure(figsize=(1.2 + 1.1 * len(cols), 0.8 + 0.6 * len(rows)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("embedding dims")
        ax.set_ylabel("layers")
        ax.set_title(f"{self.name}: {metric}")
        middle = np.nanmean(grid)
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                        color="black" if grid[i, j] >= middle else "white")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
        return path
