"""The skeleton both training loops share: a run is epochs of steps, resumable at any step.

A loop (the study's in training/study.py, the fast one in training/fast.py) says what its epochs
and steps do, as `Steps`; `run_epochs` does the rest, the same for both: the progress bar,
Ctrl-C, the test evaluation after each epoch, history.json, and checkpoint.pt after every epoch
and on Ctrl-C. `start` builds the model a run begins from, or the one it resumes, and
`write_summary` writes run.json at the end.

A run folder holds checkpoint.pt (everything needed to continue, written atomically), history.json
(one row per epoch) and run.json (the recipe, the machine, the final metrics).
"""

from __future__ import annotations

import itertools
import json
import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn, Protocol

import torch
from tqdm import tqdm

from cifar10.errors import Interrupted, UserError
from cifar10.files import write_whole, written_whole
from training.data import Cifar10, Split
from training.evaluate import evaluate
from training.hardware import describe
from training.models import IMAGENET_MEAN, IMAGENET_STD, Classifier, build_model, count_parameters, read_torch_file
from training.recipes import resumed

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class Position:
    """Where the run stands, so that a resumed run replays exactly what an unbroken one does."""

    epoch: int = 0  # 0-based epoch in progress
    step: int = 0  # next batch of that epoch
    order: torch.Tensor | None = None  # the epoch's shuffle, where a loop keeps it (the study's)
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


class Steps(Protocol):
    """What one loop's epochs and steps do; `run_epochs` calls them in this order."""

    steps: int  # batches per epoch

    def begin_epoch(self, pos: Position) -> None:
        """Before the epoch's first step (or the step it resumes at): its images, order, rates."""

    def step(self, pos: Position) -> tuple[float, int, int]:
        """Train on batch `pos.step` of epoch `pos.epoch`: (summed loss, correct answers, images)."""

    def end_epoch(self, pos: Position) -> float:
        """After the epoch's last step; the learning rate its history row records."""

    def state(self) -> dict:
        """What the checkpoint holds for this loop beyond the model, the optimizer and the position."""


@dataclass
class Start:
    """What a run begins from: its splits, its model and optimizer, and where it stands."""

    train_set: Split
    held_out: Split
    test_set: Split
    model: Classifier
    mean: list[float]
    std: list[float]
    pos: Position


def start(
    recipe: dict, data: Cifar10, device: torch.device, resume: dict | None,
    make_optimizer: Callable[[Classifier, dict], torch.optim.Optimizer], init: Callable[[Classifier, Split], None] | None = None,
) -> tuple[Start, torch.optim.Optimizer]:  # fmt: skip
    """A new model (seeded, normalised on the training images, `init` applied), or the resumed one."""
    train_set, held_out, test_set = data.splits(recipe["limit"], recipe["holdout"])
    if resume is None:
        torch.manual_seed(recipe["seed"])
        mean, std = normalization(recipe["normalization"], train_set.images)
        model = make_model(recipe, mean, std)
        if init is not None:
            init(model, train_set)
    else:
        mean, std = resume["mean"], resume["std"]
        # every weight comes from the checkpoint: a pretrained file need not be there again
        model = make_model(dict(recipe, weights="none"), mean, std)
        model.load_state_dict(resume["model"])
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, recipe)
    pos = Position()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        pos = Position(**resume["position"])
    return Start(train_set, held_out, test_set, model, mean, std, pos), optimizer


def run_epochs(
    loop: Steps, run: Start, optimizer: torch.optim.Optimizer, recipe: dict, data: Cifar10, run_dir: Path,
    device: torch.device, bf16: bool, progress: bool | None,
) -> list[dict]:  # fmt: skip
    """Train from `run.pos` to the recipe's last epoch; the history of every epoch."""
    model, pos = run.model, run.pos

    def checkpoint() -> dict:
        return dict(
            format=CHECKPOINT_FORMAT, recipe=recipe, classes=list(data.classes), mean=run.mean, std=run.std,
            model=model.state_dict(), optimizer=optimizer.state_dict(), position=pos.__dict__, **loop.state(),
        )  # fmt: skip

    with stop_on_sigint() as sigint:
        while pos.epoch < recipe["epochs"]:
            tick = time.perf_counter()  # the epoch's time includes making its images
            loop.begin_epoch(pos)
            model.train()
            bar = epoch_bar(loop.steps, pos.step, pos.epoch, recipe["epochs"], progress)
            while True:  # Ctrl-C is honoured before each step and after the last
                if sigint["stop"]:
                    pos.seconds += time.perf_counter() - tick
                    bar.close()
                    save_and_stop(run_dir, checkpoint())
                if pos.step >= loop.steps:
                    break
                loss_sum, correct, seen = loop.step(pos)
                if not math.isfinite(loss_sum):
                    bar.close()
                    diverged(run_dir, recipe, pos)
                pos.step += 1
                pos.loss_sum += loss_sum
                pos.correct += correct
                pos.seen += seen
                bar.update()
                bar.set_postfix(loss=f"{pos.loss_sum / pos.seen:.3f}", acc=f"{pos.correct / pos.seen:.3f}")
            bar.close()
            lr = loop.end_epoch(pos)
            pos.seconds += time.perf_counter() - tick
            test = evaluate(model, run.test_set, device, bf16)
            row = dict(
                epoch=pos.epoch + 1, lr=lr, train_loss=pos.loss_sum / pos.seen, train_accuracy=pos.correct / pos.seen,
                test_loss=test["loss"], test_accuracy=test["accuracy"], seconds=round(pos.seconds, 2),
            )  # fmt: skip
            pos = Position(epoch=pos.epoch + 1, history=pos.history + [row])
            save_checkpoint(run_dir, checkpoint())
            write_json(run_dir / "history.json", pos.history)
            log_epoch(row, recipe["epochs"])
        if sigint["stop"]:  # asked during the last epoch's evaluation: the resumed run starts at the final evaluations
            save_and_stop(run_dir, checkpoint())
    return pos.history


def diverged(run_dir: Path, recipe: dict, pos: Position) -> NoReturn:
    """A loss that is no longer a number will not become one again: stop now, not after the last epoch
    (whose bundle would answer NaN), and say what to change; --resume would replay the same steps."""
    kept = (run_dir / CHECKPOINT).exists()
    raise UserError(
        f"training diverged: the loss is not a number at epoch {pos.epoch + 1}, step {pos.step + 1}. Train again with a lower "
        f"--lr (this run's: {recipe['lr']:g}) or more images and steps"
        + (f"; {run_dir} keeps the last whole epoch's checkpoint, which --resume would lead to the same point" if kept else "")
    )


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


def plan_resume(path: Path, recipe_name: str | None, epochs: int | None) -> tuple[dict, dict, Path]:
    """(recipe, checkpoint, run folder) to go on with a run from, given `--resume PATH [RECIPE] [--epochs N]`;
    refused where it would no longer be the run it was, or where nothing is left to do."""
    state = load_checkpoint(path)
    recipe = resumed(state["recipe"])
    if recipe_name and recipe_name != recipe["name"]:
        raise UserError(f"{path} is a {recipe['name']} run, not {recipe_name}")
    if recipe["loop"] == "fast" and epochs not in (None, recipe["epochs"]):
        raise UserError("a fast run's schedule spans its whole length; --resume it as it was, without --epochs")
    if epochs is not None and epochs <= (done := len(state["position"]["history"])):
        raise UserError(f"--epochs {epochs}: the run has finished {done} epochs already; give more")
    recipe["epochs"] = epochs if epochs is not None else recipe["epochs"]
    run_dir = path if path.is_dir() else path.parent
    results = run_dir / "run.json"  # written at a run's end; a run trained on with --epochs still holds the shorter run's
    if epochs is None and state["position"]["epoch"] >= recipe["epochs"] and results.is_file() and json.loads(results.read_text())["recipe"]["epochs"] == recipe["epochs"]:
        more = "" if recipe["loop"] == "fast" else f"; train it on with --resume {run_dir} --epochs N"
        raise UserError(f"{run_dir} has finished (its results are in run.json): nothing to resume{more}")
    return recipe, state, run_dir


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """A crash never leaves a half-written checkpoint."""
    written_whole(run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))


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


def epoch_bar(steps: int, done: int, epoch: int, epochs: int, progress: bool | None) -> tqdm:
    """A progress bar per epoch; progress None shows it on terminals only."""
    return tqdm(
        total=steps, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
        disable=None if progress is None else not progress,
    )  # fmt: skip


def save_and_stop(run_dir: Path, state: dict) -> NoReturn:
    """Ctrl-C: keep where the run stands, and leave with the command that continues it."""
    save_checkpoint(run_dir, state)
    raise interrupted(run_dir)


def interrupted(run_dir: Path) -> Interrupted:
    return Interrupted(f"interrupted; resume with: cifar10 train --resume {run_dir}")


def log_epoch(row: dict, epochs: int) -> None:
    tqdm.write(
        f"epoch {row['epoch']:3d}/{epochs}  lr {row['lr']:.2e}  loss {row['train_loss']:.4f}  "
        f"batch_acc {row['train_accuracy']:.4f}  test_loss {row['test_loss']:.4f}  "
        f"test_acc {row['test_accuracy']:.4f}  {row['seconds']:.1f}s"
    )


def write_summary(
    run_dir: Path, recipe: dict, data: Cifar10, model: Classifier, device: torch.device, bf16: bool,
    history: list[dict], started: float, final: dict,
) -> dict:  # fmt: skip
    """run.json: what was trained, where, how long, and the final metrics."""
    train_set, _, test_set = data.splits(recipe["limit"], recipe["holdout"])
    summary = dict(
        recipe=recipe,
        classes=list(data.classes),
        data=dict(source=data.source, train_images=len(train_set), held_out=recipe["holdout"], test_images=len(test_set)),
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
    write_whole(path, json.dumps(content, indent=2) + "\n")
