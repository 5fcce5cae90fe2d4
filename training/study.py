"""The study's training loop: Adam, a step schedule per epoch, augmentation per batch.

Its steps fill in the skeleton of training/loop.py, which owns the run folder, checkpoints, resume
and Ctrl-C; training/train.py runs it. Its random draws come from one generator whose state the checkpoint keeps, with the
epoch's shuffle, so a resumed run replays exactly what an unbroken one does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.data import augment
from training.evaluate import autocast
from training.loop import Position, Start
from training.models import Classifier
from training.recipes import lr_at


def model_init(recipe: dict) -> None:
    """The study's models start from their seeded (or pretrained) weights, with no data-dependent init."""
    return None


def make_optimizer(model: Classifier, recipe: dict) -> torch.optim.Optimizer:
    """Adam with Keras' epsilon; L2 on conv kernels only, as the study's kernel_regularizer."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    kernels = [p for p in trainable if p.ndim == 4]
    others = [p for p in trainable if p.ndim != 4]
    # Keras adds l2·Σw² to the loss; its gradient 2·l2·w is what Adam's weight_decay adds.
    groups = [dict(params=kernels, weight_decay=2 * recipe["l2"]), dict(params=others, weight_decay=0.0)]
    return torch.optim.Adam(groups, lr=recipe["lr"], eps=1e-7)


class Steps:
    """Shuffle once per epoch, set the epoch's rate; each step augments its batch and takes an Adam step."""

    def __init__(self, recipe: dict, run: Start, optimizer: torch.optim.Optimizer, device: torch.device, bf16: bool, resume: dict | None):
        self.recipe, self.model, self.optimizer, self.device, self.bf16 = recipe, run.model, optimizer, device, bf16
        self.images, self.labels = run.train_set.images.to(device), run.train_set.labels.to(device)
        self.steps = -(-len(run.train_set) // recipe["batch_size"])
        self.generator = torch.Generator().manual_seed(recipe["seed"])
        if resume is not None:
            self.generator.set_state(resume["generator"])
            torch.set_rng_state(resume["torch_rng"])
            if device.type == "cuda" and resume.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(resume["cuda_rng"], device)

    def begin_epoch(self, pos: Position) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.recipe, pos.epoch)
        if pos.order is None:
            pos.order = torch.randperm(len(self.images), generator=self.generator)

    def step(self, pos: Position) -> tuple[float, int, int]:
        size = self.recipe["batch_size"]
        idx = pos.order[pos.step * size : (pos.step + 1) * size].to(self.device)
        x = augment(self.images[idx], self.generator, **self.recipe["augment"]).contiguous(memory_format=torch.channels_last)
        y = self.labels[idx]
        with autocast(self.device, self.bf16):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)

    def end_epoch(self, pos: Position) -> float:
        return lr_at(self.recipe, pos.epoch)

    def state(self) -> dict:
        return dict(
            generator=self.generator.get_state(), torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        )  # fmt: skip


def final_metrics(run: Start, recipe: dict, device: torch.device, bf16: bool) -> dict:
    """The study reports train and test accuracy alone, which every run measures."""
    return {}
