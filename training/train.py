"""The training loop: one function, data as tensors on the device, resumable at any step.

A run folder holds checkpoint.pt (everything needed to continue, written atomically after
every epoch and on Ctrl-C), history.json (one row per epoch) and run.json (the recipe, the
machine, the final metrics).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cifar10.errors import Interrupted, UserError
from training.data import Cifar10, augment
from training.evaluate import autocast, evaluate
from training.hardware import describe
from training.models import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model, count_parameters, read_torch_file
from training.recipes import lr_at

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class Position:
    """Where the run stands, so that a resumed run replays exactly what an unbroken one does."""

    epoch: int = 0  # 0-based epoch in progress
    step: int = 0  # next batch of that epoch
    order: torch.Tensor | None = None  # the epoch's shuffle
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc


def normalization(kind: str, train_images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) in pixel units for the recipe's normalisation."""
    if kind == "unit":
        return [0.0] * 3, [255.0] * 3
    if kind == "global_zscore":  # one mean and std over every pixel of the training set
        x = train_images.float()
        return [x.mean().item()] * 3, [x.std().item()] * 3
    if kind == "channel_zscore":
        x = train_images.float().transpose(0, 1).reshape(3, -1)
        return x.mean(1).tolist(), x.std(1).tolist()
    if kind == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    raise UserError(f"unknown normalization {kind!r}; use unit, global_zscore, channel_zscore or imagenet")


def make_model(recipe: dict, mean, std) -> Classifier:
    options = dict(weights=recipe["weights"], freeze=recipe["freeze"]) if recipe["model"].startswith("vgg") else {}
    return build_model(recipe["model"], mean, std, **options)


def make_optimizer(model: Classifier, recipe: dict) -> torch.optim.Optimizer:
    """Adam with Keras' epsilon; L2 on conv kernels only, as the study's kernel_regularizer."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    kernels = [p for p in trainable if p.ndim == 4]
    others = [p for p in trainable if p.ndim != 4]
    # Keras adds l2·Σw² to the loss; its gradient 2·l2·w is what Adam's weight_decay adds.
    groups = [dict(params=kernels, weight_decay=2 * recipe["l2"]), dict(params=others, weight_decay=0.0)]
    return torch.optim.Adam(groups, lr=recipe["lr"], eps=1e-7)


def new_run_dir(runs_root: Path, recipe_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    runs_root.mkdir(parents=True, exist_ok=True)
    for suffix in itertools.count(1):  # mkdir is atomic: runs started in the same second get -2, -3…
        run_dir = runs_root / (f"{recipe_name}-{stamp}" + (f"-{suffix}" if suffix > 1 else ""))
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue


def load_checkpoint(path: Path) -> dict:
    """A run folder or a checkpoint file; a damaged file is a UserError, not a traceback."""
    file = path / CHECKPOINT if path.is_dir() else path
    state = read_torch_file(file, "checkpoint", f"Pass a run folder from runs/ or its {CHECKPOINT}.")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{file} is not a checkpoint written by this version of cifar10 train")
    return state


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written checkpoint."""
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / CHECKPOINT)


@contextmanager
def stop_on_sigint():
    """The first Ctrl-C asks the loop to stop at the next step boundary; a second one kills."""
    requested = {"stop": False}

    def handler(signum, frame):
        if requested["stop"]:
            raise KeyboardInterrupt
        requested["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
        yield requested
        return
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def train(
    recipe: dict,
    data: Cifar10,
    run_dir: Path,
    device: torch.device,
    bf16: bool,
    resume: dict | None = None,
    progress: bool | None = None,
) -> dict:
    """Train to recipe['epochs'], checkpointing every epoch; return the run summary."""
    train_set, _, test_set = data.splits(recipe["limit"], recipe.get("holdout", 0))
    if resume is None:
        torch.manual_seed(recipe["seed"])
        mean, std = normalization(recipe["normalization"], train_set.images)
    else:
        mean, std = resume["mean"], resume["std"]
    # a resumed run takes every weight from its checkpoint: no need for the pretrained file again
    model = make_model(dict(recipe, weights="none") if resume else recipe, mean, std)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, recipe)
    generator = torch.Generator().manual_seed(recipe["seed"])
    pos = Position()
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        if device.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], device)
        pos = Position(**resume["position"])

    def checkpoint() -> dict:
        return dict(
            format=CHECKPOINT_FORMAT, recipe=recipe, classes=list(data.classes), mean=mean, std=std,
            model=model.state_dict(), optimizer=optimizer.state_dict(), generator=generator.get_state(),
            torch_rng=torch.get_rng_state(), position=pos.__dict__,
            cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        )  # fmt: skip

    images = train_set.images.to(device)
    labels = train_set.labels.to(device)
    steps = -(-len(train_set) // recipe["batch_size"])
    started = time.perf_counter()
    with stop_on_sigint() as sigint:
        while pos.epoch < recipe["epochs"]:
            lr = lr_at(recipe, pos.epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if pos.order is None:
                pos.order = torch.randperm(len(train_set), generator=generator)
            model.train()
            bar = epoch_bar(steps, pos.step, pos.epoch, recipe["epochs"], progress)
            tick = time.perf_counter()
            while pos.step < steps:
                if sigint["stop"]:
                    pos.seconds += time.perf_counter() - tick
                    bar.close()
                    save_and_stop(run_dir, checkpoint())
                idx = pos.order[pos.step * recipe["batch_size"] : (pos.step + 1) * recipe["batch_size"]].to(device)
                x = augment(images[idx], generator, **recipe["augment"]).contiguous(memory_format=torch.channels_last)
                y = labels[idx]
                with autocast(device, bf16):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                pos.step += 1
                pos.loss_sum += loss.item() * len(y)
                pos.correct += (logits.argmax(1) == y).sum().item()
                pos.seen += len(y)
                bar.update()
                bar.set_postfix(loss=f"{pos.loss_sum / pos.seen:.3f}", acc=f"{pos.correct / pos.seen:.3f}")
            bar.close()
            pos.seconds += time.perf_counter() - tick
            test = evaluate(model, test_set, device, bf16)
            row = dict(
                epoch=pos.epoch + 1, lr=lr, train_loss=pos.loss_sum / pos.seen, train_accuracy=pos.correct / pos.seen,
                test_loss=test["loss"], test_accuracy=test["accuracy"], seconds=round(pos.seconds, 2),
            )  # fmt: skip
            pos = Position(epoch=pos.epoch + 1, history=pos.history + [row])
            save_checkpoint(run_dir, checkpoint())
            write_json(run_dir / "history.json", pos.history)
            log_epoch(row, recipe["epochs"])
    # The study reports train accuracy from model.evaluate (no dropout, running BN statistics).
    final = dict(train=evaluate(model, train_set, device, bf16), test=evaluate(model, test_set, device, bf16))
    return write_summary(run_dir, recipe, data, model, device, bf16, pos.history, started, final)


def epoch_bar(steps: int, done: int, epoch: int, epochs: int, progress: bool | None) -> tqdm:
    """A progress bar per epoch; progress None shows it on terminals only."""
    return tqdm(
        total=steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
        disable=None if progress is None else not progress,
    )  # fmt: skip


def save_and_stop(run_dir: Path, state: dict) -> NoReturn:
    """Ctrl-C: keep where the run stands, and leave with the command that continues it."""
    save_checkpoint(run_dir, state)
    raise Interrupted(f"interrupted; resume with: cifar10 train --resume {run_dir}")


def log_epoch(row: dict, epochs: int) -> None:
    tqdm.write(
        f"epoch {row['epoch']:3d}/{epochs}  lr {row['lr']:.2e}  loss {row['train_loss']:.4f}  "
        f"acc {row['train_accuracy']:.4f}  test_loss {row['test_loss']:.4f}  "
        f"test_acc {row['test_accuracy']:.4f}  {row['seconds']:.1f}s"
    )


def write_summary(
    run_dir: Path, recipe: dict, data: Cifar10, model: Classifier, device: torch.device, bf16: bool,
    history: list[dict], started: float, final: dict,
) -> dict:  # fmt: skip
    """run.json: what was trained, where, how long, and the final metrics."""
    train_set, _, test_set = data.splits(recipe["limit"], recipe.get("holdout", 0))
    summary = dict(
        recipe=recipe,
        classes=list(data.classes),
        data=dict(source=data.source, train_images=len(train_set), held_out=recipe.get("holdout", 0), test_images=len(test_set)),
        parameters=count_parameters(model),
        device=str(device),
        device_name=describe(device),
        bf16=bf16,
        torch=torch.__version__,
        train_seconds=round(sum(r["seconds"] for r in history), 1),
        wall_seconds_this_session=round(time.perf_counter() - started, 1),
        final=final,
        finished=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_json(run_dir / "run.json", summary)
    return summary


def write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
