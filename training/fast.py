"""The fast loop of the `fast`, `cnn-fast` and `vgg16-fast` recipes (hyperparameters: recipes.RECIPES; figures: docs/training.md).

Our implementation of the techniques Keller Jordan published as airbench94
(github.com/KellerJordan/cifar10-airbench; "94% on CIFAR-10 in 3.29 seconds on a single GPU",
2024), which build on David Page's "How to train your ResNet" (myrtle.ai, 2018):

- the first convolution whitens 2×2 patches: its filters are the eigenvectors of the training
  patches' covariance (and their negatives), scaled by 1/√eigenvalue, and never trained;
- Nesterov SGD with batch 1024, learning rate and weight decay in decoupled form (per 1024
  images, independent of momentum), BatchNorm shifts at 64× the rate, a triangular schedule;
- label smoothing 0.2;
- alternating flips: a random half of the images is mirrored once, then every image is mirrored
  on odd epochs, so each image is seen both ways in every pair of epochs; and random translation
  by up to 2 pixels with reflect padding;
- (ours) what uploads do to photographs, regenerated every epoch (training.uploads): blur, sensor
  noise, JPEG and WebP re-encoding, each on a share of the images at a random strength;
- lookahead: from the fourth epoch, every 5 steps the weights are pulled into an average that
  tightens towards the end of training;
- test-time augmentation (models.TestTimeAugmentation) for the reported accuracy, and by
  `cifar10 export --tta` inside the served graph.

Each epoch's random draws come from a generator seeded by (seed, epoch), so a run interrupted
at any step resumes to exactly the run it would have been.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.data import Cifar10
from training.evaluate import autocast, evaluate, evaluate_uploads
from training.models import Classifier, TestTimeAugmentation
from training.train import (
    CHECKPOINT_FORMAT,
    epoch_bar,
    log_epoch,
    make_model,
    normalization,
    save_and_stop,
    save_checkpoint,
    stop_on_sigint,
    write_json,
    write_summary,
)
from training.uploads import simulate

WHITENING_EPS = 5e-4  # added to the eigenvalues, so near-constant patch directions are not blown up


@dataclass
class Position:
    epoch: int = 0
    step: int = 0  # next batch of that epoch
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def init_whitening(model: Classifier, images: torch.Tensor) -> None:
    """Set the frozen first conv to whiten 2×2 patches of (normalised) training images."""
    conv = model.body[0]
    with torch.no_grad():
        x = model.normalize(images)
        k = conv.kernel_size[0]
        patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors / (eigenvalues + WHITENING_EPS).sqrt()).T.reshape(-1, 3, k, k).float()
        conv.weight.copy_(torch.cat([filters, -filters]))
        conv.bias.zero_()


def make_optimizer(model: Classifier, recipe: dict) -> torch.optim.SGD:
    """Nesterov SGD with airbench's decoupled hyperparameters turned into PyTorch's."""
    # Under constant gradients Nesterov momentum m takes steps 1 + 1/(1-m) times the gradient;
    # dividing by that (and per 1024 images) makes `lr` the step size whatever the momentum.
    per_image = 1024 * (1 + 1 / (1 - recipe["momentum"]))
    lr = recipe["lr"] / per_image
    decay = recipe["weight_decay"] * recipe["batch_size"] / per_image  # per step, whatever the lr
    bn_shifts = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [p for p in model.parameters() if p.requires_grad and all(p is not b for b in bn_shifts)]
    bias_lr = lr * recipe["bias_lr_factor"]
    groups = [
        dict(params=bn_shifts, lr=bias_lr, initial_lr=bias_lr, weight_decay=decay / bias_lr),
        dict(params=others, lr=lr, initial_lr=lr, weight_decay=decay / lr),
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=recipe["momentum"], nesterov=True)


def lr_factor(shape: dict, progress: float) -> float:
    """Triangular schedule: start → 1 at peak_at → end, as a fraction of training done."""
    if progress < shape["peak_at"]:
        return shape["start"] + (1 - shape["start"]) * progress / shape["peak_at"]
    return 1 + (shape["end"] - 1) * (progress - shape["peak_at"]) / (1 - shape["peak_at"])


class Lookahead:
    """An average of the weights that the model is pulled back to (Zhang et al., 2019)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None):
        self.average = state if state is not None else {k: v.detach().clone() for k, v in self._floats(model)}

    @staticmethod
    def _floats(model: nn.Module):
        return ((k, v) for k, v in model.state_dict().items() if v.is_floating_point())

    def update(self, model: nn.Module, decay: float) -> None:
        with torch.no_grad():
            for key, value in self._floats(model):
                self.average[key].lerp_(value, 1 - decay)
                value.copy_(self.average[key])


def epoch_images(padded: torch.Tensor, translate: int, epoch: int, generator: torch.Generator) -> torch.Tensor:
    """Each image cropped back to 32×32 at a random offset of ±translate; all mirrored on odd epochs."""
    size = padded.shape[-1] - 2 * translate
    offsets = torch.randint(0, 2 * translate + 1, (len(padded), 2), generator=generator).to(padded.device)
    out = torch.empty(len(padded), 3, size, size, dtype=padded.dtype, device=padded.device)
    for dy in range(2 * translate + 1):
        for dx in range(2 * translate + 1):
            chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            out[chosen] = padded[chosen, :, dy : dy + size, dx : dx + size]
    return out.flip(-1) if epoch % 2 else out


def train_fast(
    recipe: dict,
    data: Cifar10,
    run_dir: Path,
    device: torch.device,
    bf16: bool,
    resume: dict | None = None,
    progress: bool | None = None,
) -> dict:
    """Train the `fast` recipe, checkpointing every epoch and on Ctrl-C; return the run summary."""
    train_set, held_out, test_set = data.splits(recipe["limit"], recipe["holdout"])
    seed, batch_size = recipe["seed"], min(recipe["batch_size"], len(train_set))
    if resume is None:
        torch.manual_seed(seed)
        mean, std = normalization(recipe["normalization"], train_set.images)
        model = make_model(recipe, mean, std)
        if recipe["whitening_images"]:
            init_whitening(model, train_set.images[: recipe["whitening_images"]])
    else:
        mean, std = resume["mean"], resume["std"]
        model = make_model(recipe, mean, std)
        model.load_state_dict(resume["model"])
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, recipe)
    pos, lookahead = Position(), None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        pos = Position(**resume["position"])
        if resume["lookahead"] is not None:
            lookahead = Lookahead(model, {k: v.to(device) for k, v in resume["lookahead"].items()})

    def checkpoint() -> dict:
        return dict(
            format=CHECKPOINT_FORMAT, recipe=recipe, classes=list(data.classes), mean=mean, std=std,
            model=model.state_dict(), optimizer=optimizer.state_dict(), position=pos.__dict__,
            lookahead=lookahead.average if lookahead else None,
        )  # fmt: skip

    # Mirror a fixed random half once; epochs then alternate all images (see epoch_images).
    mirrored = torch.rand(len(train_set), generator=torch.Generator().manual_seed(seed)) < 0.5
    images = torch.where(mirrored[:, None, None, None], train_set.images.flip(-1), train_set.images)
    pad = recipe["augment"]["translate"]
    padded = F.pad(images.float(), (pad,) * 4, mode="reflect").to(device, torch.uint8)  # integer pixels: exact
    labels = train_set.labels.to(device)
    steps = len(train_set) // batch_size
    total_steps = steps * recipe["epochs"]
    whitening_bias = model.body[0].bias if recipe["whitening_images"] else None
    ahead = recipe["lookahead"]
    started = time.perf_counter()
    with stop_on_sigint() as sigint:
        while pos.epoch < recipe["epochs"]:
            tick = time.perf_counter()  # the epoch's time includes making its images
            generator = torch.Generator().manual_seed(seed * 1_000_003 + pos.epoch)
            x_epoch = simulate(epoch_images(padded, pad, pos.epoch, generator), recipe.get("uploads", {}), generator)
            order = torch.randperm(len(train_set), generator=generator).to(device)
            if whitening_bias is not None:
                whitening_bias.requires_grad_(pos.epoch < recipe["whitening_bias_epochs"])
            model.train()
            bar = epoch_bar(steps, pos.step, pos.epoch, recipe["epochs"], progress)
            while pos.step < steps:
                if sigint["stop"]:
                    pos.seconds += time.perf_counter() - tick
                    bar.close()
                    save_and_stop(run_dir, checkpoint())
                done = pos.epoch * steps + pos.step
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lr_factor(recipe["lr_shape"], done / total_steps)
                idx = order[pos.step * batch_size : (pos.step + 1) * batch_size]
                x = x_epoch[idx].contiguous(memory_format=torch.channels_last)
                y = labels[idx]
                with autocast(device, bf16):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe["label_smoothing"], reduction="sum")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                pos.step += 1
                if pos.epoch >= ahead["start_epoch"] and (done + 1) % ahead["every"] == 0:
                    if lookahead is None:
                        lookahead = Lookahead(model)
                    else:  # the average tightens as training ends: move fast first, settle last
                        decay = ahead["decay"] ** ahead["every"] * ((done + 1) / total_steps) ** ahead["power"]
                        lookahead.update(model, decay)
                pos.loss_sum += loss.item()
                pos.correct += (logits.argmax(1) == y).sum().item()
                pos.seen += len(y)
                bar.update()
                bar.set_postfix(loss=f"{pos.loss_sum / pos.seen:.3f}", acc=f"{pos.correct / pos.seen:.3f}")
            bar.close()
            if lookahead is not None:
                lookahead.update(model, decay=1.0)  # the epoch ends on the averaged weights
            pos.seconds += time.perf_counter() - tick
            test = evaluate(model, test_set, device, bf16)
            row = dict(
                epoch=pos.epoch + 1, lr=optimizer.param_groups[1]["lr"], train_loss=pos.loss_sum / pos.seen,
                train_accuracy=pos.correct / pos.seen, test_loss=test["loss"], test_accuracy=test["accuracy"],
                seconds=round(pos.seconds, 2),
            )  # fmt: skip
            pos = Position(epoch=pos.epoch + 1, history=pos.history + [row])
            save_checkpoint(run_dir, checkpoint())
            write_json(run_dir / "history.json", pos.history)
            log_epoch(row, recipe["epochs"])
    final = dict(train=evaluate(model, train_set, device, bf16), test=evaluate(model, test_set, device, bf16))
    final["test_tta"] = {
        level: evaluate(TestTimeAugmentation(model, level), test_set, device, bf16) for level in ("flip", "flip-translate")
    }
    if len(held_out):  # what choices between recipes are made on, never the test set
        served = TestTimeAugmentation(model, recipe["tta"])
        final["held_out"] = evaluate(served, held_out, device, bf16)
        final["held_out_uploads"] = evaluate_uploads(served, held_out, device, bf16)
    return write_summary(run_dir, recipe, data, model, device, bf16, pos.history, started, final)

