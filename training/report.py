"""What we show people: dataset facts and image grids (PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from training.data import Cifar10, Split  # noqa: E402


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
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.8 + 1.2, len(classes) * 0.8))
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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def runs_table(runs_dir: Path) -> str:
    """A markdown table of every finished run under runs_dir, oldest first."""
    rows = [
        "| run | recipe | epochs | train acc | test acc | train time | median s/epoch | device |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for summary_file in sorted(runs_dir.glob("*/run.json"), key=lambda p: p.stat().st_mtime):
        summary = json.loads(summary_file.read_text())
        history = json.loads((summary_file.parent / "history.json").read_text())
        seconds = sorted(row["seconds"] for row in history)
        final, recipe = summary["final"], summary["recipe"]
        limit = f" (first {recipe['limit']})" if recipe.get("limit") else ""
        rows.append(
            f"| {summary_file.parent.name} | {recipe['name']}{limit} | {len(history)} | "
            f"{final['train']['accuracy']:.2%} | {final['test']['accuracy']:.2%} | "
            f"{summary['train_seconds'] / 60:.1f} min | {seconds[len(seconds) // 2]:.0f} | "
            f"{summary['device_name']}{', bf16' if summary['bf16'] else ''} |"
        )
    return "\n".join(rows)
