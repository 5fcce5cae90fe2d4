"""Inference over a whole split in batches, in eval mode."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.data import Split
from training.models import Classifier
from training.robustness import CONDITIONS, decoded, uploads

EVAL_BATCH = 500


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


@torch.no_grad()
def predict(
    model: Classifier, images: torch.Tensor, device: torch.device, bf16: bool, progress: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, embeddings) as float32 CPU tensors, for uint8 images [N, 3, 32, 32].

    progress: a label for a progress bar (shown on terminals only), or None for none.
    """
    was_training = model.training
    model.eval()
    logits, embeddings = [], []
    starts = range(0, len(images), EVAL_BATCH)
    bar = tqdm(starts, desc=progress, unit="batch", leave=False, disable=None if progress else True)
    for start in bar:
        x = images[start : start + EVAL_BATCH].to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            out, emb = model.forward_with_embedding(x)
        logits.append(out.float().cpu())
        embeddings.append(emb.float().cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(embeddings)


def evaluate(model: Classifier, split: Split, device: torch.device, bf16: bool, progress: str | None = None) -> dict[str, float]:
    logits, _ = predict(model, split.images, device, bf16, progress)
    return {
        "loss": F.cross_entropy(logits, split.labels).item(),
        "accuracy": (logits.argmax(1) == split.labels).float().mean().item(),
    }


def evaluate_uploads(model: Classifier, split: Split, device: torch.device, bf16: bool) -> dict[str, float]:
    """Accuracy with the split sent as each upload condition of training.robustness and decoded as
    the service decodes it, and the mean over the conditions: what choices between upload
    augmentations are made on (with held-out images)."""
    nhwc = split.images.permute(0, 2, 3, 1).contiguous().numpy()
    scores = {}
    for name, condition in tqdm(CONDITIONS.items(), desc="final: held-out uploads", unit="condition", leave=False, disable=None):
        pixels = torch.from_numpy(decoded(uploads(nhwc, condition))).permute(0, 3, 1, 2).contiguous()
        scores[name] = evaluate(model, Split(pixels, split.labels), device, bf16)["accuracy"]
    scores["mean"] = sum(scores.values()) / len(CONDITIONS)
    return scores
