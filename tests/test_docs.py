"""The documentation stays true to the repository (docs/README.md lists the pages).

* every Python module (embedjax/, scripts/, configs/, benchmarks/) has its line in docs/modules.md;
* every repository path cited in the docs, CHANGELOG.md, README.md and the code's docstrings and
  comments exists, and so does every relative Markdown link target;
* every loss name the training objective accepts is documented in docs/losses.md, and every
  evaluator type and option in docs/evaluation.md;
* arXiv ids are well formed; the benchmark summary copies its numbers from benchmarks/README.md;
* a docstring's ``(docs/<page>.md, "Section")`` names a section of that page;
* the layer map holds: nothing in the package imports the training loop for its helpers;
* nothing cites the reference notes that lived outside the repository.

Modules and files are the ones git tracks (what a fresh clone has); without git, the files on disk.
Nothing here compiles anything: a few seconds.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TOP_DIRS = ("embedjax", "scripts", "configs", "benchmarks", "tests", "docs", "colab")
FILE_SUFFIXES = (".py", ".md", ".ipynb", ".sh", ".json", ".toml", ".txt", ".cfg", ".yaml", ".yml")
# A repository-relative path: starts with a top-level directory, not preceded by a path
# character (so ``../shared/data/stsb/...`` or ``/tmp/x/tests/a.py`` are not taken for one).
PATH_RE = re.compile(r"(?<![\w./$~-])((?:%s)/[\w./-]*[\w/])" % "|".join(TOP_DIRS))
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
ARXIV_RE = re.compile(r"(?:arXiv:\s*|arxiv\.org/(?:abs|pdf)/)([^\s)\],;`'\"]+)", re.IGNORECASE)
SECTION_RE = re.compile(r"docs/(\w+\.md),\s*\"([^\"]+)\"")


def tracked_files() -> list[str]:
    """Repository-relative paths git tracks; every file on disk (no caches) without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
        if files:
            return sorted(f for f in files if (ROOT / f).is_file())
    except (OSError, subprocess.CalledProcessError):
        pass
    skip = (".git", "__pycache__", ".pytest_cache", "workdirs")
    return sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                  if p.is_file() and not any(part in skip or part.endswith(".egg-info")
                                             for part in p.relative_to(ROOT).parts))


def read_text(rel: str) -> str | None:
    try:
        return (ROOT / rel).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def python_modules() -> list[str]:
    """The modules docs/modules.md must list: embedjax/**, scripts/*, configs/*, benchmarks/*."""
    out = []
    for rel in tracked_files():
        parts = rel.split("/")
        if not rel.endswith(".py") or parts[-1] == "__init__.py":
            continue
        if parts[0] == "embedjax" or (parts[0] in ("scripts", "configs", "benchmarks") and len(parts) == 2):
            out.append(rel)
    return out


def documents() -> list[str]:
    """Markdown whose cited paths and links must exist: docs/*.md, README.md, CHANGELOG.md."""
    files = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))
    return files + [f for f in ("README.md", "CHANGELOG.md") if (ROOT / f).is_file()]


def code_files() -> list[str]:
    """Python files whose docstrings and comments may cite paths (scanned whole)."""
    return [f for f in tracked_files() if f.endswith(".py") and f.split("/")[0] in ("embedjax", "scripts", "configs")]


def cited_paths(text: str) -> set[str]:
    """Repository paths in ``text``: files with a known suffix, or directories written with a slash."""
    return {m for m in PATH_RE.findall(text) if m.endswith("/") or m.endswith(FILE_SUFFIXES)}


def headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


# ---------------------------------------------------------------- (a) the module map


def test_every_python_module_is_in_the_module_map():
    listed = (DOCS / "modules.md").read_text(encoding="utf-8")
    modules = python_modules()
    assert len(modules) > 50, modules  # the scan found the package
    missing = [m for m in modules if f"`{m}`" not in listed]
    assert not missing, f"docs/modules.md has no line for {missing}"


# ---------------------------------------------------------------- (b) cited paths exist


def imported_modules(rel: str) -> set[str]:
    """The embedjax modules a file imports (``from embedjax.train import loop`` counts as
    ``embedjax.train.loop``)."""
    import ast
    found = set()
    for node in ast.walk(ast.parse((ROOT / rel).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("embedjax")}


def test_nothing_imports_the_training_loop_for_its_helpers():
    """docs/modules.md, "Layer map": the loop imports the builders; no package module imports
    the loop, and what drives a run (scripts, benchmarks) takes only ``train_and_evaluate``."""
    package = [rel for rel in python_modules() if rel.startswith("embedjax/")
               and rel != "embedjax/train/loop.py"
               and any(m.startswith("embedjax.train.loop") for m in imported_modules(rel))]
    assert not package, package
    helpers = {rel: sorted(m for m in imported_modules(rel) if m.startswith("embedjax.train.loop."))
               for rel in python_modules()}
    helpers = {rel: names for rel, names in helpers.items()
               if names and names != ["embedjax.train.loop.train_and_evaluate"]}
    assert not helpers, helpers
    assert "embedjax.train.loop.train_and_evaluate" in imported_modules("scripts/train.py")


def test_self_check_of_the_path_pattern():
    text = ("see `embedjax/losses/angle.py`, docs/losses.md. and configs/stsb_2d.py:mode=2dmse; "
            "not ../shared/data/stsb/sts-dev.csv, /tmp/x/tests/a.py, embedjax/eval/<type>.py, "
            "colab/*.ipynb or tests/test_*.py; a directory: embedjax/eval/")
    assert cited_paths(text) == {"embedjax/losses/angle.py", "docs/losses.md", "configs/stsb_2d.py",
                                 "embedjax/eval/"}


@pytest.mark.parametrize("rel", documents() + code_files())
def test_cited_paths_exist(rel):
    text = read_text(rel)
    assert text is not None
    missing = sorted(p for p in cited_paths(text) if not (ROOT / p).exists())
    assert not missing, f"{rel} cites paths that do not exist: {missing}"


@pytest.mark.parametrize("rel", documents())
def test_relative_links_resolve(rel):
    text = (ROOT / rel).read_text(encoding="utf-8")
    broken = []
    for target in LINK_RE.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same page
        path = (ROOT / rel).parent / target.split("#")[0]
        if not path.exists() or ROOT.resolve() not in path.resolve().parents and path.resolve() != ROOT.resolve():
            broken.append(target)
    assert not broken, f"{rel} links to missing files: {broken}"


def test_docstring_sections_exist():
    """``(docs/losses.md, "AnglE")`` in a docstring names a heading of that page."""
    for rel in code_files():
        for page, section in SECTION_RE.findall(read_text(rel) or ""):
            assert (DOCS / page).is_file(), f"{rel} cites docs/{page}, which does not exist"
            assert any(section in h for h in headings(DOCS / page)), \
                f"{rel} cites section {section!r} of docs/{page}; its headings are {headings(DOCS / page)}"


# ---------------------------------------------------------------- (c) every loss is documented


def test_every_loss_name_is_documented():
    from embedjax.train import loss_specs

    text = (DOCS / "losses.md").read_text(encoding="utf-8")
    names = set(loss_specs.LOSSES) | set(loss_specs.AUX_LOSSES) | set(loss_specs.DISTILL_LOSSES)
    names |= {m for m in loss_specs.LAYER_MODES if m}
    missing = sorted(n for n in names if f"`{n}`" not in text and f'"{n}"' not in text)
    assert not missing, f"docs/losses.md does not document {missing}"
    heads = " ".join(headings(DOCS / "losses.md"))
    assert all(f"`{n}`" in heads for n in loss_specs.LOSSES), "every objective.loss name has a section heading"


def test_every_loss_function_is_documented():
    import embedjax.losses

    text = (DOCS / "losses.md").read_text(encoding="utf-8")
    helpers = {"ibn_pair_weights", "in_batch_pair_loss", "ranking_loss", "sample_2dmse", "sample_dims",
               "sample_layers", "prefix_dims", "kl_divergence", "layer_weights", "pca_target"}
    missing = [n for n in embedjax.losses.__all__ if n not in helpers and n not in text]
    assert not missing, f"docs/losses.md does not mention {missing}"


# ---------------------------------------------------------------- (d) arXiv ids


def test_arxiv_ids_are_well_formed():
    pages = sorted(DOCS.glob("*.md")) + [ROOT / "CHANGELOG.md"]
    ids = [(p.name, i) for p in pages if p.is_file() for i in ARXIV_RE.findall(p.read_text(encoding="utf-8"))]
    assert len(ids) > 10
    bad = [(page, i) for page, i in ids if not re.fullmatch(r"\d{4}\.\d{5}(v\d+)?", i.rstrip("."))]
    assert not bad, f"arXiv ids must look like NNNN.NNNNN: {bad}"


# ---------------------------------------------------------------- (e) no notes from outside the repository


def test_nothing_cites_notes_outside_the_repository():
    forbidden = ("shared/" + "docs", "REFERENCE" + ".md", "ARCHITECTURE" + ".md")
    hits = []
    for rel in tracked_files():
        text = read_text(rel)
        if text is None:
            continue
        hits += [f"{rel}: {word}" for word in forbidden if word in text]
    assert not hits, f"these files cite notes users do not have (point to docs/ instead): {hits}"


# ---------------------------------------------------------------- (f) evaluators


def test_every_evaluator_type_and_option_is_documented():
    from embedjax.eval import (cross, csts, diagnostics, fusion, late_retrieval, pair_classification, reranking,
                               retrieval, sparse_retrieval, sts, suite)

    text = (DOCS / "evaluation.md").read_text(encoding="utf-8")
    missing = [t for t in suite.TYPES if f"`{t}`" not in text]
    assert not missing, f"docs/evaluation.md does not document evaluator types {missing}"
    assert "`grid`" in text and "`quantized`" in text and "MTEBEncoder" in text
    options = {"sts": sts.SPEC_KEYS, "retrieval": retrieval.OPTIONS, "reranking": reranking.OPTIONS,
               "pair_classification": pair_classification.SPEC_KEYS, "csts": csts.OPTIONS,
               "cross_sts": cross.STS_KEYS, "cross_csts": cross.CSTS_KEYS, "rerank": cross.RERANK_KEYS, "sparse_retrieval": sparse_retrieval.OPTIONS,
               "colbert_retrieval": late_retrieval.OPTIONS, "m3_retrieval": fusion.M3_OPTIONS,
               "diagnostics": diagnostics.SPEC_KEYS,
               "wrappers": suite.WRAPPER_KEYS}
    assert set(options) - {"wrappers"} == set(suite.TYPES), "a new evaluator type: list its options here"
    undocumented = {kind: [k for k in keys if f"`{k}" not in text and f'"{k}"' not in text]
                    for kind, keys in options.items()}
    assert not any(undocumented.values()), f"docs/evaluation.md does not document options {undocumented}"


# ---------------------------------------------------------------- benchmark figures


def test_benchmark_summary_copies_benchmarks_readme():
    summary = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    source = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    numbers = set(re.findall(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+", summary))
    assert len(numbers) > 30
    missing = sorted(n for n in numbers if n not in source)
    assert not missing, f"docs/benchmarks.md quotes numbers benchmarks/README.md does not have: {missing}"
    commands = re.findall(r"`(python (?:benchmarks|scripts)/[^`]+)`", summary)
    assert commands and all(c in source for c in commands), \
        f"commands not in benchmarks/README.md: {[c for c in commands if c not in source]}"
