"""`cifar10`: the project's one command line, over training (`training`) and offline scoring (`scoring`).

Subcommands import their heavy dependencies when they run, so `cifar10 --help` is instant and
commands that need no torch keep working on a serving-only install.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from bundle.images import DEFAULT_LIMITS
from bundle.manifest import DEFAULT_BUNDLE, MODELS_DIR, PRECISIONS, TTA_LEVELS
from cifar10.errors import UserError
from training.knn import KNN_COMPONENTS


def cmd_data(args: argparse.Namespace) -> None:
    from training.data import load_cifar10
    from training.loop import write_json
    from training.report import dataset_facts, format_facts, sample_grid

    if args.per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {args.per_class}")
    data = load_cifar10(args.data_dir, download=args.download)
    facts = dataset_facts(data)
    print(format_facts(facts))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "facts.json", facts)
    grid = sample_grid(data.train, data.classes, per_class=args.per_class, path=out / "samples.png")
    print(f"\nwrote {out / 'facts.json'} and {grid}")


def cmd_recipes(args: argparse.Namespace) -> None:
    from training.recipes import RECIPES, describe_uploads

    for name, recipe in RECIPES.items():
        print(
            f"{name:26s} model={recipe['model']:13s} epochs={recipe['epochs']:<4d} batch={recipe['batch_size']:<4d} "
            f"lr={recipe['lr']:g} norm={recipe['normalization']} holdout={recipe['holdout']} augment={recipe['augment'] or 'none'} "
            f"uploads={describe_uploads(recipe['uploads'])}"
        )


def cmd_train(args: argparse.Namespace) -> None:
    from training.data import load_cifar10
    from training.hardware import bf16_is_fast, describe
    from training.loop import new_run_dir, pick_device, plan_resume
    from training.recipes import get_recipe
    from training.train import train

    device = pick_device(args.device)
    overrides = dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        weights=args.weights, freeze=args.freeze, limit=args.limit, holdout=args.holdout,
        uploads=args.uploads, whitening_eps=args.whitening_eps,
    )  # fmt: skip
    if args.resume:
        changed = [f"--{k.replace('_', '-')}" for k, v in overrides.items() if v is not None and k != "epochs"]
        if changed:
            raise UserError(f"--resume continues a run as it was; only --epochs can change, not {', '.join(changed)}")
        recipe, resume, run_dir = plan_resume(Path(args.resume), args.recipe, args.epochs)
    elif args.recipe:
        resume = None
        recipe = get_recipe(args.recipe, **overrides)
    else:
        raise UserError("name a recipe (see `cifar10 recipes`) or pass --resume RUN_DIR")
    bf16 = {"auto": bf16_is_fast(device), "bf16": True, "fp32": False}[args.precision]
    data = load_cifar10(args.data_dir, download=args.download)
    train_split, held, test = data.splits(recipe.get("limit"), recipe.get("holdout", 0))  # a bad --holdout fails here, before any folder
    if resume is None:
        run_dir = new_run_dir(Path(args.runs_dir), recipe["name"])
    print(
        f"{recipe['name']} on {describe(device)}, {'bf16 autocast' if bf16 else 'fp32'}; {len(train_split):,} training images, "
        f"{len(held):,} held out (calibration, choices), {len(test):,} test; run folder {run_dir}"
    )
    try:
        summary = train(recipe, data, run_dir, device, bf16, resume=resume)
    except BaseException:
        if resume is None and not any(run_dir.iterdir()):  # refused before its first checkpoint: no empty run folder left
            run_dir.rmdir()
        raise
    final = summary["final"]
    tta = "".join(f", with {level} {result['accuracy']:.4f}" for level, result in final.get("test_tta", {}).items())
    print(
        f"done: {summary['train_seconds']:.0f}s of training, {summary['wall_seconds_this_session']:.0f}s this session; train accuracy {final['train']['accuracy']:.4f} (evaluated as the test set is; "
        f"batch_acc above is over the training batches as they were trained), "
        f"test accuracy {final['test']['accuracy']:.4f}{tta} ({run_dir / 'run.json'})"
    )


def cmd_runs(args: argparse.Namespace) -> None:
    from training.report import runs_table

    if not Path(args.runs_dir).is_dir():
        raise UserError(f"no runs folder at {args.runs_dir}; train something first or pass --runs-dir")
    print(runs_table(Path(args.runs_dir)))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from training.analysis import analyse, load_trained
    from training.data import load_cifar10
    from training.hardware import bf16_is_fast
    from training.loop import pick_device
    from training.report import write_report

    device = pick_device(args.device)
    data = load_cifar10(args.data_dir, download=args.download)
    run = load_trained(Path(args.run), data)
    metrics, arrays = analyse(run, data, device, bf16_is_fast(device))
    out = Path(args.out) if args.out else Path(args.run if Path(args.run).is_dir() else Path(args.run).parent) / "report"
    report = write_report(out, metrics, arrays, run.history, command=f"cifar10 evaluate {args.run}")
    knn = metrics["knn"]
    print(
        f"{run.name}: test accuracy {metrics['test']['accuracy']:.2%} (train {metrics['train']['accuracy']:.2%}), "
        f"KNN k={knn['k']} {knn['metric']} {knn['test_accuracy']:.2%}, test ECE {metrics['test']['ece']:.4f}\n{report}"
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from bundle.runtime import BundleError, read_manifest
    from training.data import load_cifar10
    from training.quantize import INT8_TOLERANCE, quantize

    folder = Path(args.models_dir) / args.name
    try:
        fp32 = read_manifest(folder).accuracy.onnx  # before reading the data: a wrong name fails fast
        variant = quantize(folder, load_cifar10(args.data_dir, download=args.download), args.calibration_images)
    except BundleError as exc:
        raise UserError(str(exc)) from None
    size = (folder / variant.file).stat().st_size
    print(
        f"wrote {folder / variant.file} ({size / 1e6:.1f} MB), calibrated on {variant.calibration_images} training images: "
        f"test accuracy {variant.test_accuracy:.2%} (fp32 {fp32:.2%})"
    )
    if round(fp32 - variant.test_accuracy, 9) > INT8_TOLERANCE:  # exactly 0.5 point is within
        print(
            f"warning: int8 loses {(fp32 - variant.test_accuracy) * 100:.2f} points, more than {INT8_TOLERANCE * 100:g}: keep serving fp32, "
            "or quantize again with more --calibration-images",
            file=sys.stderr,
        )
    else:
        print(f"serve it with CIFAR10_PRECISION={args.name}:int8; measure it under uploads with `cifar10 robustness {args.name} --precision int8`")


def cmd_robustness(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from bundle.manifest import MODEL_FILE
    from bundle.runtime import Bundle, BundleError, read_manifest
    from training.data import load_cifar10
    from training.export import write_manifest
    from training.report import write_robustness_report
    from training.robustness import CONDITIONS, bundle_classifier, condition_scores, format_table, http_classifier, measure, table

    folder = Path(args.models_dir) / args.name
    try:
        manifest = read_manifest(folder)  # before reading the data: a wrong name fails fast
    except BundleError as exc:
        raise UserError(str(exc)) from None
    if args.url:
        precisions = ["served"]  # whatever the service serves (CIFAR10_PRECISION)
    elif args.precision == "all":
        precisions = ["fp32", *(v.precision for v in manifest.variants)]
    else:
        precisions = [args.precision]
    conditions = args.conditions.split(",") if args.conditions else list(CONDITIONS)
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise UserError(f"unknown condition {', '.join(unknown)}; choose from {', '.join(CONDITIONS)}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    data = load_cifar10(args.data_dir, download=args.download)
    if list(manifest.classes) != list(data.classes):
        raise UserError(f"{folder} was trained on classes {list(manifest.classes)}, but the data has {list(data.classes)}")
    test = data.test.head(args.limit)
    images, labels = test.images.permute(0, 2, 3, 1).contiguous().numpy(), test.labels.numpy()
    answers, tables = {}, {}
    for precision in precisions:
        try:
            classify = http_classifier(args.url, args.name) if args.url else bundle_classifier(Bundle.load(folder, precision=precision))
        except BundleError as exc:
            raise UserError(str(exc)) from None
        with tqdm(total=len(conditions), desc=f"{args.name} {precision}", unit="condition", disable=None) as bar:
            answers[precision] = measure(classify, images, conditions, progress=lambda name: (bar.set_postfix_str(name), bar.update()))
        tables[precision] = table(answers[precision], labels)
        print(f"\n{args.name} ({precision}), {len(labels):,} test images:\n{format_table(tables[precision])}")
    command = "cifar10 robustness " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["robustness"] else f"cifar10 robustness {args.name}"
    out = Path(args.out or f"runs/robustness-{args.name}")
    report = write_robustness_report(out, manifest, tables, answers, labels, command)
    print(f"\nwrote {report}")
    partial = "measured over HTTP" if args.url else "measured on part of the test set" if args.limit is not None else None
    if partial is None and len(conditions) < len(CONDITIONS):
        partial = "measured under some of the conditions"
    if partial:
        print(f"not recorded in the manifest: {partial}")
        return
    current = read_manifest(folder)  # again: a quantize may have replaced a graph while this ran
    measured = lambda file: current.files.get(file) == manifest.files.get(file)  # noqa: E731
    variants = tuple(
        v.model_copy(update=dict(robustness=condition_scores(tables[v.precision]))) if v.precision in tables and measured(v.file) else v
        for v in current.variants
    )
    update = dict(variants=variants) | (dict(robustness=condition_scores(tables["fp32"])) if "fp32" in tables and measured(MODEL_FILE) else {})
    write_manifest(folder, current.model_copy(update=update))
    print(f"recorded in {folder / 'manifest.json'}")


def cmd_export(args: argparse.Namespace) -> None:
    from training.analysis import load_trained
    from training.data import load_cifar10
    from training.export import export

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        raise UserError(f"--name {args.name!r}: a bundle's name is a folder name of letters, digits, '.', '_' and '-'")
    if args.knn_components < 0:
        raise UserError(f"--knn-components must be 0 (the whole embedding) or more, got {args.knn_components}")
    data = load_cifar10(args.data_dir, download=args.download)
    run = load_trained(Path(args.run), data, finished=True)
    if args.knn_components > run.model.embedding_dim:
        raise UserError(f"--knn-components {args.knn_components}: the embedding has {run.model.embedding_dim} dimensions")
    out = Path(args.models_dir) / args.name
    tta = args.tta or run.checkpoint["recipe"].get("tta", "none")
    manifest = export(run, data, out, args.name, components=args.knn_components or None, tta=tta)
    total = sum(f.bytes for f in manifest.files.values())
    c = manifest.calibration
    calibration = (
        f"temperature {c.temperature:.3f} from {c.fit_images:,} held-out images as {len(c.fit_conditions)} upload conditions "
        f"(their ECE {c.ece_before:.2%} → {c.ece_after:.2%})"
        if c.method == "temperature"
        else "none: the run kept no held-out images (train with --holdout N to calibrate)"
    )
    print(
        f"wrote {out} ({total / 1e6:.1f} MB): ONNX test accuracy {manifest.accuracy.onnx:.2%} (test-time augmentation: {tta}) "
        f"(PyTorch {manifest.accuracy.pytorch:.2%}), KNN k={manifest.knn.k} {manifest.knn.metric} "
        f"{manifest.knn.test_accuracy:.2%} (full embedding {manifest.knn.test_accuracy_full_embedding:.2%}); "
        f"calibration: {calibration}\nmeasure it under uploads: cifar10 robustness {args.name}"
    )


def cmd_score(args: argparse.Namespace) -> None:
    from scoring.command import score_command

    score_command(args)


def cmd_report(args: argparse.Namespace) -> None:
    from training.report import compare_table

    folders = []
    for run in map(Path, args.compare):
        folder = run if (run / "metrics.json").is_file() else run / "report"
        if not (folder / "metrics.json").is_file():
            raise UserError(f"{run} has no evaluation yet; run `cifar10 evaluate {run}` first")
        folders.append(folder)
    print(compare_table(folders))


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help="folder in the official python layout (default: $CIFAR10_DATA_DIR or ./data/cifar-10-batches-py)",
    )
    parser.add_argument("--download", action="store_true", help="fetch the official archive if the folder is empty")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar10", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    # --debug after the command too; SUPPRESS, so that a command's parser leaves one given before it as it is
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    models_dir = os.environ.get("CIFAR10_MODELS_DIR") or MODELS_DIR  # the service's setting, so that both find the same bundles

    data = sub.add_parser("data", parents=[after], help="print the dataset's facts and write a grid of samples per class")
    add_data_options(data)
    data.add_argument("--out", default="runs/data", help="folder for facts.json and samples.png (default: %(default)s)")
    data.add_argument("--per-class", type=int, default=10, help="samples per class in the grid (default: %(default)s)")
    data.set_defaults(func=cmd_data)

    recipes = sub.add_parser("recipes", parents=[after], help="list the training recipes")
    recipes.set_defaults(func=cmd_recipes)

    runs = sub.add_parser("runs", parents=[after], help="a markdown table of the finished runs and their results")
    runs.add_argument("--runs-dir", default="runs", help="where run folders are (default: %(default)s)")
    runs.set_defaults(func=cmd_runs)

    evaluate = sub.add_parser("evaluate", parents=[after], help="analyse a trained run: metrics, plots, KNN, a Markdown report")
    evaluate.add_argument("run", help="a run folder (or its checkpoint.pt)")
    add_data_options(evaluate)
    evaluate.add_argument("--out", help="report folder (default: RUN/report)")
    evaluate.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    evaluate.set_defaults(func=cmd_evaluate)

    export = sub.add_parser("export", parents=[after], help="write a run as an ONNX bundle with a KNN head and a manifest")
    export.add_argument("run", help="a run folder (or its checkpoint.pt)")
    export.add_argument("--name", required=True, help="bundle name: the folder under --models-dir")
    export.add_argument("--models-dir", default=models_dir, help="where bundles go (default: %(default)s; CIFAR10_MODELS_DIR sets it, as for the service)")
    export.add_argument("--knn-components", type=int, default=KNN_COMPONENTS,
                        help=f"PCA dimensions of the KNN head, 0 for the whole embedding (default: {KNN_COMPONENTS})")  # fmt: skip
    export.add_argument("--tta", choices=TTA_LEVELS,
                        help="test-time augmentation inside the graph (default: the recipe's, else none)")  # fmt: skip
    add_data_options(export)
    export.set_defaults(func=cmd_export)

    quantize = sub.add_parser("quantize", parents=[after], help="add an int8 variant to a bundle, calibrated on training images")
    quantize.add_argument("name", help="bundle name: the folder under --models-dir")
    quantize.add_argument("--models-dir", default=models_dir, help="where bundles are (default: %(default)s; CIFAR10_MODELS_DIR sets it, as for the service)")
    quantize.add_argument("--calibration-images", type=int, default=512, help="training images that set the ranges (default: %(default)s)")
    add_data_options(quantize)
    quantize.set_defaults(func=cmd_quantize)

    robustness = sub.add_parser("robustness", parents=[after], help="a bundle's accuracy and calibration on the test set sent as PNG, JPEG, WebP, noisy, blurred")
    robustness.add_argument("name", help="bundle name: the folder under --models-dir")
    robustness.add_argument("--models-dir", default=models_dir, help="where bundles are (default: %(default)s; CIFAR10_MODELS_DIR sets it, as for the service)")
    robustness.add_argument("--precision", choices=[*PRECISIONS, "all"], default="all",
                            help="the graph to measure (default: all, the fp32 one and every variant)")  # fmt: skip
    robustness.add_argument("--url", help="measure a running service instead (e.g. http://localhost:3000), whatever precision it serves; nothing is recorded")
    robustness.add_argument("--limit", type=int, help="the first N test images only (nothing is recorded)")
    robustness.add_argument("--conditions", metavar="A,B", help="comma-separated conditions (default: all; a subset is not recorded)")
    robustness.add_argument("--out", help="report folder (default: runs/robustness-NAME)")
    add_data_options(robustness)
    robustness.set_defaults(func=cmd_robustness)

    report = sub.add_parser("report", parents=[after], help="compare evaluated runs side by side")
    report.add_argument("--compare", nargs="+", required=True, metavar="RUN", help="run folders (or report folders)")
    report.set_defaults(func=cmd_report)

    score = sub.add_parser("score", parents=[after], help="score a folder, table or CIFAR-10 batch of images offline into Parquet or CSV")
    score.add_argument("input", help="an image, a folder of images, a .csv/.parquet table (paths or image bytes), or a CIFAR-10 batch file; "
                       "with --engine spark also a glob or any Hadoop URI (hdfs://, s3a://)")  # fmt: skip
    score.add_argument("--model", default=DEFAULT_BUNDLE, help="bundle name under --models-dir (default: %(default)s, as the service)")
    score.add_argument("--output", required=True, help="OUT.parquet or OUT.csv (spark: a Parquet folder, also a URI); a re-run with the same output resumes")
    score.add_argument("--models-dir", default=models_dir, help="where bundles are (default: %(default)s; CIFAR10_MODELS_DIR sets it, as for the service)")
    score.add_argument("--engine", choices=["local", "spark"], default="local",
                       help="local: this machine; spark: PySpark (pip install -e '.[spark]' in the repository)")  # fmt: skip
    score.add_argument("--master", default="local[*]", help="Spark master URL for --engine spark (default: %(default)s)")
    score.add_argument("--topk", type=int, default=0, metavar="K", help="also the K most probable classes")
    score.add_argument("--embeddings", action="store_true", help="also the embedding vector")
    score.add_argument("--knn", action="store_true", help="also the KNN head's label and nearest training images")
    score.add_argument("--batch-size", type=int, default=1024, help="images per chunk: decoded together and written as one part (local), per call of predict_batch_udf (spark); onnxruntime takes them in smaller calls, so memory stays bounded (default: %(default)s)")
    score.add_argument("--workers", type=int, help="decoding threads (default: the cores this process may use, a container's CPU quota included)")
    score.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: its own choice)")
    score.add_argument("--max-pixels", type=int, default=DEFAULT_LIMITS.max_pixels, metavar="N",
                       help="an image that decodes to more pixels (width × height, from its header) is a failed row, not decoded; "
                       "rows failed so are not retried when a run resumes (default: %(default)s, as the service's CIFAR10_MAX_PIXELS)")  # fmt: skip
    score.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="fp32, or int8 for the bundle's quantised variant (`cifar10 quantize`)")  # fmt: skip
    score.add_argument("--path-column", default="path", help="table column of image paths (default: %(default)s)")
    score.add_argument("--image-column", default="image", help="table column of image bytes (default: %(default)s)")
    score.add_argument("--id-column", default="id", help="table column of row ids (default: %(default)s, else the path or row number)")
    score.add_argument("--label-column", default="label", help="table column of true labels, if any (default: %(default)s)")
    score.set_defaults(func=cmd_score)

    train = sub.add_parser("train", parents=[after], help="train a recipe (see `cifar10 recipes`)")
    train.add_argument("recipe", nargs="?", help="recipe name, e.g. cnn-baseline")
    add_data_options(train)
    train.add_argument("--epochs", type=int, help="override the recipe's epochs (with --resume: train on to this many)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="base learning rate (the schedule's later steps are absolute)")
    train.add_argument("--seed", type=int)
    train.add_argument("--weights", help="VGG recipes: imagenet, none, or a state-dict file")
    train.add_argument("--freeze", action="store_true", default=None, help="VGG recipes: freeze the pretrained blocks")
    train.add_argument("--limit", type=int, help="use only the first N training and test images (quick runs; the study's recipes keep Keras's slow BatchNorm statistics, so their test accuracy means little before a few hundred steps)")
    train.add_argument("--holdout", type=int, help="keep the last N training images out of training (for evaluate's choices)")
    train.add_argument("--uploads", metavar="MIX",
                       help="fast recipes: 'none', or shares of the upload steps and ranges of their strengths, e.g. "
                            "jpeg=0.25,webp=0.05,blur=0.1,noise=0.1,jpeg_quality=50-95 (what is left out stays the recipe's)")  # fmt: skip
    train.add_argument("--whitening-eps", type=float,
                       help="fast recipes with airbench's whitening: added to its eigenvalues, capping the gain of faint patch detail")  # fmt: skip
    train.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    train.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                       help="auto: bf16 autocast where the hardware has fast bf16")  # fmt: skip
    train.add_argument("--runs-dir", default="runs", help="where run folders go (default: %(default)s)")
    train.add_argument("--resume", metavar="RUN", help="continue a run folder (or its checkpoint.pt)")
    train.set_defaults(func=cmd_train)
    return parser


def missing_extra(command: str, module: str | None) -> str | None:
    """The optional extra that brings a module the command failed to import, if any."""
    if module in ("pyspark", "pandas"):
        return "spark"
    if command == "score":
        return "score" if module in ("pyarrow", "tqdm") else None
    return "train" if module in ("torch", "torchvision", "tqdm", "matplotlib", "onnx") else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("CIFAR10_DEBUG") == "1"
    try:
        args.func(args)
    except UserError as exc:
        if debug:
            raise
        print(f"cifar10 {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C where nothing is kept to resume from: no traceback, the shell's status
        if debug:
            raise
        print(f"cifar10 {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        extra = missing_extra(args.command, exc.name)
        if debug or extra is None:
            raise
        print(f"cifar10 {args.command}: error: needs the {extra} extra: pip install -e '.[{extra}]' in the repository", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
