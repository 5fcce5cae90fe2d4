"""`cifar10 train`: a recipe's loop (the study's or the fast one) run on the shared skeleton.

training/loop.py owns the run: epochs of steps, checkpoints, resume, Ctrl-C, history and run.json.
training/study.py and training/fast.py say what their optimizer, epochs and steps are.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from training import fast, study
from training.data import Cifar10
from training.evaluate import evaluate
from training.loop import interrupted, run_epochs, start, write_summary


def train(
    recipe: dict,
    data: Cifar10,
    run_dir: Path,
    device: torch.device,
    bf16: bool,
    resume: dict | None = None,
    progress: bool | None = None,
) -> dict:
    """Train to recipe['epochs'] (or on from `resume`), checkpointing every epoch and on Ctrl-C; the run summary."""
    loop = fast if recipe["loop"] == "fast" else study  # each loop module: model_init, make_optimizer, Steps, final_metrics
    run, optimizer = start(recipe, data, device, resume, loop.make_optimizer, loop.model_init(recipe))
    started = time.perf_counter()
    steps = loop.Steps(recipe, run, optimizer, device, bf16, resume)
    history = run_epochs(steps, run, optimizer, recipe, data, run_dir, device, bf16, progress)
    try:
        # train accuracy as the study reports it: model.evaluate (no dropout, running BN statistics)
        final = dict(
            train=evaluate(run.model, run.train_set, device, bf16, progress="final: training set"),
            test=evaluate(run.model, run.test_set, device, bf16, progress="final: test set"),
        )
        final |= loop.final_metrics(run, recipe, device, bf16)
    except KeyboardInterrupt:  # every epoch is in the checkpoint: a resumed run starts at these evaluations
        raise interrupted(run_dir) from None
    return write_summary(run_dir, recipe, data, run.model, device, bf16, history, started, final)
