"""What a run logs: ``metrics.jsonl`` and TensorBoard (``MetricsWriter``), and the training
metrics between two fetches (``TrainLog``: the NaN guard, throughput and MFU, the progress bar).

Fetching a step's metrics syncs the host with the device, so the loop keeps them on the
device and ``TrainLog.flush`` fetches them only when something is due (a log line, an
evaluation, a checkpoint: it always runs before a save, so no checkpoint ever holds a state
that produced a non-finite loss).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from typing import Callable

import jax
from etils import epath

from embedjax import paths
from embedjax.train import flops

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """A training metric became NaN or infinite: the run stopped before saving that state."""


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
    is installed only to accept torch tensors (2 s of a run's start; we log floats)."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard (process 0).
    Object stores (a ``gs://`` workdir) have no append: there the file is rewritten whole."""

    def __init__(self, workdir: epath.Path):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.remote = paths.is_remote(workdir)
        self.text: str | None = None  # remote: the file's text (a resumed run's earlier lines first)
        self.tb = None
        if self.enabled:
            try:
                self.tb = _summary_writer_class()(str(epath.Path(workdir) / "tensorboard"))
            except ImportError as err:  # tensorboardX, or its gs:// writer's google-cloud-storage
                log.warning("no TensorBoard (%s): metrics go to metrics.jsonl only", err)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            if self.text is None:
                self.text = self.path.read_text() if self.path.exists() else ""
            self.text += line
            self.path.write_text(self.text)
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@contextlib.contextmanager
def progress_bar(total: int, initial: int):
    """The training progress bar (process 0 only), closed on exit. While it is shown, log
    records that would go to the console (absl's handler, or a plain stream handler on
    stdout / stderr) are written above it with ``tqdm.write`` instead of through it."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0)
    root = logging.getLogger()
    console = [h for h in root.handlers if _writes_to_console(h)]
    above = [_AboveTheBar(h, bar) for h in console]
    for original, replacement in zip(console, above):
        root.removeHandler(original)
        root.addHandler(replacement)
    try:
        yield bar
    finally:
        for original, replacement in zip(console, above):
            root.removeHandler(replacement)
            root.addHandler(original)
        bar.close()


def _writes_to_console(handler: logging.Handler) -> bool:
    stream = getattr(getattr(handler, "python_handler", handler), "stream", None)  # absl wraps a StreamHandler
    return stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


class _AboveTheBar(logging.Handler):
    """A console handler's records, formatted as it formats them, written above the bar."""

    def __init__(self, inner: logging.Handler, bar):
        super().__init__(inner.level)
        self.inner, self.bar = inner, bar
        self.filters = inner.filters

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.bar.write(self.inner.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never stop the run
            self.handleError(record)


class TrainLog:
    """The training metrics of the steps since the last fetch, kept on the device.

    ``record`` each step; ``flush`` fetches them, stops the run on a non-finite value
    (``TrainingDiverged``, naming the last good checkpoint), writes the latest values with the
    learning rate and the throughput (``flops.throughput``: examples/s, token slots/s, model
    TFLOP/s and, against ``peak_flops``, the peak FLOP/s of the run's devices, MFU), and shows them
    on the progress bar. ``exclude`` takes time spent on other work (evaluation, saving,
    callbacks) out of the throughput.
    """

    def __init__(self, writer: MetricsWriter, bar, *, lr_at: Callable[[int], float], batch_size: int,
                 on_divergence: Callable[[int, dict], str], peak_flops: float | None = None):
        self.writer, self.bar, self.lr_at, self.batch_size = writer, bar, lr_at, batch_size
        self.on_divergence = on_divergence  # (step, metrics) -> what the error says about checkpoints
        self.peak_flops = peak_flops
        self.pending: list[tuple[int, dict]] = []
        self.since, self.examples, self.tokens, self.model_flops = time.perf_counter(), 0, 0, 0.0

    def record(self, step: int, metrics: dict, source: str | None = None, work: flops.StepWork | None = None) -> None:
        """A step's device metrics; with several training sources, also ``loss/<source>``.
        ``work``: what the step computed (``CompiledSteps.work``), for tokens/s and MFU."""
        self.pending.append((step, metrics if source is None else {**metrics, f"loss/{source}": metrics["loss"]}))
        self.examples += self.batch_size
        if work is not None:
            self.tokens, self.model_flops = self.tokens + work.tokens, self.model_flops + work.flops

    def exclude(self, seconds: float) -> None:
        self.since += seconds

    def flush(self, step: int, *_) -> None:
        """Fetches and writes what was recorded (nothing when nothing is pending)."""
        if not self.pending:
            return
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in self.pending]
        self.pending.clear()
        for s, m in fetched:
            if not all(math.isfinite(v) for v in m.values()):
                raise TrainingDiverged(f"non-finite training metrics at step {s}: {m}. {self.on_divergence(s, m)}")
        now = time.perf_counter()
        per_source = {k: v for _, m in fetched for k, v in m.items() if k.startswith("loss/")}  # each one's latest
        rates = flops.throughput(seconds=now - self.since, examples=self.examples, tokens=self.tokens,
                                 flops=self.model_flops, peak=self.peak_flops)
        last = fetched[-1][1] | per_source | {"lr": float(self.lr_at(step - 1))} | rates
        self.since, self.examples, self.tokens, self.model_flops = now, 0, 0, 0.0
        self.writer.write(step, last)
        shown = {"mfu": f"{last['mfu']:.1%}"} if "mfu" in last else {}
        self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", ex_s=f"{last['examples_per_s']:.0f}",
                             tok_s=f"{last['tokens_per_s']:.0f}", **shown, refresh=False)
