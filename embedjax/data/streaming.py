"""Random-access record sources over files through an index: training data of any size.

``readers.read_records`` parses a whole file into one Python object per record: fine for STS-B,
gigabytes for ten million pairs. The sources here hold no record; they keep an index and parse
record ``i`` when it is read, so they plug into ``pipeline.train_pipeline`` (``len`` and
``__getitem__``) and its seeded shuffle, host sharding and exact resume like any list:

- ``TextRecords`` (jsonl, tsv, csv, txt): an index of the byte offset of every non-blank line,
  built in one vectorised pass over the raw bytes (numpy, no Python loop per line) and saved as
  ``<file>.index.npy`` beside the file, or under ``index_dir`` / ``default_index_dir()`` when
  that directory is read-only. The index is memory-mapped; a record is read with ``os.pread``.
- ``ArrowRecords`` (Parquet files; Arrow datasets, the folder ``datasets.Dataset.save_to_disk``
  writes, or one ``.arrow`` file): Arrow record batches memory-mapped, a row read as one Python
  dict. A Parquet row cannot be read alone (its column chunks are encoded and compressed a page
  at a time), so the columns a run reads are converted once into an uncompressed Arrow IPC
  file, ``<file>.<digest of the columns>.arrow`` (placed as a text index is), and that is
  memory-mapped.

Every record is exactly what ``read_records`` returns for the same file, kind and options (the
same ``Pair`` / ``Triplet`` / ``ScoredPair`` / ``LabelledPair`` / ``DistillRecord`` / ``str``,
the same column mapping, header rule and checks): each source parses with ``read_records``' own
parser (``readers.record_parser``). A bad row raises the same ``DataError`` (``file:line:
what was expected``), when that record is read; for Parquet and Arrow the line is the 1-based
row (record ``i`` is row ``i + 1``; an Arrow dataset folder is named as a whole). The header and
the first record are parsed on opening, so what the first row fixes for the rest (column count,
number of hard negatives) is fixed as ``read_records`` fixes it. ``skip_bad`` (``WithoutBadRecords``,
``open_records(skip_bad=True)``) checks every record once on opening and keeps the positions of
the bad ones, so a run is not stopped hours in by a malformed line.

An index (or an Arrow cache) records its source file's size and modification time and is
rebuilt when either changes. Builds are atomic (written to a temporary file, then renamed),
so a killed build or several hosts building at once leave a valid index or none.

Memory: a text source holds 8 bytes of index per record (memory-mapped, paged in on use) plus the
page cache of the file; an Arrow source only the page cache. See ``benchmarks/data_stream.py``.

``open_records(path, kind, ...)`` picks the source by format (``infer_format``: the suffix;
a folder is an Arrow dataset); training configs reach it through ``data.streaming`` (and
``data.format`` parquet / arrow, which always stream; ``embedjax.train.sources``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import operator
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from embedjax.data import readers
from embedjax.data.readers import DataError

TEXT_FORMATS = readers.FORMATS  # tsv, csv, jsonl, txt
COLUMNAR_FORMATS = ("parquet", "arrow")
FORMATS = (*TEXT_FORMATS, *COLUMNAR_FORMATS)
_COLUMNAR_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow"}

INDEX_VERSION = 1
_MAGIC = 0x31584449_4A45  # "EJIDX1", little-endian
_HEADER = 8               # int64 slots before the offsets: magic, version, size, mtime_ns, rows, blanks, 0, 0
_CHUNK = 1 << 20          # bytes scanned at a time (1 MiB: its temporaries stay in the CPU's cache)
_PARQUET_BATCH = 1 << 16  # rows per record batch of the Arrow cache of a Parquet file
_READ = 4096              # bytes read at a record's offset first (more until its newline)


# ---------------------------------------------------------------------------- formats and places


def infer_format(path, format: str | None = None, *, kind: str | None = None) -> str:
    """``format`` if given (one of ``FORMATS``), else "arrow" for a folder or a ``.arrow`` file,
    "parquet" for ``.parquet`` / ``.pq``, else ``readers.infer_format`` ("txt" for ``kind``
    "sentences" when the suffix says nothing)."""
    if format is not None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        return format
    path = Path(path)
    if path.is_dir():
        return "arrow"
    found = _COLUMNAR_SUFFIXES.get(path.suffix.lower())
    if found:
        return found
    try:
        return readers.infer_format(path, None, default="txt" if kind == "sentences" else None)
    except ValueError:
        raise ValueError(f"{path}: cannot tell the format from the suffix; pass format= one of {FORMATS}") from None


def is_columnar(path, format: str | None = None) -> bool:
    """Whether ``path`` (in ``format``, default from the suffix) is Parquet or Arrow: a format
    that is always read through an index, never parsed whole."""
    if format is not None:
        return format in COLUMNAR_FORMATS
    path = Path(path)
    return path.is_dir() or path.suffix.lower() in _COLUMNAR_SUFFIXES


def default_index_dir() -> Path:
    """Where indexes go when the data's own folder is read-only: ``$EMBEDJAX_CACHE/index``, else
    ``~/.cache/embedjax/data/index`` (beside the downloads, ``download.cache_dir``)."""
    from embedjax.data.download import cache_dir

    return cache_dir() / "index"


def _places(path: Path, suffix: str, index_dir) -> list[Path]:
    """Where the index of ``path`` may live, in lookup order: beside it, then the index folder
    (``index_dir`` given: there only), named by the absolute path so two files never share one."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
    cached = lambda d: Path(d).expanduser() / f"{digest}-{path.name}{suffix}"  # noqa: E731
    if index_dir is not None:
        return [cached(index_dir)]
    return [path.with_name(path.name + suffix), cached(default_index_dir())]


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def _write_atomic(target: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``target``, then renamed over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_somewhere(places: list[Path], write) -> Path:
    """``write`` to the first of ``places`` that takes it (a read-only folder is passed over)."""
    errors = []
    for target in places:
        try:
            _write_atomic(target, write)
            return target
        except OSError as err:
            errors.append(f"{target}: {err.strerror or err}")
    raise OSError("cannot write an index anywhere: " + "; ".join(errors) + " (pass index_dir= a writable folder, "
                  "data.index_dir in a training config)")


# ---------------------------------------------------------------------------- the line index


def scan_lines(path) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, blanks)`` of a text file: the byte offset where each non-blank line starts
    (int64, in file order) and the 1-based numbers of the blank lines (whitespace only, as
    ``bytes.strip`` sees it). Lines end at ``\\n``; text after the last newline is a line.

    One pass over the raw bytes, ``_CHUNK`` at a time, all in numpy: newline positions by
    comparison, each line's "has a byte above space" by ``logical_or.reduceat``. The rare line
    with no such byte (empty, whitespace, control characters) is checked exactly afterwards.
    """
    path = Path(path)
    size = os.path.getsize(path)
    starts_parts, blank_parts, suspects = [], [], []
    line_start = 0      # where the line being scanned starts
    has_text = False    # whether it has a byte above space so far
    lines_before = 0    # lines finished before it
    buffer = np.empty(min(_CHUNK, max(size, 1)), np.uint8)
    with open(path, "rb") as f:
        lo = 0
        while lo < size:
            got = f.readinto(memoryview(buffer))
            if not got:
                break
            part = buffer[:got]
            newlines = np.flatnonzero(part == 10)
            seg = np.concatenate(([0], newlines + 1))
            seg = seg[seg < got]  # segment k < len(newlines) ends at newline k; one more is a line's unfinished head
            has = np.logical_or.reduceat(part > 32, seg)
            k = len(newlines)
            if k:
                text = has[:k].copy()
                text[0] |= has_text
                starts = np.concatenate(([line_start], lo + newlines[:-1] + 1)).astype(np.int64)
                numbers = lines_before + 1 + np.arange(k, dtype=np.int64)
                starts_parts.append(starts[text])
                ends = lo + newlines.astype(np.int64)
                empty = ends == starts
                blank_parts.append(numbers[~text & empty])
                odd = ~text & ~empty
                if odd.any():
                    suspects.append(np.stack([starts[odd], ends[odd], numbers[odd]], 1))
                lines_before += k
                line_start, has_text = lo + int(newlines[-1]) + 1, False
            if len(seg) > k:  # the chunk ends inside a line
                has_text |= bool(has[k])
            lo += got
        if line_start < size:  # a last line without a newline
            if has_text:
                starts_parts.append(np.array([line_start], np.int64))
            else:
                suspects.append(np.array([[line_start, size, lines_before + 1]], np.int64))
        if suspects:  # lines of bytes <= 32 only: blank unless one is a control character
            found_text, found_blank = [], []
            for start, end, number in np.concatenate(suspects).tolist():
                f.seek(start)
                (found_text if f.read(end - start).strip() else found_blank).append((start, number))
            starts_parts.append(np.array([s for s, _ in found_text], np.int64))
            blank_parts.append(np.array([n for _, n in found_blank], np.int64))
    starts = np.concatenate(starts_parts) if starts_parts else np.zeros(0, np.int64)
    blanks = np.concatenate(blank_parts) if blank_parts else np.zeros(0, np.int64)
    if suspects:  # merged in from the end: back into file order
        starts.sort()
        blanks.sort()
    return starts.astype(np.int64, copy=False), blanks.astype(np.int64, copy=False)


class LineIndex:
    """The non-blank lines of a text file: ``starts[j]`` (int64 byte offset of line j, memory-mapped)
    and ``line(j)`` (its 1-based line number, from the blank lines before it). ``file``: where the
    index is stored; ``built``: whether it was (re)built by this call.

    ``LineIndex.open(path, index_dir=None)`` loads the stored index when it matches the file's
    size and modification time, else scans the file (``scan_lines``) and stores the index.
    """

    def __init__(self, path: Path, starts: np.ndarray, blanks: np.ndarray, file: Path | None, built: bool):
        self.path, self.starts, self.blanks, self.file, self.built = path, starts, blanks, file, built
        # blank line s_m lies before non-blank line j iff the non-blank lines before it (s_m - 1 - m) <= j
        self._blank_key = blanks - 1 - np.arange(len(blanks), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, j: int) -> int:
        """The 1-based line number of non-blank line ``j``."""
        if not len(self._blank_key):
            return int(j) + 1
        return int(j) + 1 + int(np.searchsorted(self._blank_key, j, side="right"))

    @classmethod
    def open(cls, path, index_dir=None) -> LineIndex:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        stamp = _stamp(path)
        places = _places(path, ".index.npy", index_dir)
        for place in places:
            loaded = _load_index(place, stamp)
            if loaded is not None:
                return cls(path, *loaded, file=place, built=False)
        starts, blanks = scan_lines(path)
        if _stamp(path) != stamp:
            raise RuntimeError(f"{path} changed while it was being indexed; open it again once it is written")
        header = np.array([_MAGIC, INDEX_VERSION, *stamp, len(starts), len(blanks), 0, 0], np.int64)

        def write(tmp: Path) -> None:  # a .npy file, filled through a memory map (no third copy in memory)
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(_HEADER + len(starts) + len(blanks),))
            out[:_HEADER], out[_HEADER:_HEADER + len(starts)], out[_HEADER + len(starts):] = header, starts, blanks
            out.flush()
            del out

        file = _save_somewhere(places, write)
        del starts, blanks
        loaded = _load_index(file, stamp)
        return cls(path, *loaded, file=file, built=True)


def _load_index(place: Path, stamp: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(starts memory-mapped, blanks) from an index file that matches ``stamp``, else None."""
    if not place.is_file():
        return None
    try:
        array = np.load(place, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if array.dtype != np.int64 or array.ndim != 1 or len(array) < _HEADER:
        return None
    magic, version, size, mtime, rows, blanks = (int(x) for x in array[:6])
    if (magic, version, (size, mtime)) != (_MAGIC, INDEX_VERSION, stamp) or len(array) != _HEADER + rows + blanks:
        return None
    return array[_HEADER:_HEADER + rows], np.array(array[_HEADER + rows:])


def line_index(path, index_dir=None) -> LineIndex:
    """``LineIndex.open``: the (stored or rebuilt) index of a text file's non-blank lines."""
    return LineIndex.open(path, index_dir)


# ---------------------------------------------------------------------------- text files


def _index_of(i, n: int) -> int:
    i = operator.index(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"record {i} out of range (0..{n - 1})")
    return i


class TextRecords(Sequence):
    """The records of a jsonl / tsv / csv / txt file, read one at a time through its ``LineIndex``.

    ``TextRecords(path, kind, format=, columns=, header=, num_columns=, score_range=, index_dir=)``:
    the arguments of ``readers.read_records`` (less ``skip_bad`` / ``keep_blank``: ``WithoutBadRecords``
    skips), and ``index_dir`` (where the index goes; default beside the file, else
    ``default_index_dir()``). ``check_first=False``: the first row is not parsed on opening.
    ``self[i]`` equals ``read_records(...)[i]``; ``line(i)`` is record i's line in the file;
    ``index`` the ``LineIndex``. Picklable (the index is opened again, not rebuilt).
    """

    def __init__(self, path, kind: str, *, format: str | None = None, columns: Mapping[str, str | int] | None = None,
                 header: bool | None = None, num_columns: int | None = None,
                 score_range: tuple[float, float] | None = None, index_dir=None, check_first: bool = True):
        self.path, self.kind = Path(path), kind
        self._args = dict(format=format, columns=None if columns is None else dict(columns), header=header,
                          num_columns=num_columns, score_range=score_range, index_dir=index_dir,
                          check_first=check_first)
        self.parser = readers.record_parser(self.path, kind, format=format, columns=columns, header=header,
                                            num_columns=num_columns, score_range=score_range)
        self.format = self.parser.format
        if self.format not in TEXT_FORMATS:
            raise ValueError(f"TextRecords reads {TEXT_FORMATS}, not {self.format!r} (ArrowRecords reads it)")
        self.index = LineIndex.open(self.path, index_dir)
        if len(self.index) == 0:
            raise DataError(self.path, None, "file is empty (expected at least one row)")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self._first = 0
        if self.parser.take_header is not None:
            number, text = self._text(0)
            self.parser.take_header(number, text)
            self._first = 1
        self._n = len(self.index) - self._first
        if self._n == 0:
            raise DataError(self.path, None, "no usable rows (the file has a header but no rows; expected at least one)")
        if check_first:
            self[0]  # the first row fixes the column count and the number of negatives, as in read_records

    def _text(self, j: int) -> tuple[int, str]:
        """(line number, decoded text) of non-blank line ``j``: read with ``os.pread`` from its
        offset to its newline (thread-safe; the page cache holds the file, not this process)."""
        start, size = int(self.index.starts[j]), _READ
        while True:
            raw = os.pread(self._fd, size, start)
            end = raw.find(b"\n")
            if end >= 0:
                raw = raw[:end]
                break
            if start + len(raw) >= self._size:
                break
            size *= 4
        number = self.index.line(j)
        return number, readers._decode(self.path, number, raw.rstrip(b"\r"))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        number, text = self._text(_index_of(i, self._n) + self._first)
        return self.parser.parse_line(number, text)

    def line(self, i: int) -> int:
        """The 1-based line of record ``i`` in the file."""
        return self.index.line(_index_of(i, self._n) + self._first)

    def scores(self) -> np.ndarray:
        """Every record's score (float64; one pass over the file, a bad row raising its ``DataError``)."""
        if "score" not in readers.RECORD_KINDS[self.kind][0]:
            raise ValueError(f"kind {self.kind!r} records have no score")
        return np.fromiter((self[i].score for i in range(self._n)), np.float64, self._n)

    def close(self) -> None:
        """Closes the file (the source is unusable after)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self, _close=os.close):  # os may be gone at interpreter exit: keep a reference
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            _close(fd)

    def __getstate__(self):
        return {"path": self.path, "kind": self.kind, "args": self._args}

    def __setstate__(self, state):
        self.__init__(state["path"], state["kind"], **state["args"])

    def __repr__(self) -> str:
        return f"TextRecords({str(self.path)!r}, {self.kind!r}, format={self.format!r}, records={self._n})"


# ---------------------------------------------------------------------------- Parquet and Arrow


def arrow_files(path) -> list[Path]:
    """The Arrow IPC files of an Arrow dataset: a ``save_to_disk`` folder's shards in
    ``state.json``'s order (else its ``*.arrow`` files sorted), or the one ``.arrow`` file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    state = path / "state.json"
    if state.is_file():
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(state, None, f"unreadable state.json ({err}): expected the one "
                                         "datasets.Dataset.save_to_disk writes, with _data_files") from None
        files = [path / name for name in names]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(path, None, "no Arrow files (expected datasets.Dataset.save_to_disk's data-*.arrow, "
                                    "or a state.json naming them)")
    return files


def _open_ipc(file: Path):
    """The record batches of one Arrow IPC file, file or stream format, memory-mapped (zero copy)."""
    import pyarrow as pa

    source = pa.memory_map(str(file), "r")
    if source.read(6) == b"ARROW1":
        source.seek(0)
        reader = pa.ipc.open_file(source)
        return reader.schema, [reader.get_batch(i) for i in range(reader.num_record_batches)]
    source.seek(0)
    reader = pa.ipc.open_stream(source)
    return reader.schema, list(reader)


def parquet_cache(path, columns: Sequence[str], index_dir=None) -> Path:
    """The uncompressed Arrow IPC file of ``columns`` of a Parquet file (built on first use,
    rebuilt when the Parquet file's size or modification time changes): ``<file>.<columns
    digest>.arrow`` beside it, else under ``index_dir`` / ``default_index_dir()``. Converted
    a batch at a time, the Parquet file read a buffer at a time (not a row group at once), so
    memory stays bounded by one batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    stamp = _stamp(path)
    columns = list(dict.fromkeys(columns))
    digest = hashlib.sha1(json.dumps(columns).encode()).hexdigest()[:8]
    tag = json.dumps({"version": INDEX_VERSION, "size": stamp[0], "mtime_ns": stamp[1], "columns": columns})
    places = _places(path, f".{digest}.arrow", index_dir)
    for place in places:
        if place.is_file():
            try:
                with pa.memory_map(str(place), "r") as f:
                    meta = pa.ipc.open_file(f).schema.metadata or {}
            except (OSError, pa.ArrowInvalid):
                continue
            if meta.get(b"embedjax") == tag.encode():
                return place
    parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)  # read a column chunk a MiB at a time

    def write(tmp: Path) -> None:
        schema = parquet.schema_arrow
        schema = pa.schema([schema.field(c) for c in columns], metadata={"embedjax": tag})
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
                writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=schema))

    place = _save_somewhere(places, write)
    if _stamp(path) != stamp:
        raise RuntimeError(f"{path} changed while it was being converted; open it again once it is written")
    return place


class ArrowRecords(Sequence):
    """The records of a Parquet file or an Arrow dataset, one row at a time from memory-mapped
    Arrow record batches.

    ``ArrowRecords(path, kind, format=, columns=, score_range=, index_dir=)``: ``path`` a
    ``.parquet`` file (its columns converted once: ``parquet_cache``) or an Arrow dataset
    (``arrow_files``); ``columns`` maps fields to column names (or 0-based column positions),
    default the field names, as jsonl keys; each row is parsed as ``read_records`` parses a
    jsonl object with those keys (a list column is a list: several negatives, teacher scores).
    ``self[i]`` is row ``i + 1`` of the data; ``files``: the Arrow files mapped; ``self.columns``:
    {field: column name}. Picklable (reopened, not converted again).
    """

    def __init__(self, path, kind: str, *, format: str | None = None, columns: Mapping[str, str | int] | None = None,
                 score_range: tuple[float, float] | None = None, index_dir=None, check_first: bool = True):
        self.path, self.kind = Path(path), kind
        self._args = dict(format=format, columns=None if columns is None else dict(columns), score_range=score_range,
                          index_dir=index_dir, check_first=check_first)
        self.format = infer_format(self.path, format, kind=kind)
        if self.format not in COLUMNAR_FORMATS:
            raise ValueError(f"ArrowRecords reads {COLUMNAR_FORMATS}, not {self.format!r} (TextRecords reads it)")
        if kind not in readers.RECORD_KINDS:
            raise ValueError(f"kind must be one of {tuple(readers.RECORD_KINDS)}, got {kind!r}")
        fields = readers.RECORD_KINDS[kind][0]
        if self.format == "parquet":
            import pyarrow.parquet as pq

            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no such file")
            names = pq.ParquetFile(self.path).schema_arrow.names
            mapping = self._mapping(fields, columns, names)
            self.files = [parquet_cache(self.path, list(dict.fromkeys(mapping.values())), index_dir)]
        else:
            self.files = arrow_files(self.path)
            mapping = None
        self._columns, offsets = [], [0]
        for file in self.files:
            schema, batches = _open_ipc(file)
            if mapping is None:  # an Arrow dataset: its first file's schema names the columns
                mapping = self._mapping(fields, columns, schema.names)
            self._names = list(dict.fromkeys(mapping.values()))
            missing = [c for c in self._names if c not in schema.names]
            if missing:
                raise DataError(file, None, f"missing columns {missing}: expected the columns of {self.files[0]}")
            for batch in batches:
                if batch.num_rows:
                    self._columns.append(tuple(batch.column(c) for c in self._names))
                    offsets.append(offsets[-1] + batch.num_rows)
        self.columns = mapping  # {field: column name}
        self._offsets = offsets
        self._n = offsets[-1]
        if self._n == 0:
            raise DataError(self.path, None, "no rows (expected at least one)")
        self.parser = readers.record_parser(self.path, kind, format="jsonl", columns=mapping, score_range=score_range)
        if check_first:
            self[0]  # the first row fixes the number of negatives, as in read_records

    def _mapping(self, fields, columns, names) -> dict[str, str]:
        """{field: column name}: the fields themselves by default; a position is the schema's."""
        if columns is None:
            columns = {f: f for f in fields}
        columns = dict(columns)
        unknown, missing = set(columns) - set(fields), [f for f in fields if f not in columns]
        if unknown or missing:
            raise ValueError(f"columns for kind {self.kind!r} must map exactly {fields}; "
                             f"unknown {sorted(unknown)}, missing {missing}")
        out = {}
        for field in fields:
            key = columns[field]
            if isinstance(key, bool) or not isinstance(key, (str, int)) or (isinstance(key, int) and key < 0):
                raise ValueError(f"column of {field!r} must be a name or a 0-based index, got {key!r}")
            if isinstance(key, int):
                if key >= len(names):
                    raise DataError(self.path, None, f"missing column {key + 1} (for {field}): the data has "
                                                     f"{len(names)} columns {names}")
                key = names[key]
            elif key not in names:
                raise DataError(self.path, None, f"missing column {key!r} (for {field}): expected it among the "
                                                 f"columns {names}")
            out[field] = key
        return out

    def __len__(self) -> int:
        return self._n

    def row(self, i: int) -> dict[str, Any]:
        """Record ``i``'s row as read from the data, ``{column: value}`` (unparsed)."""
        i = _index_of(i, self._n)
        k = bisect.bisect_right(self._offsets, i) - 1
        j = i - self._offsets[k]
        return {name: column[j].as_py() for name, column in zip(self._names, self._columns[k])}

    def __getitem__(self, i):
        i = _index_of(i, self._n)
        return self.parser.parse_row(i + 1, self.row(i))

    def line(self, i: int) -> int:
        """Record ``i``'s 1-based row, the "line" of its ``DataError``."""
        return _index_of(i, self._n) + 1

    def scores(self) -> np.ndarray:
        """Every record's score (float64): the score column read whole when it is numeric (its
        finite values; a bad one raises its ``DataError`` when its record is read), else a pass
        over the records."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if "score" not in readers.RECORD_KINDS[self.kind][0]:
            raise ValueError(f"kind {self.kind!r} records have no score")
        c = self._names.index(self.columns["score"])
        chunks = [cols[c] for cols in self._columns]
        if all(pa.types.is_integer(a.type) or pa.types.is_floating(a.type) for a in chunks):
            values = np.concatenate([pc.cast(a, pa.float64()).to_numpy(zero_copy_only=False) for a in chunks])
            return values[np.isfinite(values)]
        return np.fromiter((self[i].score for i in range(self._n)), np.float64, self._n)

    def __getstate__(self):
        return {"path": self.path, "kind": self.kind, "args": self._args}

    def __setstate__(self, state):
        self.__init__(state["path"], state["kind"], **state["args"])

    def __repr__(self) -> str:
        return f"ArrowRecords({str(self.path)!r}, {self.kind!r}, format={self.format!r}, records={self._n})"


class WithoutBadRecords(Sequence):
    """A streaming source with its bad records left out: ``read_records(..., skip_bad=True)``'s
    records, still read one at a time.

    Opening checks every record once, in file order (a progress bar; about the cost of reading the
    file, once per process), and keeps only the positions of the bad ones: a record past ``k`` bad
    ones is ``source[i + k]``, found by a binary search, so memory grows with the bad records, not
    the file. As ``read_records``, the bad rows are counted (``skipped``) and logged, a file with no
    good row raises ``DataError``, and what the first row fixes (the column count, the number of
    hard negatives of the first good row) is fixed the same way. Picklable (the positions travel;
    the file is not checked again)."""

    def __init__(self, source: TextRecords | ArrowRecords, *, progress: bool = True, _bad=None):
        self.source, self.path, self.kind = source, source.path, source.kind
        self.format = source.format
        if _bad is None:
            _bad, first = self._check(progress)
            if len(_bad):
                readers.log.warning("%s: skipped %d bad row(s); the first: %s", self.path, len(_bad), first)
        else:
            self._fix_first_row()
        self._bad = np.asarray(_bad, np.int64)
        self.skipped = len(self._bad)
        self._n = len(source) - self.skipped
        if self._n == 0:
            raise DataError(self.path, None, f"no usable rows (all {self.skipped} row(s) were bad; expected at least one)")
        self._key = self._bad - np.arange(self.skipped, dtype=np.int64)  # bad ones before good record i: <= i

    def _check(self, progress: bool) -> tuple[list[int], DataError | None]:
        from tqdm.auto import tqdm

        bad, first = [], None
        for j in tqdm(range(len(self.source)), desc=f"checking {self.path.name}", unit="rec", unit_scale=True,
                      mininterval=1.0, disable=not progress or len(self.source) < 100_000):
            try:
                self.source[j]
            except DataError as err:
                bad.append(j)
                first = first or err
        return bad, first

    def _fix_first_row(self) -> None:
        """Reads the records up to the first good one, as the check did: what they fix in the parser."""
        for j in range(len(self.source)):
            try:
                self.source[j]
                return
            except DataError:
                continue

    def _position(self, i) -> int:
        i = _index_of(i, self._n)
        return i + int(np.searchsorted(self._key, i, side="right"))

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self.source[self._position(i)]

    def line(self, i: int) -> int:
        """The 1-based line (Parquet / Arrow: row) of record ``i`` in the file."""
        return self.source.line(self._position(i))

    def scores(self) -> np.ndarray:
        """Every good record's score (float64)."""
        if "score" not in readers.RECORD_KINDS[self.kind][0]:
            raise ValueError(f"kind {self.kind!r} records have no score")
        return np.fromiter((self[i].score for i in range(self._n)), np.float64, self._n)

    def __getstate__(self):
        return {"source": self.source, "bad": self._bad}

    def __setstate__(self, state):
        self.__init__(state["source"], _bad=state["bad"])

    def __repr__(self) -> str:
        return f"WithoutBadRecords({self.source!r}, skipped={self.skipped})"


def open_records(path, kind: str, *, format: str | None = None, columns: Mapping[str, str | int] | None = None,
                 header: bool | None = None, num_columns: int | None = None,
                 score_range: tuple[float, float] | None = None, index_dir=None,
                 skip_bad: bool = False) -> TextRecords | ArrowRecords | WithoutBadRecords:
    """The streaming source of a file: ``ArrowRecords`` for Parquet / Arrow, ``TextRecords`` for
    jsonl / tsv / csv / txt (``infer_format``). Arguments as ``readers.read_records``'s
    (``header`` / ``num_columns``: tsv / csv only) plus ``index_dir``; ``skip_bad=True`` checks
    every record on opening and leaves the bad ones out (``WithoutBadRecords``)."""
    fmt = infer_format(path, format, kind=kind)
    if fmt in COLUMNAR_FORMATS:
        if header is not None or num_columns is not None:
            raise ValueError(f"header and num_columns apply to tsv/csv files, not {fmt}")
        source = ArrowRecords(path, kind, format=fmt, columns=columns, score_range=score_range, index_dir=index_dir,
                              check_first=not skip_bad)
    else:
        source = TextRecords(path, kind, format=fmt, columns=columns, header=header, num_columns=num_columns,
                             score_range=score_range, index_dir=index_dir, check_first=not skip_bad)
    return WithoutBadRecords(source) if skip_bad else source


__all__ = ["COLUMNAR_FORMATS", "FORMATS", "ArrowRecords", "LineIndex", "TextRecords", "WithoutBadRecords", "arrow_files",
           "default_index_dir", "infer_format", "is_columnar", "line_index", "open_records", "parquet_cache",
           "scan_lines"]
