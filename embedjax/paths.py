"""Run and export directories, local or remote (``gs://bucket/...``), through ``etils.epath``.

``epath.Path`` is what Orbax uses for checkpoints: one API for local paths and for
``gs://`` (through ``gcsfs`` or ``tf.io.gfile``, whichever is installed). A training
workdir and an export directory may be either; what needs a real local file (safetensors'
``save_file``, the tokenizer, ``load_pretrained``) goes through a local temporary directory:

* ``staged(directory)``: a local directory to write in, copied to ``directory`` on success;
* ``local_copy(directory)``: a model directory's files, downloaded for reading.

On a local path both are the path itself: nothing is copied.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URI (``gs://...``, ``s3://...``) rather than a local path."""
    return "://" in os.fspath(path)


def path(p: str | os.PathLike) -> epath.Path:
    """``p`` as an ``epath.Path``; a local one made absolute (a URI is already)."""
    p = epath.Path(p)
    return p if p.is_absolute() else p.absolute()


def copy_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copies every file under ``src`` to the same relative path under ``dst`` (overwriting)."""
    src, dst = epath.Path(src), epath.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.is_dir():
            copy_tree(entry, dst / entry.name)
        else:
            entry.copy(dst / entry.name, overwrite=True)


@contextlib.contextmanager
def staged(directory: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write ``directory``'s files in: ``directory`` itself when local;
    for a remote one, a temporary directory whose files are copied there when the block
    ends without an error (files already there and not rewritten stay)."""
    if not is_remote(directory):
        yield Path(directory)
        return
    with tempfile.TemporaryDirectory(prefix="embedjax-") as tmp:
        yield Path(tmp)
        copy_tree(tmp, directory)


@contextlib.contextmanager
def local_copy(directory: str | os.PathLike) -> Iterator[str | os.PathLike]:
    """A model directory readable by ``embedjax.load_pretrained``: ``directory`` itself unless
    remote; a remote one's top-level files and sentence-transformers module directories
    (not a training workdir's checkpoints) are downloaded to a temporary directory,
    deleted when the block ends."""
    if not is_remote(directory):
        yield directory
        return
    src = epath.Path(directory)
    modules = src / "modules.json"
    module_dirs = {m["path"] for m in json.loads(modules.read_text()) if m.get("path")} if modules.exists() else set()
    with tempfile.TemporaryDirectory(prefix="embedjax-") as tmp:
        for entry in src.iterdir():
            if entry.name in module_dirs:
                copy_tree(entry, Path(tmp) / entry.name)
            elif not entry.is_dir():
                entry.copy(Path(tmp) / entry.name)
        yield Path(tmp)
