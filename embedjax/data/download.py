"""STS-B and SICK on this machine, or downloaded once into a cache: ``stsb_files()``, ``sick_files()``.

    files = embedjax.data.stsb_files()     # {"train": Path(.../sts-train.csv), "dev": ..., "test"?: ...}
    files = embedjax.data.sick_files()     # {"train": .../SICK_train.txt, "trial": ..., "test"?: ...}

Where they are looked for, in order (the first place that has the dataset wins):

1. ``data_dir``, when given: it must hold the files (else ``FileNotFoundError``, never a download);
2. ``$EMBEDJAX_DATA``, when set: likewise strict;
3. ``../shared/data`` relative to the current directory, then beside the repository of an
   editable install (where ``configs/base.py`` looks too);
4. the download cache, ``$EMBEDJAX_CACHE`` or ``~/.cache/embedjax/data``;
5. else (``download=True``) the original archives (the URLs of ``embedjax.data.tfds_builders``)
   are downloaded into the cache with a progress bar, extracted, checked and kept there.

In each of those directories a dataset may sit in its own folder (``stsb/``, ``sick/``: the
layout the cache and ``../shared/data`` use, and the one ``$EMBEDJAX_DATA`` has for the
configs), in the archive's folder (``stsbenchmark/``), or directly in the directory. A folder
holding some of a dataset's files but not the required ones is an error naming what is missing.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Mapping

from embedjax.data.tfds_builders import SICK_FILES, SICK_URLS, STSB_FILES, STSB_URL, check_source_dir

CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A download or its archive failed; the message names the URL, the file and what went wrong."""


def cache_dir() -> Path:
    """Where downloads are kept: ``$EMBEDJAX_CACHE``, else ``~/.cache/embedjax/data``."""
    return Path(os.environ.get("EMBEDJAX_CACHE") or "~/.cache/embedjax/data").expanduser()


def _repo_data_dir() -> Path:
    import embedjax

    # embedjax/__init__.py -> the repository -> its parent: ../shared/data beside an editable checkout
    return Path(embedjax.__file__).resolve().parents[1].parent / "shared" / "data"


def search_path(data_dir=None) -> list[tuple[str, Path, bool]]:
    """``(label, directory, strict)`` in lookup order; a strict place must hold the dataset."""
    places = []
    if data_dir is not None:
        places.append(("data_dir", Path(data_dir).expanduser(), True))
    if os.environ.get("EMBEDJAX_DATA"):
        places.append(("$EMBEDJAX_DATA", Path(os.environ["EMBEDJAX_DATA"]).expanduser(), True))
    places.append(("../shared/data", (Path.cwd() / ".." / "shared" / "data").resolve(), False))
    places.append(("beside the repository", _repo_data_dir(), False))
    places.append(("download cache", cache_dir(), False))
    seen, out = set(), []
    for label, path, strict in places:
        key = path.resolve() if path.exists() else path
        if key not in seen or strict:
            seen.add(key)
            out.append((label, path, strict))
    return out


# ---------------------------------------------------------------------------- datasets


class _Dataset:
    def __init__(self, title: str, folder: str, files: Mapping[str, str], required: tuple[str, ...],
                 archives: Mapping[str, str], subfolders: tuple[str, ...]):
        self.title, self.folder, self.files, self.required = title, folder, dict(files), required
        self.archives, self.subfolders = dict(archives), subfolders

    def expected(self) -> str:
        must = [self.files[s] for s in self.required]
        maybe = [n for s, n in self.files.items() if s not in self.required]
        return " and ".join(must) + (f" (optionally {', '.join(maybe)})" if maybe else "")

    def find_in(self, root: Path, label: str) -> dict[str, Path] | None:
        """The dataset's files under ``root`` (its folder, the archive's, or ``root`` itself), or None."""
        for sub in self.subfolders:
            d = root / sub if sub else root
            if d.is_dir() and any((d / name).is_file() for name in self.files.values()):
                return check_source_dir(d, self.files, self.required, what=f"{self.title} ({label})")
        return None


STSB = _Dataset("STS-B", "stsb", STSB_FILES, ("train", "dev"), {"all": STSB_URL}, ("stsb", "stsbenchmark", ""))
SICK = _Dataset("SICK", "sick", SICK_FILES, ("train", "trial"), SICK_URLS, ("sick", "SICK", ""))


def stsb_files(data_dir=None, *, download: bool = True) -> dict[str, Path]:
    """``{"train", "dev"}`` (and ``"test"`` when present) paths of the STS benchmark csv files.

    Looked for in ``data_dir``, ``$EMBEDJAX_DATA``, ``../shared/data``, beside the repository and
    in the cache (see the module docstring), else downloaded from ``tfds_builders.STSB_URL``
    into the cache (``download=False``: raise ``FileNotFoundError`` instead).
    """
    return _files(STSB, data_dir, download)


def sick_files(data_dir=None, *, download: bool = True) -> dict[str, Path]:
    """``{"train", "trial"}`` (and ``"test"`` when present) paths of the SICK txt files.

    Looked for like ``stsb_files``, else the SemEval-2014 zips (``tfds_builders.SICK_URLS``)
    are downloaded into the cache.
    """
    return _files(SICK, data_dir, download)


def _files(ds: _Dataset, data_dir, download: bool) -> dict[str, Path]:
    looked = []
    for label, root, strict in search_path(data_dir):
        found = ds.find_in(root, label)
        if found is not None:
            return found
        where = " or ".join(str(root / s) if s else str(root) for s in ds.subfolders)
        if strict:
            raise FileNotFoundError(f"{ds.title}: {label} {root} does not hold {ds.expected()} "
                                    f"(looked in {where})")
        looked.append(f"{label} ({root})")
    message = (f"{ds.title} not found: looked for {ds.expected()} in {', '.join(looked)}; each place may hold "
               f"them in {'/, '.join(s for s in ds.subfolders if s)}/ or directly (pass data_dir= or set "
               "EMBEDJAX_DATA to a directory holding them)")
    if not download:
        raise FileNotFoundError(message + "; download=False, so nothing was downloaded")
    return _download(ds, cache_dir(), message)


# ---------------------------------------------------------------------------- download


def fetch(url: str, dest: Path, desc: str = "") -> Path:
    """Downloads ``url`` (http(s) or file://) to ``dest`` with a progress bar; written to a temporary
    name first, so an interrupted download never looks finished."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "embedjax"})
    with urllib.request.urlopen(request, timeout=60) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc or dest.name, mininterval=1.0) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    os.replace(tmp, dest)
    return dest


def _fetch(url: str, dest: Path, desc: str) -> Path:
    try:
        return fetch(url, dest, desc)
    except Exception as err:  # offline, 404, timeout...: name what was tried
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)
        raise DownloadError(f"downloading {url} to {dest} failed ({type(err).__name__}: {err})") from err


def _extract(archive: Path, url: str, into: Path) -> None:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)
        else:
            with tarfile.open(archive) as t:
                t.extractall(into, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise DownloadError(f"{archive} (from {url}) is not a readable zip or tar archive "
                            f"({type(err).__name__}: {err}); it was deleted, call again to download it anew") from err


def _download(ds: _Dataset, cache: Path, not_found: str) -> dict[str, Path]:
    """Downloads and extracts every archive of ``ds`` into ``cache/<folder>`` (atomically: a
    temporary folder renamed when every expected file is in it)."""
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{ds.folder}-", dir=cache))
    try:
        out = staging / ds.folder
        out.mkdir()
        for split, url in ds.archives.items():
            archive = staging / Path(urllib.request.url2pathname(url.rsplit("/", 1)[-1])).name
            _fetch(url, archive, f"{ds.title} {url.rsplit('/', 1)[-1]}")
            extracted = staging / f"extracted-{split}"
            _extract(archive, url, extracted)
            archive.unlink()
            wanted = ds.files if split == "all" else {split: ds.files[split]}
            for name in wanted.values():
                hits = sorted(p for p in extracted.rglob(name) if p.is_file() and "__MACOSX" not in p.parts)
                if hits:
                    shutil.move(str(hits[0]), out / name)
            missing = [ds.files[s] for s in ds.required if s in wanted and not (out / ds.files[s]).is_file()]
            if missing:
                found = sorted(str(p.relative_to(extracted)) for p in extracted.rglob("*") if p.is_file())[:20]
                raise DownloadError(f"{url}: the archive has no {', '.join(missing)} (it holds {found})")
            shutil.rmtree(extracted)
        final = cache / ds.folder
        if final.exists():  # another process finished first, or a stale partial copy
            found = ds.find_in(cache, "download cache") if any(final.iterdir()) else None
            if found is not None:
                return found
            shutil.rmtree(final)
        os.replace(out, final)
    except DownloadError as err:
        raise DownloadError(f"{not_found}; downloading it failed: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check_source_dir(final, ds.files, ds.required, what=f"{ds.title} (download cache)")


__all__ = ["DownloadError", "cache_dir", "fetch", "search_path", "sick_files", "stsb_files"]
