"""Execute notebooks top to bottom in a fresh python3 kernel and save them with their outputs.

    python colab/execute.py colab/quickstart.ipynb colab/finetune.ipynb   # the defaults (full runs), in place
    python colab/execute.py colab/finetune.ipynb --ci --output /tmp/ci.ipynb  # the small CI setting

This is how the outputs saved in ``colab/*.ipynb`` are produced: each notebook runs with its
default (full, real-run) parameters from ``colab/`` as the working directory, and the line
"Outputs from a real run on <machine>, <date> ..." in its first markdown cell is rewritten
to say where and when. Stream outputs are coalesced and carriage-return progress frames
collapsed, so the saved text is what a terminal would finally show.

The convention every notebook here follows (``tests/test_notebooks.py`` checks it):

* notebook metadata ``"embedjax": {"ci_parameters": {NAME: value, ...}, "ci_expect": [regex, ...]}``:
  the small setting CI runs with, and regexes that must each match the notebook's stdout in CI;
* the first code cell installs embedjax (Python code, only when ``embedjax`` is not importable);
* exactly one code cell tagged ``parameters`` assigns the defaults; ``--ci`` (and the test)
  insert a cell right after it assigning ``ci_parameters`` (papermill's injected-parameters cell).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

import nbformat

COLAB = Path(__file__).resolve().parent
TIMEOUT = 3600  # seconds per cell (real runs; the tests allow 900)
OUTPUTS_LINE = re.compile(r"^[_*]*Outputs from a real run.*$", re.MULTILINE)
DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\d+")


class NotebookError(RuntimeError):
    """A cell raised: the message names the notebook, the cell index and the error."""


def metadata(nb) -> dict:
    """The notebook's ``"embedjax"`` metadata (``ci_parameters``, ``ci_expect``)."""
    return dict(nb.metadata.get("embedjax", {}))


def code_cells(nb) -> list[tuple[int, dict]]:
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def parameters_cell(nb) -> int:
    """Index (in ``nb.cells``) of the one code cell tagged ``parameters``."""
    tagged = [i for i, c in code_cells(nb) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"expected exactly one code cell tagged 'parameters', found {len(tagged)}")
    return tagged[0]


def inject_parameters(nb, params: dict) -> None:
    """Inserts, right after the ``parameters`` cell, a cell assigning ``params`` (papermill's way)."""
    if not params:
        return
    lines = ["# Parameters injected for this run (the notebook's ci_parameters)"]
    lines += [f"{name} = {value!r}" for name, value in params.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(parameters_cell(nb) + 1, cell)


def kernel_env(extra: dict | None = None) -> dict:
    """This process's environment for the kernel, without a forced fake device count (the tests
    simulate 8 CPU devices; a notebook runs as a user's would: the real devices)."""
    env = dict(os.environ)
    flags = DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).strip()
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    env.pop("MPLBACKEND", None)  # ipykernel's inline backend: headless, and figures become image/png outputs
    env.update(extra or {})
    return env


def execute(nb, *, cwd: Path = COLAB, env: dict | None = None, timeout: int = TIMEOUT, name: str = "notebook"):
    """Runs every cell of ``nb`` in place (outputs, execution counts). Raises ``NotebookError``
    naming the cell index and its error when a cell fails."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", coalesce_streams=True,
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env=kernel_env() if env is None else env)
    except CellExecutionError as err:
        failed = [i for i, c in code_cells(nb) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
        where = f"cell {failed[0]}" if failed else "a cell"
        raise NotebookError(f"{name}: {where} failed: {err.ename}: {err.evalue}\n{err}") from None
    return nb


def stdout_text(nb) -> str:
    """The notebook's combined stdout: every code cell's ``stdout`` stream, in order."""
    return "".join(o.get("text", "") for _, c in code_cells(nb) for o in c.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def machine() -> str:
    """A short description of this machine: the CPU model and the cores this process may use."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = _gpu()
    return f"{cpu}, {cores} cores, {gpu}" if gpu else f"{cpu}, {cores} cores ({platform.system()}, no GPU)"


def _gpu() -> str:
    """The GPU's name when ``nvidia-smi`` reports one, else ''."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{len(out)} x {out[0]}" if out else ""


def stamp(nb, name: str, seconds: float, ci: bool) -> None:
    """Rewrites (or adds) the "Outputs from a real run ..." line of the first markdown cell."""
    setting = "the CI parameters" if ci else "the default parameters"
    line = (f"_Outputs from a real run on {machine()}, {datetime.date.today().isoformat()}, with {setting} "
            f"({seconds / 60:.1f} minutes; `python colab/execute.py colab/{name}` reproduces them)._")
    first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if first is None:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(line))
    elif OUTPUTS_LINE.search(first.source):
        first.source = OUTPUTS_LINE.sub(line.replace("\\", "\\\\"), first.source)
    else:
        first.source = first.source.rstrip() + "\n\n" + line


def run(path: Path, *, ci: bool = False, output: Path | None = None, timeout: int = TIMEOUT) -> float:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # a clean slate: no stale outputs survive a failed cell
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    if ci:
        inject_parameters(nb, metadata(nb).get("ci_parameters", {}))
    start = time.perf_counter()
    execute(nb, cwd=path.resolve().parent, timeout=timeout, name=path.name)
    seconds = time.perf_counter() - start
    if ci:  # the saved notebook holds no injected cell
        nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    stamp(nb, path.name, seconds, ci)
    nbformat.validate(nb)
    nbformat.write(nb, output or path)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--ci", action="store_true", help="run with the notebook's ci_parameters")
    parser.add_argument("--output", type=Path, help="write here instead of in place (one notebook)")
    parser.add_argument("--timeout", type=int, default=TIMEOUT, help="seconds a cell may run")
    args = parser.parse_args(argv)
    if args.output and len(args.notebooks) != 1:
        parser.error("--output takes one notebook")
    for path in args.notebooks:
        try:
            seconds = run(path, ci=args.ci, output=args.output, timeout=args.timeout)
        except NotebookError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"{path}: executed in {seconds:.0f} s -> {args.output or path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
