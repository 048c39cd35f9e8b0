"""TFDS dataset builders for STS-B, SICK and user files, readable without TensorFlow.

Every builder here is a ``tfds.core.GeneratorBasedBuilder`` prepared with
``file_format="array_record"`` and read with ``tfds.data_source`` / ``as_data_source``:
random access, no TensorFlow import anywhere on the path (the legacy public builders
such as ``glue`` do need TensorFlow). The examples are parsed by ``embedjax.data.readers``,
so bad input fails the build with the same file:line messages.

Records use the pipeline's field names: ``text_a``, ``text_b``, ``text_n`` (``tfds.features.Text``,
read back as UTF-8 bytes), ``score`` (float32), plus provenance (``line``: the 1-based
line in the source file) and dataset extras (STS-B ``genre``; SICK ``label``, ``pair_id``).

    builder = prepare("embedjax_stsb", data_dir="/data/tfds", source_dir="data/stsb")
    train = tfds.data_source("embedjax_stsb", split="train", data_dir="/data/tfds")

Without ``source_dir`` (and nothing of theirs in ``<data_dir>/downloads/manual``) the STS-B
and SICK builders download the original archives (for users who are online). A ``source_dir``
that is missing, empty or lacks the required files raises ``FileNotFoundError`` naming the
directory and the files expected; it never falls back to a download.

``tfds_source(name, split, columns)`` reads any TFDS dataset by name and maps its columns
onto these field names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from embedjax.data import readers

TEXT_FIELDS = ("text_a", "text_b", "text_n")
FIELDS = (*TEXT_FIELDS, "score")

STSB_URL = "http://ixa2.si.ehu.eus/stswiki/images/4/48/Stsbenchmark.tar.gz"  # extracts to stsbenchmark/
STSB_FILES = {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"}
SICK_URLS = {  # SemEval-2014 task 1 releases; each zip holds the .txt of the same name
    "train": "https://alt.qcri.org/semeval2014/task1/data/uploads/sick_train.zip",
    "trial": "https://alt.qcri.org/semeval2014/task1/data/uploads/sick_trial.zip",
    "test": "https://alt.qcri.org/semeval2014/task1/data/uploads/sick_test_annotated.zip",
}
SICK_FILES = {"train": "SICK_train.txt", "trial": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}


def _expected(files: Mapping[str, str], required: Sequence[str]) -> str:
    must = [files[s] for s in required]
    maybe = [name for split, name in files.items() if split not in required]
    return ", ".join(must) + (f" (optionally {', '.join(maybe)})" if maybe else "")


def check_source_dir(source_dir, files: Mapping[str, str], required: Sequence[str], *,
                     what: str = "source_dir") -> dict[str, Path]:
    """{split: path} of the raw files in ``source_dir`` (the required splits and any optional one present).

    Raises ``FileNotFoundError`` naming the directory and the files expected when it is
    missing, not a directory, empty, or lacks a required file: a local copy that is not
    there must never turn into a silent download (or a dataset with splits missing).
    ``what`` names the directory's role in the messages.
    """
    d = Path(source_dir).expanduser()
    expected = _expected(files, required)
    if not d.exists():
        raise FileNotFoundError(f"{what} {d} does not exist (expected a directory holding {expected})")
    if not d.is_dir():
        raise NotADirectoryError(f"{what} {d} is not a directory (expected a directory holding {expected})")
    if not any(d.iterdir()):
        raise FileNotFoundError(f"{what} {d} is empty (expected {expected})")
    missing = [files[s] for s in required if not (d / files[s]).is_file()]
    if missing:
        raise FileNotFoundError(f"{what} {d} lacks {', '.join(missing)} (expected {expected}; "
                                f"it has {sorted(p.name for p in d.iterdir())[:20]})")
    return {split: d / name for split, name in files.items() if (d / name).is_file()}


class _LocalOrDownload:
    """Mixin: raw files from an explicit manual dir (strictly checked), else TFDS's default one, else download.

    ``download_and_prepare(download_config=DownloadConfig(manual_dir=DIR))`` (what ``prepare``
    passes for ``source_dir``) makes ``DIR`` mandatory: missing, empty or incomplete raises
    ``FileNotFoundError``. Without it, TFDS's default ``<data_dir>/downloads/manual`` is used
    when it holds the required files, an incomplete copy there (some of our files, not all the
    required ones) raises, and otherwise the original archives are downloaded.
    """

    FILES: Mapping[str, str] = {}
    REQUIRED: tuple[str, ...] = ()
    _explicit_manual_dir = None

    def download_and_prepare(self, *args, **kwargs):
        config = kwargs.get("download_config")
        self._explicit_manual_dir = getattr(config, "manual_dir", None) or None
        return super().download_and_prepare(*args, **kwargs)

    def _local_files(self, dl_manager) -> dict[str, Path] | None:
        """{split: file} from the manual dir, or None to download."""
        if self._explicit_manual_dir is not None:
            return check_source_dir(self._explicit_manual_dir, self.FILES, self.REQUIRED)
        manual = getattr(dl_manager, "_manual_dir", None)
        if manual is None or not Path(manual).is_dir():
            return None
        manual = Path(manual)
        if not any((manual / name).is_file() for name in self.FILES.values()):
            return None  # nothing of ours in the (shared) default manual dir: download
        return check_source_dir(manual, self.FILES, self.REQUIRED, what="manual dir")


# ---------------------------------------------------------------------------- STS-B


class EmbedjaxStsb(_LocalOrDownload, tfds.core.GeneratorBasedBuilder):
    """The STS benchmark (train / dev / test when present): sentence pairs with a 0-5 score."""

    name = "embedjax_stsb"
    VERSION = tfds.core.Version("1.0.0")
    FILES = STSB_FILES
    REQUIRED = ("train", "dev")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put sts-train.csv and sts-dev.csv (optionally sts-test.csv) from {STSB_URL} in the manual dir "
        "(prepare(..., source_dir=DIR)); without them the archive is downloaded."
    )

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="STS benchmark 2012-2017 (http://ixa2.si.ehu.eus/stswiki): pairs scored 0-5.",
            features=tfds.features.FeaturesDict({
                "text_a": tfds.features.Text(),
                "text_b": tfds.features.Text(),
                "score": tfds.features.Scalar(np.float32),
                "genre": tfds.features.Text(),
                "line": tfds.features.Scalar(np.int32),
            }),
            homepage="http://ixa2.si.ehu.eus/stswiki",
        )

    def _split_generators(self, dl_manager):
        files = self._local_files(dl_manager)
        if files is None:  # online users: the original archive
            root = Path(dl_manager.download_and_extract(STSB_URL)) / "stsbenchmark"
            files = {split: root / name for split, name in STSB_FILES.items()}
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        text = dict(readers._lines(path))
        rows = readers.read_stsb(path)
        for line, pair in zip(rows.lines, rows):
            yield line, {"text_a": pair.text_a, "text_b": pair.text_b, "score": pair.score,
                         "genre": text[line].split("\t", 1)[0], "line": line}


# ---------------------------------------------------------------------------- SICK


class EmbedjaxSick(_LocalOrDownload, tfds.core.GeneratorBasedBuilder):
    """SICK (SemEval-2014 task 1; train / trial / test when present): relatedness 1-5 and entailment."""

    name = "embedjax_sick"
    VERSION = tfds.core.Version("1.0.0")
    FILES = SICK_FILES
    REQUIRED = ("train", "trial")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put SICK_train.txt and SICK_trial.txt (optionally SICK_test_annotated.txt) in the manual dir "
        "(prepare(..., source_dir=DIR)); without them the SemEval-2014 zips are downloaded."
    )

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="SICK: sentence pairs with relatedness (1-5) and entailment labels.",
            features=tfds.features.FeaturesDict({
                "text_a": tfds.features.Text(),
                "text_b": tfds.features.Text(),
                "score": tfds.features.Scalar(np.float32),
                "label": tfds.features.ClassLabel(names=readers.SICK_LABELS),
                "pair_id": tfds.features.Scalar(np.int32),
                "line": tfds.features.Scalar(np.int32),
            }),
            homepage="https://marcobaroni.org/composes/sick.html",
        )

    def _split_generators(self, dl_manager):
        files = self._local_files(dl_manager)
        if files is None:
            dirs = dl_manager.download_and_extract(SICK_URLS)
            files = {split: Path(dirs[split]) / SICK_FILES[split] for split in SICK_URLS}
        return {split: self._generate_examples(path) for split, path in files.items()}

    def _generate_examples(self, path: Path) -> Iterator[tuple[int, dict]]:
        text = dict(readers._lines(path))
        rows = readers.read_sick(path)
        for line, pair in zip(rows.lines, rows):
            pair_id = text[line].split("\t", 1)[0].strip()
            if not pair_id.isdigit():
                raise readers.DataError(path, line, f"pair_ID {pair_id!r} is not a number (expected an integer id)")
            yield line, {"text_a": pair.text_a, "text_b": pair.text_b, "score": pair.score,
                         "label": pair.label, "pair_id": int(pair_id), "line": line}


# ---------------------------------------------------------------------------- user files


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    """A user dataset: ``kind`` of examples, ``files`` per split, and reader options.

    ``kind``: "sentences", "pairs", "triplets" or "scored"; ``files``: {split: (paths...)};
    ``format``, ``columns``, ``header``, ``num_columns``, ``score_range``, ``skip_bad``: as
    ``readers.read_records``.
    """

    kind: str = "pairs"
    files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    format: str | None = None
    columns: Mapping[str, str | int] | None = None
    header: bool | None = None
    num_columns: int | None = None
    score_range: tuple[float, float] | None = None
    skip_bad: bool = False


class EmbedjaxTextFiles(tfds.core.GeneratorBasedBuilder):
    """Pairs / triplets / scored pairs / sentences from tsv, csv, jsonl or txt files (see ``build_text_files``)."""

    name = "embedjax_text_files"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        config = self.builder_config
        if config is None or config.kind not in readers.RECORD_KINDS:
            raise ValueError("EmbedjaxTextFiles needs config=TextFilesConfig(name=..., kind=..., files=...)")
        features = {f: tfds.features.Text() for f in readers.RECORD_KINDS[config.kind][0] if f != "score"}
        if config.kind == "scored":
            features["score"] = tfds.features.Scalar(np.float32)
        features.update(file=tfds.features.Text(), line=tfds.features.Scalar(np.int32))
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(tuple(paths)) for split, paths in self.builder_config.files.items()}

    def _generate_examples(self, paths: Sequence[str]) -> Iterator[tuple[str, dict]]:
        c = self.builder_config
        for i, path in enumerate(paths):
            rows = readers.read_records(path, c.kind, format=c.format, columns=c.columns, header=c.header,
                                        num_columns=c.num_columns, score_range=c.score_range, skip_bad=c.skip_bad)
            for line, row in zip(rows.lines, rows):
                record = {"text_a": row} if isinstance(row, str) else dataclasses.asdict(row)
                yield f"{i:05d}:{line:010d}", {**record, "file": str(path), "line": line}


def _fingerprint(config: TextFilesConfig) -> str:
    """Changes when the options or any file (path, size, modification time) change."""
    h = hashlib.sha256(repr(sorted((k, repr(v)) for k, v in dataclasses.asdict(config).items()
                                   if k != "description")).encode())
    for split in sorted(config.files):
        for p in config.files[split]:
            st = os.stat(p)
            h.update(f"{split}|{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_text_files(
    data_dir,
    name: str,
    kind: str,
    files: Mapping[str, os.PathLike | str | Sequence[os.PathLike | str]],
    **reader_options,
) -> EmbedjaxTextFiles:
    """Builds (or reuses) ``embedjax_text_files/<name>`` under ``data_dir`` and returns the builder.

    ``files``: {split: path or paths}; ``reader_options``: ``format``, ``columns``, ``header``,
    ``num_columns``, ``score_range``, ``skip_bad`` (as ``readers.read_records``). A prepared
    copy is reused only if the options and the files (size, mtime) are unchanged; else it is
    rebuilt. Read it with ``builder.as_data_source(split)`` or
    ``tfds.data_source(f"embedjax_text_files/{name}", split=..., data_dir=data_dir)``.
    """
    files = {s: tuple(str(p) for p in ([v] if isinstance(v, (str, os.PathLike)) else v)) for s, v in files.items()}
    config = TextFilesConfig(name=name, kind=kind, files=files, **reader_options)
    config.description = f"embedjax {kind} from {files} [fingerprint {_fingerprint(config)}]"
    builder = EmbedjaxTextFiles(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if builder.is_prepared() and builder.info.config_description != config.description:
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # regenerate the examples, keep downloads
        builder = EmbedjaxTextFiles(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return builder


BUILDERS = {b.name: b for b in (EmbedjaxStsb, EmbedjaxSick, EmbedjaxTextFiles)}


def prepare(name: str, data_dir, source_dir=None, **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Prepares ``embedjax_stsb`` or ``embedjax_sick`` in ``data_dir`` (array_record) and returns the builder.

    ``source_dir``: a local copy of the raw files (used as TFDS's manual dir). If given, it
    must exist and hold the required files (STS-B: sts-train.csv, sts-dev.csv; SICK:
    SICK_train.txt, SICK_trial.txt; the test files are optional), else ``FileNotFoundError``
    names the directory and the files expected, before anything is built. Only with
    ``source_dir=None`` are the original archives downloaded (needs the internet).
    """
    if name not in ("embedjax_stsb", "embedjax_sick"):
        raise ValueError(f"prepare() knows embedjax_stsb and embedjax_sick; use build_text_files for {name!r}")
    cls = BUILDERS[name]
    config = None
    if source_dir is not None:
        check_source_dir(source_dir, cls.FILES, cls.REQUIRED)
        config = tfds.download.DownloadConfig(manual_dir=os.fspath(Path(source_dir).expanduser()))
    builder = cls(data_dir=os.fspath(data_dir), file_format="array_record", **builder_kwargs)
    builder.download_and_prepare(download_config=config)
    return builder


# ---------------------------------------------------------------------------- any dataset by name


class ColumnSource:
    """Random access to a TFDS data source with its columns renamed to embedjax fields.

    ``columns``: {field: feature path} with field in ``text_a, text_b, text_n, score`` and
    the path a feature key, nested keys joined by "/" (e.g. ``"translation/en"``). Text
    comes back as ``str``, the score as ``float`` (class labels included).
    """

    def __init__(self, source, columns: Mapping[str, str]):
        self.source, self.columns = source, dict(columns)

    def __len__(self) -> int:
        return len(self.source)

    def _map(self, example: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for field, path in self.columns.items():
            value = example
            for key in path.split("/"):
                value = value[key]
            if field == "score":
                out[field] = float(value)
            else:
                out[field] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._map(self.source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        if hasattr(self.source, "__getitems__"):
            return [self._map(e) for e in self.source.__getitems__(indices)]
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"ColumnSource({self.source!r}, columns={self.columns})"


def _feature_paths(features, prefix: str = "") -> list[str]:
    out = []
    for key, feature in features.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(feature, tfds.features.FeaturesDict):
            out.extend(_feature_paths(feature, path + "/"))
    return out


def tfds_source(
    name: str,
    split: str,
    columns: Mapping[str, str] | None = None,
    *,
    data_dir=None,
    download: bool = True,
    builder_kwargs: Mapping[str, Any] | None = None,
) -> ColumnSource:
    """Any TFDS dataset by name as random-access records in embedjax's format.

    ``columns`` maps our fields to the dataset's features, e.g. GLUE STS-B:
    ``{"text_a": "sentence1", "text_b": "sentence2", "score": "label"}``; default: the
    features already named ``text_a`` / ``text_b`` / ``text_n`` / ``score``. With
    ``download`` the dataset is downloaded and prepared as array_record when missing
    (online users). Reading needs no TensorFlow for array_record datasets; the legacy
    public builders may need TensorFlow to *prepare* them.
    """
    kwargs = {"file_format": "array_record", **(builder_kwargs or {})}
    source = tfds.data_source(name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir),
                              download=download, builder_kwargs=kwargs)
    available = _feature_paths(source.dataset_info.features)
    if columns is None:
        columns = {f: f for f in FIELDS if f in available}
        if "text_a" not in columns:
            raise ValueError(f"{name}: no text_a feature; pass columns= mapping text_a (and others) to {available}")
    unknown = [f for f in columns if f not in FIELDS]
    missing = {f: p for f, p in columns.items() if p not in available}
    if unknown or "text_a" not in columns:
        raise ValueError(f"columns must map fields of {FIELDS} (text_a required); got {dict(columns)}")
    if missing:
        raise KeyError(f"{name} ({split}) has no feature(s) {missing}; it has {available}")
    return ColumnSource(source, columns)
