"""What offline scoring reads: an image, a folder of images, a table of paths or of image bytes, or a CIFAR-10 batch.

Every source streams as chunks of `Record`s, so memory stays bounded whatever the input size.
A record's `source` is the encoded bytes, a path to read them from, or (CIFAR-10 batch files)
the pixels themselves; its `label` is the class index when the input says it.
"""

from __future__ import annotations

import pickle
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle.images import HEIF
from bundle.images import SUFFIXES as IMAGE_SUFFIXES


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
    every = [p for p in root.rglob("*") if p.is_file()]
    files = sorted(p for p in every if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    if others := [p for p in every if p.suffix.lower() not in IMAGE_SUFFIXES]:  # said, so that a count that falls short is not a surprise
        print(f"{len(others):,} files under {root} have no image suffix and are not scored (e.g. {others[0].relative_to(root)})", file=sys.stderr)
        if not HEIF and (photos := sum(p.suffix.lower() in (".heic", ".heif", ".hif") for p in others)):
            print(f"{photos:,} of them are HEIC/HEIF photos: install pillow-heif to score them (pip install 'cifar10-serve[heif]')", file=sys.stderr)
    for path in files:
        yield Record(str(path.relative_to(root)), path, index.get(path.parent.name) if path.parent != root else None)


def _label(value, index: dict[str, int], classes: Sequence[str]) -> int | None:
    """A class name, or an index as a number or as text (a CSV's "3"), read as the Spark engine reads it."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip() in index:
        return index[value.strip()]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(classes):
        return int(value)
    raise InputError(f"label {value!r} is neither a class name ({', '.join(classes)}) nor an index 0..{len(classes) - 1}")


def _table_records(table, origin: Path, classes: Sequence[str], columns: Columns, start: int) -> Iterator[Record]:
    names = table.column_names
    index = {name: i for i, name in enumerate(classes)} | {str(i): i for i in range(len(classes))}
    if columns.image in names:
        sources = table.column(columns.image).to_pylist()
    elif columns.path in names:
        # relative paths are relative to the table's folder, so a table travels with its images; made absolute, as
        # Spark's engine reports them, so that a path's id is the same whichever engine scored it
        sources = [None if p is None else (origin.parent.absolute() / p if not Path(p).is_absolute() else Path(p)) for p in table.column(columns.path).to_pylist()]
    else:
        raise InputError(
            f"{origin}: no column {columns.image!r} (image bytes) or {columns.path!r} (paths); it has {', '.join(names)}. "
            f"Name yours with --image-column or --path-column."
        )
    ids = table.column(columns.id).to_pylist() if columns.id in names else [None] * len(sources)
    labels = table.column(columns.label).to_pylist() if columns.label in names else [None] * len(sources)
    for row, (source, id_, label) in enumerate(zip(sources, ids, labels)):
        fallback = str(source) if isinstance(source, Path) else f"row {start + row}"
        yield Record(str(id_) if id_ is not None else fallback, source if source is not None else b"", _label(label, index, classes))


def _csv(path: Path, classes, columns: Columns, chunk: int) -> Iterator[list[Record]]:
    import pyarrow as pa
    from pyarrow import csv

    # ids, paths and labels as text, as Spark reads a CSV: types inferred from the first block would
    # turn an id "001" into 1, and fail at an "x7" further down
    text = csv.ConvertOptions(column_types=dict.fromkeys((columns.id, columns.path, columns.label), pa.string()), strings_can_be_null=True, null_values=[""])
    try:
        reader = csv.open_csv(path, read_options=csv.ReadOptions(block_size=1 << 20), convert_options=text)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise InputError(f"{path}: not a readable CSV ({exc})") from exc
    start = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except Exception as exc:  # a malformed row further down: ArrowInvalid
            raise InputError(f"{path}: unreadable after row {start} ({exc})") from exc
        records = list(_table_records(batch, path, classes, columns, start))
        start += len(records)
        yield from _chunked(iter(records), chunk)


def _parquet(path: Path, classes, columns: Columns, chunk: int) -> Iterator[list[Record]]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from exc
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
