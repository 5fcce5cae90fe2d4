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

Its steps fill in the skeleton of training/loop.py; training/train.py runs it.

Each epoch's random draws come from a generator seeded by (seed, epoch), so a run interrupted
at any step resumes to exactly the run it would have been.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from training.data import Split
from training.evaluate import autocast, evaluate, evaluate_uploads
from training.loop import Position, Start
from training.models import Classifier, TestTimeAugmentation
from training.uploads import simulate


def init_whitening(model: Classifier, images: torch.Tensor, eps: float) -> None:
    """Set the frozen first conv to whiten 2×2 patches of (normalised) training images.

    eps is added to the eigenvalues: it caps the gain of the faintest patch directions (fine
    colour and texture detail, what JPEG and sensor noise alter most) at 1/√eps.
    """
    conv = model.body[0]
    with torch.no_grad():
        x = model.normalize(images)
        k = conv.kernel_size[0]
        patches = x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k).double()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.reshape(-1, 3, k, k).float()
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


# a run that climbs to its peak learning rate in fewer steps than this was seen to diverge (cnn-fast, --limit 10000 --epochs 3)
STEPS_TO_PEAK = 100


class Steps:
    """Each epoch: crops, mirrors and uploads made for all images at once, from a generator seeded by
    (seed, epoch); each step: the rate of its point in the triangle, an SGD step, the lookahead."""

    def __init__(self, recipe: dict, run: Start, optimizer: torch.optim.SGD, device: torch.device, bf16: bool, resume: dict | None):
        self.recipe, self.model, self.optimizer, self.device, self.bf16 = recipe, run.model, optimizer, device, bf16
        train_set, seed = run.train_set, recipe["seed"]
        self.batch_size = min(recipe["batch_size"], len(train_set))
        self.steps = len(train_set) // self.batch_size
        to_peak = math.ceil(recipe["lr_shape"]["peak_at"] * recipe["epochs"] * self.steps)
        if resume is None and to_peak < STEPS_TO_PEAK:
            print(
                f"warning: this run reaches the recipe's peak learning rate at step {to_peak}, where the recipe's rates were tuned "
                f"for hundreds: a run this short can diverge; for a quick look, give a lower --lr (say a tenth of {recipe['lr']:g})",
                file=sys.stderr,
            )
        # Mirror a fixed random half once; epochs then alternate all images (see epoch_images).
        mirrored = torch.rand(len(train_set), generator=torch.Generator().manual_seed(seed)) < 0.5
        images = torch.where(mirrored[:, None, None, None], train_set.images.flip(-1), train_set.images)
        self.pad = recipe["augment"]["translate"]
        self.padded = F.pad(images.float(), (self.pad,) * 4, mode="reflect").to(device, torch.uint8)  # integer pixels: exact
        self.labels = train_set.labels.to(device)
        self.whitening_bias = run.model.body[0].bias if recipe["whitening_images"] else None
        saved = resume.get("lookahead") if resume else None
        self.lookahead = Lookahead(run.model, {k: v.to(device) for k, v in saved.items()}) if saved is not None else None
        self.x = self.order = None  # the epoch's images and their order, drawn by begin_epoch

    def begin_epoch(self, pos: Position) -> None:
        generator = torch.Generator().manual_seed(self.recipe["seed"] * 1_000_003 + pos.epoch)
        self.x = simulate(epoch_images(self.padded, self.pad, pos.epoch, generator), self.recipe["uploads"], generator)
        self.order = torch.randperm(len(self.labels), generator=generator).to(self.device)
        if self.whitening_bias is not None:
            self.whitening_bias.requires_grad_(pos.epoch < self.recipe["whitening_bias_epochs"])

    def step(self, pos: Position) -> tuple[float, int, int]:
        recipe, total = self.recipe, self.steps * self.recipe["epochs"]
        done = pos.epoch * self.steps + pos.step
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(recipe["lr_shape"], done / total)
        idx = self.order[pos.step * self.batch_size : (pos.step + 1) * self.batch_size]
        x, y = self.x[idx].contiguous(memory_format=torch.channels_last), self.labels[idx]
        with autocast(self.device, self.bf16):
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe["label_smoothing"], reduction="sum")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        ahead = recipe["lookahead"]
        if pos.epoch >= ahead["start_epoch"] and (done + 1) % ahead["every"] == 0:
            if self.lookahead is None:
                self.lookahead = Lookahead(self.model)
            else:  # the average tightens as training ends: move fast first, settle last
                self.lookahead.update(self.model, ahead["decay"] ** ahead["every"] * ((done + 1) / total) ** ahead["power"])
        return loss.item(), (logits.argmax(1) == y).sum().item(), len(y)

    def end_epoch(self, pos: Position) -> float:
        if self.lookahead is not None:
            self.lookahead.update(self.model, decay=1.0)  # the epoch ends on the averaged weights
        return self.optimizer.param_groups[1]["lr"]

    def state(self) -> dict:
        return dict(lookahead=self.lookahead.average if self.lookahead else None)


def model_init(recipe: dict):
    """The fast recipes' model init: the whitening conv set from the first training images, if the network has one."""

    def init(model: Classifier, train_set: Split) -> None:
        if recipe["whitening_images"]:
            init_whitening(model, train_set.images[: recipe["whitening_images"]], recipe["whitening_eps"])

    return init


def final_metrics(run: Start, recipe: dict, device: torch.device, bf16: bool) -> dict:
    """What a fast run reports beyond train and test accuracy: the test set with each test-time
    augmentation, and the held-out images, plain and as uploads, that choices are made on."""
    final = dict(test_tta={
        level: evaluate(TestTimeAugmentation(run.model, level), run.test_set, device, bf16, progress=f"final: test set, {level}")
        for level in ("flip", "flip-translate")
    })  # fmt: skip
    if len(run.held_out):  # what choices between recipes are made on, never the test set
        served = TestTimeAugmentation(run.model, recipe["tta"])
        final["held_out"] = evaluate(served, run.held_out, device, bf16, progress="final: held-out")
        final["held_out_uploads"] = evaluate_uploads(served, run.held_out, device, bf16)
    return final
