"""Every notebook under colab/: its saved outputs come from a real run and follow the convention,
and it runs top to bottom in a python3 kernel with its CI parameters, printing what it promises.

The convention (colab/execute.py's docstring): notebook metadata ``"embedjax": {"ci_parameters":
{...}, "ci_expect": [regex, ...]}``; the first code cell installs embedjax from the repository URL
(``[project.urls] Repository``) only when it is not importable; one code cell tagged
``parameters``, after which the CI parameters are injected. The kernel runs in colab/ with this
process's environment minus the tests' forced 8 fake devices (a notebook sees the machine's real
devices, as when its outputs were saved) and matplotlib's inline backend (figures become
image/png outputs).
"""

import importlib.util
import re
import time
import tomllib
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
PLOTS = re.compile(r"\bplt\.|matplotlib|\.imshow\(|\.plot\(")


def _execute_module():
    spec = importlib.util.spec_from_file_location("colab_execute", COLAB / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _execute_module()


def repository_url() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def test_there_are_notebooks():
    assert {"quickstart.ipynb", "finetune.ipynb"} <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_structure(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = execute.code_cells(nb)
    assert cells, f"{path.name} has no code cells"

    # the first code cell installs embedjax the way a Colab user would, only when it is missing
    install = cells[0][1].source
    assert 'find_spec("embedjax") is None' in install, f"{path.name}: the first code cell is not the install cell"
    assert f"git+{repository_url()}" in install, f"{path.name}: the install cell does not use {repository_url()}"
    assert not re.search(r"^\s*[!%]", install, re.MULTILINE), f"{path.name}: the install cell must be Python code"

    # one parameters cell, assigning every CI parameter; the CI metadata
    index = execute.parameters_cell(nb)
    meta = execute.metadata(nb)
    assert set(meta) >= {"ci_parameters", "ci_expect"}, f"{path.name}: metadata 'embedjax' lacks ci_parameters/ci_expect"
    assigned = set(re.findall(r"^([A-Za-z_]\w*)\s*=", nb.cells[index].source, re.MULTILINE))
    unknown = set(meta["ci_parameters"]) - assigned
    assert not unknown, f"{path.name}: ci_parameters {sorted(unknown)} are not assigned in the parameters cell"
    assert meta["ci_expect"] and all(isinstance(r, str) for r in meta["ci_expect"])
    for regex in meta["ci_expect"]:
        re.compile(regex)
    assert not any("injected-parameters" in c.metadata.get("tags", []) for _, c in cells), \
        f"{path.name}: an injected-parameters cell was saved"

    # the outputs of one real run, top to bottom: every code cell executed in order, no errors
    counts = [c.execution_count for _, c in cells]
    assert counts == list(range(1, len(cells) + 1)), \
        f"{path.name}: execution counts {counts}: save the outputs of one fresh run (python colab/execute.py colab/{path.name})"
    errors = [i for i, c in cells if any(o.output_type == "error" for o in c.outputs)]
    assert not errors, f"{path.name}: cells {errors} have error outputs"
    assert execute.stdout_text(nb).strip(), f"{path.name}: no printed output saved"
    assert "Outputs from a real run on " in next(c.source for c in nb.cells if c.cell_type == "markdown"), \
        f"{path.name}: the first markdown cell should say where and when the outputs were produced"
    plotting = [i for i, c in cells if PLOTS.search(c.source)]
    if plotting:
        images = [i for i, c in cells for o in c.outputs if "image/png" in o.get("data", {})]
        assert images, f"{path.name}: cells {plotting} plot, but no image/png output is saved"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    meta = execute.metadata(nb)
    for _, cell in execute.code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    execute.inject_parameters(nb, meta["ci_parameters"])
    start = time.perf_counter()
    try:
        execute.execute(nb, cwd=COLAB, timeout=900, name=path.name)
    except execute.NotebookError as err:
        pytest.fail(str(err), pytrace=False)
    seconds = time.perf_counter() - start
    out = execute.stdout_text(nb)
    missing = [regex for regex in meta["ci_expect"] if not re.search(regex, out)]
    assert not missing, f"{path.name}: stdout matches none of {missing}; it was:\n{out[-6000:]}"
    print(f"{path.name}: ran in {seconds:.0f} s with {meta['ci_parameters']}")
