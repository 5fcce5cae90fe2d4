"""`cifar10 score`: check the request, load the bundle once, run the local or Spark engine, report."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from bundle.images import DEFAULT_LIMITS
from bundle.runtime import Bundle, BundleError
from cifar10.errors import Interrupted, UserError
from scoring.inputs import Columns, InputError, read_inputs
from scoring.local import Options, ScoringError, every_row_failed, score


def score_command(args: argparse.Namespace) -> None:
    """`cifar10 score`: the arguments of cifar10.cli's parser in, a table and a one-line summary out."""
    folder = Path(args.models_dir) / args.model
    output, source = Path(args.output), Path(args.input)
    if args.topk < 0 or args.batch_size < 1 or (args.workers is not None and args.workers < 1) or args.threads < 0 or args.max_pixels < 1:
        raise UserError("--topk and --threads must be 0 or more, --batch-size, --workers and --max-pixels at least 1")
    limits = replace(DEFAULT_LIMITS, max_pixels=args.max_pixels, pixels_setting="--max-pixels")
    try:
        # onnxruntime's threads sleep between calls: they share the cores with the decoding pool
        bundle = Bundle.load(folder, threads=args.threads or None, precision=args.precision, spinning=False)
        if args.topk > len(bundle.manifest.classes):
            raise UserError(f"--topk must lie in 0..{len(bundle.manifest.classes)}, got {args.topk}")
        where = args.input if "://" in args.input else str(source.resolve())  # the spark engine also reads URIs
        options = Options(args.model, bundle.manifest.version, where, args.topk, args.embeddings, args.knn, args.precision)
        columns = Columns(path=args.path_column, image=args.image_column, id=args.id_column, label=args.label_column)
        if args.engine == "spark":
            from scoring.spark_job import score_spark  # only here: PySpark is an extra

            summary = score_spark(args.input, folder, args.output, options, columns, master=args.master, chunk=args.batch_size, max_pixels=args.max_pixels)
        else:
            chunks = read_inputs(source, bundle.manifest.classes, columns, chunk=args.batch_size)
            with tqdm(desc=f"scoring with {args.model}", unit="img", disable=None) as bar:
                summary = score(chunks, bundle, output, options, workers=args.workers, limits=limits, progress=bar.update)
    except (BundleError, InputError, ScoringError) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # an --output under a file, a folder that cannot be read or written, a full disk
        raise UserError(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)) from None
    except KeyboardInterrupt:
        if args.engine == "spark":
            raise Interrupted(f"interrupted; run the same command again to score everything into {args.output}") from None
        raise Interrupted(f"interrupted; finished chunks are kept: run the same command again to resume into {output}") from None
    if summary.rows == 0 and not summary.new:
        if "://" not in args.output and (failed := every_row_failed(output)):  # as the run that wrote it exited: 1
            raise UserError(f"{args.output} is complete, but every one of its {failed:,} inputs failed (its error column says why): remove it to score again")
        print(f"{args.output} is already complete (these options, this input as it was listed then); nothing to do. "
              "To score files added since, write to another --output or remove this one")  # fmt: skip
        return
    accuracy = f", accuracy {summary.accuracy:.2%} on {summary.labelled:,} labelled" if summary.accuracy is not None else ""
    print(
        f"wrote {args.output}: {summary.rows:,} rows, {summary.failed:,} failed{accuracy}; this run read {summary.new:,} "
        f"inputs ({summary.skipped:,} done before) at {summary.images_per_second:,.0f} images/s"
    )
    for failure in summary.failures:
        print(f"  failed: {failure}")
    if summary.new and summary.failed == summary.rows:  # nothing scored is a mistake to stop a script on, not a result
        raise UserError(f"every one of the {summary.rows:,} inputs failed (the first reasons above): is it the input you meant?")
