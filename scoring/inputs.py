"""What offline scoring reads: an image, a folder of images, a table of paths or of image bytes, or a CIFAR-10 batch.

Every source streams as chunks of `Record`s, so memory stays bounded whatever the input size.
A record's `source` is the encoded bytes, a path to read them from, or (CIFAR-10 batch files)
the pixels themselves; its `label` is the class index when the input says it.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bundle.images import HEIF, SUFFIXES_OF
from bundle.images import SUFFIXES as IMAGE_SUFFIXES

# a path column may hold local file: URIs (file:/a, file:///a, file://localhost/a, as Spark's binaryFile and
# Path.as_uri() write them): both engines read them as the paths they name; another host's is no local file
FILE_URI = r"^file:(//(localhost)?)?(?=/)"
INTEGRAL = r"^(\d+)\.0*$"  # a label index written as a float ("3.0": pandas writes integers with gaps as floats)


class InputError(ValueError):
    """The input cannot be read as asked; the message says what to change."""


@dataclass(frozen=True)
class Record:
    id: str
    source: bytes | Path | np.ndarray  # encoded image, a file holding one, or uint8 [32, 32, 3] pixels
    label: int | None = None


@dataclass(frozen=True)
class Columns:
    """Column names in tables; each can be changed on the command line."""

    path: str = "path"
    image: str = "image"  # encoded image bytes (binary)
    id: str = "id"
    label: str = "label"  # a class name or index; optional


def read_inputs(source: Path, classes: Sequence[str], columns: Columns = Columns(), chunk: int = 1024) -> Iterator[list[Record]]:
    """Chunks of records from an image, a folder, .csv, .parquet or CIFAR-10 batch file."""
    if source.is_dir():
        return _chunked(folder_records(source, classes), chunk)
    if not source.is_file():
        raise InputError(f"input not found: {source}")
    if source.suffix.lower() == ".csv":
        return _csv(source, classes, columns, chunk)
    if source.suffix.lower() == ".parquet":
        return _parquet(source, classes, columns, chunk)
    if re.fullmatch(r"data_batch_\d+|test_batch", source.name):
        return _chunked(_cifar_batch(source, classes), chunk)
    if source.suffix.lower() in IMAGE_SUFFIXES:  # one image: a row of its own, its id the file name
        return iter([[Record(source.name, source, None)]])
    raise InputError(f"{source}: give an image, a folder of images, a .csv or .parquet table, or a CIFAR-10 data_batch_N/test_batch file")


def _chunked(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def folder_records(root: Path, classes: Sequence[str]) -> Iterator[Record]:
    """Every image file under root, sorted; the label is the parent folder's name when it is a class."""
    index = {name: i for i, name in enumerate(classes)}
    found = walk(root)
    files = sorted(p for p in found.files if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    # what is left out is said, so that a count that falls short is not a surprise
    others = [p for p in found.files if p.suffix.lower() not in IMAGE_SUFFIXES]
    for paths, what in (
        (others, "files without an image suffix"), (found.hidden, "hidden files and folders (names starting with '.')"),
        (found.broken, "links that lead nowhere"), (found.special, "entries that are no regular file (pipes, sockets, devices)"),
        (found.unreadable, "folders that cannot be read"), (found.repeated, "links to folders read under another name (or a loop)"),
    ):  # fmt: skip
        if paths:
            print(f"{len(paths):,} {what} under {root} are not scored (e.g. {file_id(paths[0], root)})", file=sys.stderr)
    if not HEIF and (photos := sum(p.suffix.lower() in SUFFIXES_OF["HEIF"] for p in others)):
        print(f"{photos:,} of the files without an image suffix are HEIC/HEIF photos: install pillow-heif to score them (pip install 'cifar10-serve[heif]')", file=sys.stderr)
    for path in files:
        yield Record(file_id(path, root), path, index.get(path.parent.name) if path.parent != root else None)


class Found(NamedTuple):
    files: list[Path]
    hidden: list[Path]  # names starting with '.': macOS's ._ copies, .git, .Trash
    broken: list[Path]  # links that lead nowhere
    special: list[Path]  # pipes, sockets, devices
    unreadable: list[Path]  # folders the walk cannot list
    repeated: list[Path]  # links to a folder read under another name


def walk(root: Path) -> Found:
    """What is under root. The folders under root are read by their own paths first; then the links to
    folders, each to a real folder not read yet (a loop ends; a link that sorts first does not take a class
    folder's name, its label), and the links found in those, in turn."""
    found, seen, links = Found([], [], [], [], [], []), set(), [root]

    def unreadable(error: OSError) -> None:
        if Path(error.filename) == root:
            raise InputError(f"{root}: cannot be read ({error.strerror})")
        found.unreadable.append(Path(error.filename))

    while links:
        for folder, subfolders, names in os.walk(links.pop(0), onerror=unreadable):  # links to folders are listed, not entered
            if (real := os.path.realpath(folder)) in seen:  # read already, by its own path or another link
                found.repeated.append(Path(folder))
                subfolders[:] = []
                continue
            seen.add(real)
            found.hidden.extend(Path(folder, n) for n in subfolders + names if n.startswith("."))
            subfolders[:] = sorted(n for n in subfolders if not n.startswith("."))
            links += [Path(folder, n) for n in subfolders if os.path.islink(os.path.join(folder, n))]
            for path in (Path(folder, n) for n in names if not n.startswith(".")):
                kind = found.files if path.is_file() else found.broken if path.is_symlink() and not path.exists() else found.special
                kind.append(path)
    return found


def file_id(path: Path, root: Path) -> str:
    """A file's id: its path under root, as text any table can hold (a name that is not UTF-8, as old
    archives make, keeps its bytes as \\x escapes)."""
    return str(path.relative_to(root)).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def local_path(text: str) -> Path:
    """A path column's value as a path: as written, or the one a local file: URI names (still percent-encoded
    where Path.as_uri() wrote it so: scoring.local.read_file reads my%20photo.jpg as my photo.jpg where only that exists)."""
    return Path(re.sub(FILE_URI, "", text))


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """What a label may be: a class name, or its index as text."""
    return {name: i for i, name in enumerate(classes)} | {str(i): i for i in range(len(classes))}


def _label(value, index: dict[str, int]) -> int | None:
    """A class name, or an index as a number or as text (a CSV's "3", a float column's 3.0), read as the
    Spark engine reads it; None for no label, and for anything else, which check_labels refuses before scoring starts."""
    if value is None or isinstance(value, bool) or (isinstance(value, float) and math.isnan(value)):
        return None
    return index.get(re.sub(INTEGRAL, r"\1", str(value).strip()))


def check_labels(columns: Iterable, origin: Path, classes: Sequence[str], name: str) -> None:
    """Refuse a table with a label no class answers to before anything is scored, as the Spark engine does,
    rather than stop part-way through it. `columns`: the label column, batch after batch (pyarrow arrays)."""
    import pyarrow.compute as pc

    index, start = class_index(classes), 0
    for column in columns:
        for value in pc.unique(column).to_pylist():  # each distinct value once
            if not (value is None or (isinstance(value, float) and math.isnan(value))) and _label(value, index) is None:
                raise InputError(
                    f"{origin}: row {start + pc.index(column, value).as_py()}: label {value!r} in column {name!r} is neither a class "
                    f"name ({', '.join(classes)}) nor an index 0..{len(classes) - 1}; fix it, or leave the label empty"
                )
        start += len(column)


def _table_records(table, origin: Path, classes: Sequence[str], columns: Columns, start: int) -> Iterator[Record]:
    import pyarrow as pa

    names, index = table.column_names, class_index(classes)
    if columns.image in names:
        kind = table.schema.field(columns.image).type
        if not any(check(kind) for check in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view, pa.types.is_fixed_size_binary)):
            raise InputError(
                f"{origin}: column {columns.image!r} holds {kind}, not image bytes (a CSV cannot hold bytes): decode text such as "
                f"base64 into a binary column, or give the images' file paths in a {columns.path!r} column"
            )
        sources = table.column(columns.image).to_pylist()
    elif columns.path in names:
        # relative paths are relative to the table's folder, so a table travels with its images; made absolute, as
        # Spark's engine reports them, so that a path's id is the same whichever engine scored it
        paths = [None if p is None else local_path(p) for p in table.column(columns.path).to_pylist()]
        sources = [None if p is None else (p if p.is_absolute() else origin.parent.absolute() / p) for p in paths]
    else:
        raise InputError(
            f"{origin}: no column {columns.image!r} (image bytes) or {columns.path!r} (paths); it has {', '.join(names)}. "
            f"Name yours with --image-column or --path-column."
        )
    ids = table.column(columns.id).to_pylist() if columns.id in names else [None] * len(sources)
    labels = table.column(columns.label).to_pylist() if columns.label in names else [None] * len(sources)
    for row, (source, id_, label) in enumerate(zip(sources, ids, labels)):
        fallback = str(source) if isinstance(source, Path) else f"row {start + row}"
        yield Record(str(id_) if id_ is not None else fallback, source if source is not None else b"", _label(label, index))


def _csv(path: Path, classes, columns: Columns, chunk: int) -> Iterator[list[Record]]:
    if columns.label in _csv_reader(path, columns).schema.names:  # a first pass over the labels alone
        check_labels((batch.column(0) for batch in _csv_batches(path, columns, only=columns.label)), path, classes, columns.label)
    start = 0
    for batch in _csv_batches(path, columns):
        records = list(_table_records(batch, path, classes, columns, start))
        start += len(records)
        yield from _chunked(iter(records), chunk)


def _csv_reader(path: Path, columns: Columns, only: str | None = None):
    import pyarrow as pa
    from pyarrow import csv

    # ids, paths and labels as text, as Spark reads a CSV: types inferred from the first block would
    # turn an id "001" into 1, and fail at an "x7" further down
    text = csv.ConvertOptions(
        column_types=dict.fromkeys((columns.id, columns.path, columns.label), pa.string()), strings_can_be_null=True,
        null_values=[""], include_columns=[only] if only else None,
    )  # fmt: skip
    try:
        return csv.open_csv(path, read_options=csv.ReadOptions(block_size=1 << 20), convert_options=text)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise InputError(f"{path}: not a readable CSV ({exc})") from exc


def _csv_batches(path: Path, columns: Columns, only: str | None = None) -> Iterator:
    """A CSV's record batches (of one column, `only`), a malformed row named by where it is."""
    reader, rows = _csv_reader(path, columns, only), 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except Exception as exc:  # a malformed row further down: ArrowInvalid
            raise InputError(f"{path}: unreadable after row {rows} ({exc})") from exc
        rows += batch.num_rows
        yield batch


def _parquet(path: Path, classes, columns: Columns, chunk: int) -> Iterator[list[Record]]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
    if columns.label in file.schema_arrow.names:
        check_labels((b.column(0) for b in file.iter_batches(batch_size=1 << 16, columns=[columns.label])), path, classes, columns.label)
    start = 0
    for batch in file.iter_batches(batch_size=chunk):
        records = list(_table_records(batch, path, classes, columns, start))
        start += len(records)
        yield records


def _cifar_batch(path: Path, classes: Sequence[str]) -> Iterator[Record]:
    """The python-pickle layout's data_batch_N / test_batch: pixels and labels, no decoding."""
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="latin1")  # the official format; only files named like it
        content = {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}
        data, labels = np.asarray(content["data"], dtype=np.uint8), list(content["labels"])
    except Exception as exc:
        raise InputError(
            f"{path}: not a CIFAR-10 batch file in the python layout ({type(exc).__name__}: {exc})"
        ) from exc
    pixels = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    for i, (image, label) in enumerate(zip(pixels, labels)):
        yield Record(f"{path.name}:{i}", np.ascontiguousarray(image), int(label) if 0 <= label < len(classes) else None)
