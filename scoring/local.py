"""Offline batch scoring on one machine: inputs → images.decode (a thread pool) → Bundle.predict → a table.

    cifar10 score INPUT --model NAME --output OUT.parquet|OUT.csv [--topk K] [--embeddings] [--knn]

The next chunk is decoded while the current one is inferred (by Bundle.predict, in calls of at most
256 images, so in bounded memory).
Each finished chunk is written as its own file under OUT.parts/ (atomically), so an
interrupted run keeps what it did and a re-run with the same output skips those rows; OUT
itself appears, by a rename, only once every input is scored, with OUT.options.json beside it (what
was scored, with which bundle and options: a re-run asking for anything else is refused). Inputs
that fail to decode get a row with `error` set and never stop the run.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from bundle.images import DEFAULT_LIMITS, ImageError, Limits, decode
from bundle.runtime import Bundle, available_cores
from cifar10.files import write_whole, written_whole
from scoring.inputs import Record

OPTIONS_FILE = "options.json"


class ScoringError(ValueError):
    """The run cannot go on as asked (e.g. the output holds another run); the message says what to do."""


@dataclass(frozen=True)
class Options:
    """What a run computes; a resumed run must ask for the same."""

    model: str
    model_version: str
    input: str
    topk: int = 0
    embeddings: bool = False
    knn: bool = False
    precision: str = "fp32"  # the graph that scores: fp32, or the bundle's int8 variant


@dataclass
class Summary:
    rows: int = 0  # in the output
    failed: int = 0  # rows with an error
    new: int = 0  # inputs this run read (the rest were done by an earlier, interrupted run)
    skipped: int = 0
    seconds: float = 0.0
    labelled: int = 0  # rows whose true label is known
    output: str = ""
    failures: list[str] = field(default_factory=list)  # the first few, for the report
    correct: int = 0  # of the labelled rows

    @property
    def images_per_second(self) -> float:
        return self.new / self.seconds if self.seconds else 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def add(self, table) -> None:
        """Count a finished part of the output (a pyarrow table)."""
        errors, truth, label = (table.column(c).to_pylist() for c in ("error", "true_label", "label"))
        self.rows, self.failed = self.rows + table.num_rows, self.failed + sum(e is not None for e in errors)
        self.failures += [f"{i}: {e}" for i, e in zip(table.column("id").to_pylist(), errors) if e][: 10 - len(self.failures)]
        known = [(t, p) for t, p in zip(truth, label) if t is not None and p is not None]
        self.labelled += len(known)
        self.correct += sum(t == p for t, p in known)


def schema(options: Options):
    import pyarrow as pa

    fields = [("id", pa.string()), ("label", pa.string()), ("index", pa.int32()), ("probability", pa.float32()), ("true_label", pa.string())]
    if options.topk:
        fields += [("topk_labels", pa.list_(pa.string())), ("topk_probabilities", pa.list_(pa.float32()))]
    if options.embeddings:
        fields.append(("embedding", pa.list_(pa.float32())))
    if options.knn:
        fields += [("knn_label", pa.string()), ("knn_neighbours", pa.list_(pa.int64())), ("knn_distances", pa.list_(pa.float32()))]
    fields.append(("error", pa.string()))
    return pa.schema(fields)


def record_pixels(record: Record, limits: Limits) -> np.ndarray | str:
    """The record's uint8 pixels, or the reason it has none."""
    if isinstance(record.source, np.ndarray):
        return record.source
    try:
        data = read_file(record.source) if isinstance(record.source, Path) else record.source
        return decode(data, limits)
    except (ImageError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)


def read_file(path: Path) -> bytes:
    """A file's bytes. A name that is no file as written but is once percent-decoded came from a file: URI that
    encodes (Path.as_uri(): my%20photo.jpg); Spark's binaryFile writes names as they are (my photo.jpg, 100%.png)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        if "%" not in path.name or not (decoded := Path(unquote(str(path)))).is_file():
            raise
        return decoded.read_bytes()


def score_chunk(bundle: Bundle, records: list[Record], decoded: list[np.ndarray | str], options: Options) -> dict[str, list]:
    """One chunk's output columns, in the schema's order: the records' ids and true labels, then their predictions."""
    classes = bundle.manifest.classes
    known = {"id": [r.id for r in records], "true_label": [classes[r.label] if r.label is not None else None for r in records]}
    predicted = predict_columns(bundle, decoded, options)
    return {name: known[name] if name in known else predicted[name] for name in schema(options).names}


def predict_columns(bundle: Bundle, decoded: list[np.ndarray | str], options: Options) -> dict[str, list]:
    """The prediction columns (every column but id and true_label): Bundle.predict on every image that decoded (calls of at most 256).

    `decoded` holds each input's pixels, or the reason it has none, which becomes its `error`.
    """
    classes = bundle.manifest.classes
    names = [name for name in schema(options).names if name not in ("id", "true_label")]
    columns: dict[str, list] = {name: [None] * len(decoded) for name in names}
    columns["error"] = [d if isinstance(d, str) else None for d in decoded]
    good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
    if not good:
        return columns
    prediction = bundle.predict(np.stack([decoded[i] for i in good]))
    probs = prediction.probabilities
    if options.knn:
        votes, distances, indices, _ = bundle.knn(prediction.embeddings, bundle.manifest.knn.k)
    for row, i in enumerate(good):
        best = int(probs[row].argmax())
        columns["label"][i], columns["index"][i], columns["probability"][i] = classes[best], best, float(probs[row, best])
        if options.topk:
            order = np.argsort(-probs[row], kind="stable")[: options.topk]
            columns["topk_labels"][i] = [classes[j] for j in order]
            columns["topk_probabilities"][i] = probs[row, order].tolist()
        if options.embeddings:
            columns["embedding"][i] = prediction.embeddings[row].tolist()
        if options.knn:
            columns["knn_label"][i] = classes[int(votes[row].argmax())]
            columns["knn_neighbours"][i] = indices[row].tolist()
            columns["knn_distances"][i] = distances[row].tolist()
    return columns


class Parts:
    """OUT.parts/: one Parquet file per finished chunk, and the options of the run that wrote them."""

    def __init__(self, output: Path, options: Options):
        self.folder = output.with_name(output.name + ".parts")
        self.options = options
        stored, earlier = self.folder / OPTIONS_FILE, self.files()
        if earlier and stored.exists():
            check_same(read_options(stored), options, f"{self.folder} holds an interrupted run", f"re-run it as it was, or remove {self.folder} to start over")
        elif earlier:  # parts of unknown options are never adopted as this run's
            raise ScoringError(f"{self.folder} holds parts without their {OPTIONS_FILE}, so which run wrote them is unknown; remove {self.folder} to start over")
        self.started = bool(earlier)  # until a part is written, the folder and its options.json may be absent or another run's
        # the next part's number: after the highest there, so that no part of an interrupted run is written over
        self.written = max((int(p.stem.removeprefix("part-")) for p in earlier), default=-1) + 1

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))  # none while the folder is not there

    def done_ids(self) -> collections.Counter[str]:
        """How many rows of each id the parts hold: an input may repeat an id, and each row counts."""
        import pyarrow.parquet as pq

        return collections.Counter(i for f in self.files() for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())

    def write(self, columns: dict[str, list]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.started:  # the folder appears with the run's first part: a run that fails before leaves nothing to refuse
            self.folder.mkdir(parents=True, exist_ok=True)
            write_options(self.folder / OPTIONS_FILE, self.options)
            self.started = True
        final = self.folder / f"part-{self.written:06d}.parquet"
        self.written += 1
        written_whole(final, lambda tmp: pq.write_table(pa.table(columns, schema=schema(self.options)), tmp))  # a part is whole or absent

    def merge_into(self, output: Path, each: Callable[[object], None]) -> None:
        """Write every part into `output` (Parquet or CSV by its suffix) through a rename, one part in
        memory at a time; `each` is called with every part's table."""
        import pyarrow.parquet as pq
        from pyarrow import csv

        output.parent.mkdir(parents=True, exist_ok=True)
        as_csv = output.suffix.lower() == ".csv"
        columns = schema(self.options)

        def write(tmp: Path) -> None:
            with csv.CSVWriter(tmp, _csv_ready(columns.empty_table()).schema) if as_csv else pq.ParquetWriter(tmp, columns) as writer:
                for part in self.files():
                    table = pq.read_table(part)
                    writer.write_table(_csv_ready(table) if as_csv else table)
                    each(table)
            write_options(options_record(output), self.options)  # before the rename: an OUT is never without its record

        written_whole(output, write)
        if self.folder.exists():  # out of sight in one step, then removed: a run stopped here leaves no parts to resume from
            leaving = removed_parts(output)
            os.replace(self.folder, leaving)
            shutil.rmtree(leaving)


def _csv_ready(table):
    """CSV has no lists: list columns become JSON text."""
    import pyarrow as pa

    for name in table.column_names:
        if pa.types.is_list(table.schema.field(name).type):
            table = table.set_column(table.column_names.index(name), name, _json_lists(table.column(name).combine_chunks()))
    return table


def _json_lists(lists):
    """A list column as JSON text, null where the list is. Numbers as Arrow writes them, as short as their
    type holds (a float32 0.90851235, as in the probability column, not 0.9085123538970947); text through json."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(lists.type.value_type):
        return pa.array([json.dumps(v) if v is not None else None for v in lists.to_pylist()], pa.string())
    offsets = pc.subtract(lists.offsets, lists.offsets[0])  # a slice's offsets start where it does
    text = pa.ListArray.from_arrays(offsets, pc.cast(lists.flatten(), pa.string()), mask=lists.is_null())
    return pc.binary_join_element_wise("[", pc.binary_join(text, ", "), "]", "")


def every_row_failed(output: Path) -> int:
    """The rows of a finished output (a Parquet file or folder, or a CSV) when every one failed, else 0."""
    import pyarrow.parquet as pq
    from pyarrow import csv

    if output.suffix.lower() == ".csv":
        errors = csv.read_csv(output, convert_options=csv.ConvertOptions(include_columns=["error"], strings_can_be_null=True)).column(0)
    else:
        errors = pq.read_table(output, columns=["error"]).column(0)
    return len(errors) if len(errors) and errors.null_count == 0 else 0


def check_output(output: Path, options: Options) -> bool:
    """True if `output` is a finished run of these very options (nothing to do); an error if it holds
    anything else, so that a re-run never passes off one run's rows as another's."""
    if output.suffix.lower() not in (".parquet", ".csv"):
        raise ScoringError(f"--output must end in .parquet or .csv, got {output}")
    if not output.exists():
        return False
    record = options_record(output)
    if not record.is_file():
        raise ScoringError(
            f"{output} exists without {record.name}, the record of the options that made it (an output of an earlier "
            "cifar10 version, or of another tool); choose another --output or remove it"
        )
    check_same(read_options(record), options, f"{output} holds a finished run", "choose another --output or remove it")
    return True


def removed_parts(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts.removed")


def write_options(path: Path, options: Options) -> None:
    write_whole(path, json.dumps(asdict(options)))


def read_options(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ScoringError(f"{path} is not the JSON this command writes; remove it (and what it describes) to start over") from None


def options_record(output: Path) -> Path:
    """The options of the run that wrote a finished OUT, beside it: what it scored, with which bundle."""
    return output.with_name(output.name + ".options.json")


def check_same(earlier: dict, options: Options, what: str, remedy: str) -> None:
    """Refuse a run whose options differ from an earlier one's, naming each difference."""
    asked = asdict(options)
    if earlier != asked:
        changed = "; ".join(f"{k}: {earlier.get(k)!r} then, {asked.get(k)!r} now" for k in sorted(set(earlier) | set(asked)) if earlier.get(k) != asked.get(k))
        raise ScoringError(f"{what} with other options ({changed}); {remedy}")


def _prefetch(chunks: Iterator[list[Record]], pool: ThreadPoolExecutor, limits: Limits) -> Iterator[tuple[list[Record], list]]:
    """Yield each chunk with its decoded images while the next chunk decodes in the pool."""
    pending: tuple[list[Record], list[Future]] | None = None
    for chunk in chunks:
        submitted = (chunk, [pool.submit(record_pixels, r, limits) for r in chunk])
        if pending is not None:
            yield pending[0], [f.result() for f in pending[1]]
        pending = submitted
    if pending is not None:
        yield pending[0], [f.result() for f in pending[1]]


def score(
    chunks: Iterator[list[Record]],
    bundle: Bundle,
    output: Path,
    options: Options,
    workers: int | None = None,
    limits: Limits = DEFAULT_LIMITS,
    progress=None,
) -> Summary:
    """Score every record into `output`; resumable, and never a half-written `output`.

    workers: decoding threads; None: the cores this process may use (a container's CPU quota included).
    progress: called with the number of rows each finished chunk adds (e.g. a progress bar's update).
    """
    summary = Summary(output=str(output))
    shutil.rmtree(removed_parts(output), ignore_errors=True)  # what a run stopped while removing its parts left
    if check_output(output, options):  # finished before: nothing to do
        return summary
    parts = Parts(output, options)
    done = parts.done_ids()
    started = time.perf_counter()
    with ThreadPoolExecutor(workers or available_cores()) as pool:
        for chunk, decoded in _prefetch(_skipping(chunks, done, summary), pool, limits):
            parts.write(score_chunk(bundle, chunk, decoded, options))
            summary.new += len(chunk)
            if progress:
                progress(len(chunk))
    summary.seconds = time.perf_counter() - started
    parts.merge_into(output, summary.add)
    return summary


def _skipping(chunks: Iterator[list[Record]], done: collections.Counter[str], summary: Summary) -> Iterator[list[Record]]:
    """The records still to score: the parts hold the first done[id] rows of each id, as inputs come in order."""
    for chunk in chunks:
        todo = []
        for record in chunk:
            if done[record.id] > 0:
                done[record.id] -= 1
            else:
                todo.append(record)
        summary.skipped += len(chunk) - len(todo)
        if todo:
            yield todo
