"""What we show people: dataset facts and image grids (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
import torch

from training.data import Cifar10, Split
from training.loop import write_json
from training.metrics import reliability, softmax
from training.recipes import AIRBENCH_WHITENING_EPS, RECIPES, describe_uploads


def dataset_facts(data: Cifar10) -> dict:
    """The study's first table: counts per class, shape, value range, per-channel statistics."""
    pixels = data.train.images.float() / 255
    return {
        "classes": list(data.classes),
        "train_counts": torch.bincount(data.train.labels, minlength=10).tolist(),
        "test_counts": torch.bincount(data.test.labels, minlength=10).tolist(),
        "image_shape": [32, 32, 3],
        "channels": "RGB",
        "dtype": str(data.train.images.dtype).removeprefix("torch."),
        "value_range": [int(data.train.images.min()), int(data.train.images.max())],
        "train_mean": pixels.mean(dim=(0, 2, 3)).tolist(),
        "train_std": pixels.std(dim=(0, 2, 3)).tolist(),
        "source": data.source,
    }


def format_facts(facts: dict) -> str:
    lines = [
        f"source       {facts['source']}",
        f"images       {sum(facts['train_counts'])} train, {sum(facts['test_counts'])} test",
        f"image shape  {'×'.join(map(str, facts['image_shape']))} ({facts['channels']}, {facts['dtype']})",
        f"value range  {facts['value_range'][0]}..{facts['value_range'][1]}",
        "train mean   " + "  ".join(f"{c} {v:.4f}" for c, v in zip("RGB", facts["train_mean"])) + "  (of 0..1)",
        "train std    " + "  ".join(f"{c} {v:.4f}" for c, v in zip("RGB", facts["train_std"])),
        "",
        f"{'class':12s} {'train':>6s} {'test':>6s}",
    ]
    rows = zip(facts["classes"], facts["train_counts"], facts["test_counts"])
    lines += [f"{name:12s} {train:6d} {test:6d}" for name, train, test in rows]
    return "\n".join(lines)


def sample_grid(split: Split, classes, per_class: int, path: Path) -> Path:
    """One row per class, the first `per_class` images of each, named on the left."""
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.8 + 1.2, len(classes) * 0.8), squeeze=False)
    for row, name in enumerate(classes):
        picks = (split.labels == row).nonzero().flatten()[:per_class]
        for col in range(per_class):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(picks):
                ax.imshow(split.images[picks[col]].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    return _save(fig, path)


def runs_table(runs_dir: Path) -> str:
    """Markdown: every finished run under runs_dir, oldest first; then each recipe's mean over seeds."""
    rows = [
        "| run | recipe | seed | epochs | train acc | held-out acc | held-out, uploads mean | test acc | test acc, TTA | train time | median s/epoch | device |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    by_recipe: dict[str, list[dict]] = {}
    for summary_file in sorted(runs_dir.glob("*/run.json"), key=lambda p: p.stat().st_mtime):
        summary = json.loads(summary_file.read_text())
        history_file = summary_file.parent / "history.json"  # absent where only run.json was kept
        history = json.loads(history_file.read_text()) if history_file.exists() else None
        epochs = len(history) if history else summary["recipe"]["epochs"]
        seconds = sorted(row["seconds"] for row in history or [])
        final, recipe = summary["final"], summary["recipe"]
        variant = f" (first {recipe['limit']})" if recipe.get("limit") else ""
        if recipe["model"].startswith("vgg"):
            variant += f", weights {recipe['weights']}"
        if recipe.get("holdout"):
            variant += f", holdout {recipe['holdout']}"
        if recipe["name"] in RECIPES and recipe.get("uploads", {}) != _as_json(RECIPES[recipe["name"]]["uploads"]):
            variant += f", uploads {describe_uploads(recipe['uploads'])}"  # a --uploads candidate
        eps = recipe.get("whitening_eps", AIRBENCH_WHITENING_EPS)  # runs from before the key had airbench's
        if recipe.get("loop") == "fast" and recipe["name"] in RECIPES and eps != RECIPES[recipe["name"]]["whitening_eps"]:
            variant += f", whitening eps {eps:g}"  # a --whitening-eps candidate
        tta = recipe.get("tta", "none")
        tta_accuracy = final["test_tta"][tta]["accuracy"] if tta != "none" else None
        if epochs == recipe["epochs"]:
            by_recipe.setdefault((recipe["name"] + variant, epochs), []).append(dict(summary, tta_accuracy=tta_accuracy))
        rows.append(
            f"| {summary_file.parent.name} | {recipe['name']}{variant} | {recipe['seed']} | {epochs} | "
            f"{final['train']['accuracy']:.2%} | {f'{held:.2%}' if (held := final.get('held_out', {}).get('accuracy')) else '–'} | "
            f"{f'{mixed:.2%}' if (mixed := final.get('held_out_uploads', {}).get('mean')) else '–'} | "
            f"{final['test']['accuracy']:.2%} | {f'{tta_accuracy:.2%} ({tta})' if tta_accuracy is not None else '–'} | "
            f"{summary['train_seconds'] / 60:.1f} min | {f'{seconds[len(seconds) // 2]:.0f}' if seconds else '–'} | "
            f"{summary['device_name']}{', bf16' if summary['bf16'] else ''} |"
        )
    rows += [
        "",
        "| recipe | epochs | runs (seeds) | test acc, mean ± sd [min, max] | with TTA, mean ± sd [min, max] | train time, mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, epochs), runs in by_recipe.items():
        tta = [r["tta_accuracy"] for r in runs if r["tta_accuracy"] is not None]
        rows.append(
            f"| {name} | {epochs} | {len(runs)} ({', '.join(str(r['recipe']['seed']) for r in runs)}) | "
            f"{_spread([r['final']['test']['accuracy'] for r in runs])} | {_spread(tta) if tta else '–'} | "
            f"{sum(r['train_seconds'] for r in runs) / len(runs) / 60:.1f} min |"
        )
    return "\n".join(rows)


def _as_json(value):
    """A recipe value as run.json holds it (tuples become lists), for comparing with one read back."""
    return json.loads(json.dumps(value))


def _spread(values: list[float]) -> str:
    """mean ± sample standard deviation [min, max], in percent; one run is only its value (no spread to state)."""
    if len(values) == 1:
        return f"{values[0]:.2%}"
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2%} ± {sd:.2%} [{min(values):.2%}, {max(values):.2%}]"


def _thumbnail(ax, image: torch.Tensor) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_confusion(confusion, classes, title: str, path: Path) -> Path:
    """Heat map with the count in every cell; rows are true classes."""
    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion / np.maximum(confusion.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for (t, p), count in np.ndenumerate(confusion):
        share = count / max(confusion[t].sum(), 1)
        ax.text(p, t, str(count), ha="center", va="center", fontsize=7, color="white" if share > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_history(history: list[dict], path: Path) -> Path:
    """Train/test accuracy and loss per epoch, side by side."""
    epochs = [row["epoch"] for row in history]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in ((acc, "accuracy"), (loss, "loss")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], marker=".", label="train (running, train mode)")
        ax.plot(epochs, [row[f"test_{key}"] for row in history], marker=".", label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    acc.legend()
    return _save(fig, path)


def plot_examples(images, labels, probabilities, classes, title: str, path: Path, columns: int = 5) -> Path:
    """Thumbnails titled 'true → predicted p', green when right, red when wrong."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 2.1 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label, probs in zip(axes.flat, images, labels, probabilities):
        _thumbnail(ax, image)
        ax.axis("on")
        predicted = int(probs.argmax())
        ax.set_title(f"{classes[label]} → {classes[predicted]}\n{probs[predicted]:.3f}", fontsize=8,
                     color="green" if predicted == label else "red")  # fmt: skip
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_reliability(before, after, path: Path, labels: tuple[str, str] = ("as trained", "temperature-scaled")) -> Path:
    """Accuracy against confidence per bin; the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for rel, label in zip((before, after), labels):
        if rel is None:
            continue
        used = rel.count > 0
        ax.plot(rel.confidence[used], rel.accuracy[used], marker="o", label=f"{label} (ECE {rel.ece:.3f})")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_neighbours(queries, query_labels, pool: Split, indices, distances, classes, path: Path) -> Path:
    """Each row: a test image, then its nearest training images with label and distance."""
    rows, k = indices.shape
    fig, axes = plt.subplots(rows, k + 1, figsize=((k + 1) * 1.4, rows * 1.6), squeeze=False)
    for row in range(rows):
        _thumbnail(axes[row, 0], queries[row])
        axes[row, 0].set_title(f"test: {classes[query_labels[row]]}", fontsize=8)
        for col in range(k):
            i = int(indices[row, col])
            _thumbnail(axes[row, col + 1], pool.images[i])
            axes[row, col + 1].set_title(f"{classes[int(pool.labels[i])]} {distances[row, col]:.2f}", fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


EXAMPLE_TITLES = {
    "right_most_confident": "Right, most confident",
    "right_least_confident": "Right, least confident",
    "wrong_most_confident": "Wrong, most confident",
    "wrong_least_confident": "Wrong, least confident",
}


def write_report(out: Path, metrics: dict, arrays: dict, history: list[dict], command: str) -> Path:
    """report.md with its PNGs and metrics.json, all in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    classes, test = metrics["classes"], arrays["test"]
    for split in ("train", "test"):
        plot_confusion(metrics[split]["confusion"], classes, f"{split} set", out / f"confusion_{split}.png")
    plot_history(history, out / "curves.png")
    for key, title in EXAMPLE_TITLES.items():
        picks = metrics["examples"][key]
        plot_examples(arrays["test_images"][picks], test.labels[picks], test.probabilities[picks], classes, title,
                      out / f"{key}.png")  # fmt: skip
    scaled = None
    if metrics["temperature"] is not None:
        scaled = reliability(softmax(test.logits, metrics["temperature"]), test.labels)
    plot_reliability(reliability(test.probabilities, test.labels), scaled, out / "reliability.png")
    neighbours = arrays["neighbours"]
    rows = len(neighbours["indices"])
    plot_neighbours(arrays["test_images"][:rows], test.labels[:rows], arrays["train_split"], neighbours["indices"],
                    neighbours["distances"], classes, out / "neighbours.png")  # fmt: skip
    write_json(out / "metrics.json", metrics)
    report = out / "report.md"
    report.write_text(_markdown(metrics, test, history, command))
    return report


def _markdown(metrics: dict, test, history: list[dict], command: str) -> str:
    classes, knn, train_m, test_m = metrics["classes"], metrics["knn"], metrics["train"], metrics["test"]
    scaled = metrics["temperature"] is not None
    lines = [
        f"# Evaluation of `{metrics['run']}` ({metrics['recipe']['name']}, {len(history)} epochs)",
        "",
        f"Made by `{command}` on {metrics['device']}: {train_m['images']:,} training and "
        f"{test_m['images']:,} test images from `{metrics['data']}`.",
        "",
        "## Summary",
        "",
        "| | network | KNN on embeddings |",
        "| --- | ---: | ---: |",
        f"| train accuracy | {train_m['accuracy']:.2%} | {knn['train_accuracy']:.2%} |",
        f"| test accuracy | {test_m['accuracy']:.2%} | {knn['test_accuracy']:.2%} |",
        f"| test ECE | {test_m['ece']:.4f}" + (f" ({test_m['ece_scaled']:.4f} at T = {metrics['temperature']:.2f})" if scaled else "") + " | |",
        "",
        "Train accuracy is measured after training in eval mode, as the study's `model.evaluate` does.",
        "",
        "## Per-class scores (test set)",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    scores = test_m["per_class"]
    for i, name in enumerate(classes):
        lines.append(f"| {name} | {scores['precision'][i]:.3f} | {scores['recall'][i]:.3f} | {scores['f1'][i]:.3f} | {scores['support'][i]} |")
    lines += ["", "## Top confusions (test set, true → predicted)", ""]
    lines += [f"{n}. {t} → {p}: {count}" for n, (t, p, count) in enumerate(test_m["top_confusions"], 1)]
    lines += ["", "## Confusion matrices", "", "![train](confusion_train.png) ![test](confusion_test.png)", ""]
    lines += ["## Training curves", "", "![curves](curves.png)", ""]
    lines += ["## Examples from the test set", ""]
    probs = test.probabilities
    for key, title in EXAMPLE_TITLES.items():
        lines += [f"### {title}", "", "| test index | predicted | true | probability |", "| ---: | --- | --- | ---: |"]
        for i in metrics["examples"][key]:
            lines.append(f"| {i} | {classes[int(probs[i].argmax())]} | {classes[int(test.labels[i])]} | {probs[i].max():.4f} |")
        lines += ["", f"![{title}]({key}.png)", ""]
    lines += [
        "## Calibration",
        "",
        f"Expected calibration error (15 equal-width bins) on the test set: {test_m['ece']:.4f}.",
    ]
    if scaled:
        lines.append(
            f"Temperature scaling fitted on the {metrics['selection_images']}: T = {metrics['temperature']:.3f}, "
            f"test ECE {test_m['ece_scaled']:.4f} after (accuracy unchanged). This is the network's own calibration, on "
            "lossless images without test-time augmentation; a bundle's temperature is fitted by `cifar10 export` on the views "
            "its graph averages and on every upload condition, and `cifar10 robustness` reports the ECE it serves."
        )
    else:
        lines.append("No temperature scaling: the run trained on every training image; train with `--holdout N` to fit one.")
    lines += ["", "![reliability](reliability.png)", "", "## KNN on embeddings", ""]
    lines += [
        f"A k-nearest-neighbour vote (`bundle/knn.py`) on the {len(test.embeddings[0])}-dimensional penultimate embeddings. k and the "
        f"distance were chosen on the {metrics['selection_images']} ({knn['validation_images']:,} images; "
        f"never the test set): **k = {knn['k']}, {knn['metric']}** (validation accuracy "
        f"{knn['validation_accuracy']:.2%}), then refitted on every training embedding.",
        "",
        "| distance | " + " | ".join(f"k={k}" for k in _ks(knn)) + " |",
        "| --- |" + " ---: |" * len(_ks(knn)),
    ]
    for metric in dict.fromkeys(key.split(" k=")[0] for key in knn["validation_scores"]):
        lines.append(f"| {metric} | " + " | ".join(f"{knn['validation_scores'][f'{metric} k={k}']:.2%}" for k in _ks(knn)) + " |")
    lines += [
        "",
        f"KNN test accuracy {knn['test_accuracy']:.2%} against the network's {test_m['accuracy']:.2%}. "
        "Nearest training images of the first test images (label and distance):",
        "",
        "![neighbours](neighbours.png)",
        "",
    ]
    return "\n".join(lines)


def _ks(knn: dict) -> list[int]:
    return list(dict.fromkeys(int(key.split(" k=")[1]) for key in knn["validation_scores"]))


def compare_table(report_dirs: list[Path]) -> str:
    """The study's narrative, one row per evaluated run, from each report's metrics.json."""
    rows = [
        "| run | recipe | epochs | train acc | test acc | KNN test acc | KNN choice | test ECE |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for folder in report_dirs:
        metrics = json.loads((folder / "metrics.json").read_text())
        rows.append(
            f"| {metrics['run']} | {metrics['recipe']['name']} | {metrics['epochs']} | {metrics['train']['accuracy']:.2%} | "
            f"{metrics['test']['accuracy']:.2%} | {metrics['knn']['test_accuracy']:.2%} | "
            f"k={metrics['knn']['k']} {metrics['knn']['metric']} | {metrics['test']['ece']:.4f} |"
        )
    return "\n".join(rows)


RELIABILITY_CONDITIONS = ("png", "jpeg75")  # the diagrams a robustness report draws


def write_robustness_report(out: Path, manifest, tables: dict[str, dict], answers: dict, labels: np.ndarray, command: str) -> Path:
    """robustness.md (a table per graph measured) and reliability diagrams before and after calibration."""
    from training.machine import cpu_model
    from training.metrics import calibration_bins
    from training.robustness import format_table

    out.mkdir(parents=True, exist_ok=True)
    c = manifest.calibration
    lines = [
        f"# `{manifest.name}` under uploads ({manifest.recipe.get('name', manifest.architecture)}, version {manifest.version})",
        "",
        f"Made by `{command}` on {cpu_model()}: the first {len(labels):,} CIFAR-10 test images, each sent as the upload a "
        "client would make (Pillow's encoders) and decoded by the service's own decoder. ECE: expected calibration "
        "error of the top-1 probability, 15 equal-width bins.",
        "",
        (f"Calibration: temperature {c.temperature:.3f}, fitted on {c.fit_images:,} held-out training images sent as "
         f"{', '.join(c.fit_conditions)}." if c.method == "temperature" else "Calibration: none (the run kept no held-out images)."),
        "",
    ]  # fmt: skip
    for precision, rows in tables.items():
        lines += [f"## {precision}", "", format_table(rows), ""]
        for name in RELIABILITY_CONDITIONS:
            a = answers[precision].get(name)
            if a is None:
                continue
            correct = a.predicted == labels
            before = calibration_bins(a.uncalibrated, correct) if a.uncalibrated is not None else None
            path = plot_reliability(before, calibration_bins(a.confidence, correct), out / f"reliability-{precision}-{name}.png",
                                    labels=("softmax(logits)", "probabilities (calibrated)"))  # fmt: skip
            lines += [f"![{precision}, {rows[name]['description']}]({path.name})"]
        lines.append("")
    report = out / "robustness.md"
    report.write_text("\n".join(lines))
    write_json(out / "robustness.json", tables)
    return report
