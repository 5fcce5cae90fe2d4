"""The study's networks, each wrapped so that pixels go in and (logits, embedding) come out.

Normalisation is a buffer inside the model, not a step of the data pipeline: the constants
are saved with the weights and later exported into the ONNX graph, so training and serving
cannot disagree about them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from bundle.manifest import TTA_LEVELS
from cifar10.errors import UserError

NUM_CLASSES = 10
VGG16_BLOCK3_POOL = 17  # torchvision vgg16().features[:17] ends with block3_pool
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # in pixel units, as the model sees them
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class Normalize(nn.Module):
    """(pixels - mean) / std per channel, with mean and std in 0..255 units."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class Classifier(nn.Module):
    """normalise → body (ends at the penultimate layer) → dropout → linear head."""

    def __init__(self, body: nn.Module, embedding_dim: int, dropout: float, mean, std, head_bias: bool = True):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = body
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embedding_dim, NUM_CLASSES, bias=head_bias)
        self.embedding_dim = embedding_dim

    def forward_with_embedding(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.body(self.normalize(pixels))
        return self.head(self.dropout(embedding)), embedding

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(pixels)[0]


def _conv_relu_bn(cin: int, cout: int) -> list[nn.Module]:
    """Keras' Conv2D(activation='relu') followed by BatchNormalization (Keras' eps and momentum)."""
    return [nn.Conv2d(cin, cout, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]


def seed_cnn(mean, std, dropout: float = 0.25) -> Classifier:
    """The study's Keras CNN: 81,962 trainable parameters, 384 BatchNorm running statistics."""
    body = nn.Sequential(
        *_conv_relu_bn(3, 32), *_conv_relu_bn(32, 32), nn.MaxPool2d(2), nn.Dropout(dropout),
        *_conv_relu_bn(32, 64), *_conv_relu_bn(64, 64), nn.MaxPool2d(2),
        nn.Flatten(),
    )  # fmt: skip
    model = Classifier(body, embedding_dim=64 * 5 * 5, dropout=dropout, mean=mean, std=std)
    for m in model.modules():  # Keras initialises kernels with Glorot-uniform and biases with zeros
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def vgg16_3block(mean, std, weights: str = "none", freeze: bool = False) -> Classifier:
    """VGG16 up to block3_pool (256×4×4) + Dense 256 ReLU + BatchNorm + Dropout 0.5 + Dense 10."""
    features = load_vgg16_features(weights)[:VGG16_BLOCK3_POOL]
    return _vgg_classifier(features, 256 * 4 * 4, mean, std, freeze)


def vgg16_full(mean, std, weights: str = "none", freeze: bool = False) -> Classifier:
    """All five VGG16 blocks (512×1×1 on 32×32 inputs) with the same head."""
    return _vgg_classifier(load_vgg16_features(weights), 512, mean, std, freeze)


def vgg16_bn(mean, std, weights: str = "none", freeze: bool = False) -> Classifier:
    """All five blocks with BatchNorm after each convolution (torchvision's vgg16_bn), the same head.

    The variant to train from scratch: plain VGG16 (no BatchNorm) stalls from random weights.
    """
    return _vgg_classifier(load_vgg16_features(weights, batch_norm=True), 512, mean, std, freeze)


def _vgg_classifier(features: nn.Sequential, flat: int, mean, std, freeze: bool) -> Classifier:
    for p in features.parameters():
        p.requires_grad_(not freeze)
    body = nn.Sequential(features, nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(inplace=True), nn.BatchNorm1d(256))
    return Classifier(body, embedding_dim=256, dropout=0.5, mean=mean, std=std)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _same_conv(cin: int, cout: int) -> nn.Conv2d:
    """3×3, no bias (BatchNorm follows), the first `cin` filters initialised to the identity."""
    conv = nn.Conv2d(cin, cout, 3, padding="same", bias=False)
    nn.init.dirac_(conv.weight.data[:cin])
    return conv


def _fixed_scale_bn(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with a learnt shift only: the scale stays 1 (airbench's choice)."""
    bn = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


def _conv_group(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        _same_conv(cin, cout), nn.MaxPool2d(2), _fixed_scale_bn(cout), nn.GELU(),
        _same_conv(cout, cout), _fixed_scale_bn(cout), nn.GELU(),
    )  # fmt: skip


def airbench(mean, std, widths: Sequence[int] = (64, 256, 256), logit_scale: float = 1 / 9) -> Classifier:
    """The `fast` recipe's network, after Keller Jordan's airbench94: 2×2 whitening conv (its
    weights are set from the data by training.fast and frozen), three conv groups, no residuals.

    The logit scale sits at the end of the body, so the embedding is the scaled pooled feature:
    head(s·x) without a bias is s·head(x).
    """
    whitening = nn.Conv2d(3, WHITENING_CHANNELS, kernel_size=2, padding=0, bias=True)
    whitening.weight.requires_grad_(False)
    body = nn.Sequential(
        whitening, nn.GELU(),
        _conv_group(WHITENING_CHANNELS, widths[0]), _conv_group(widths[0], widths[1]), _conv_group(widths[1], widths[2]),
        nn.MaxPool2d(3), nn.Flatten(), Scale(logit_scale),
    )  # fmt: skip
    return Classifier(body, embedding_dim=widths[2], dropout=0.0, mean=mean, std=std, head_bias=False)


def airbench_wide(mean, std) -> Classifier:
    """airbench95's widths (128/384/384): 2.6× the work of `airbench` per image, for a point more on
    clean pixels in airbench's own runs; the `fast-wide` recipe's network (docs/training.md)."""
    return airbench(mean, std, widths=(128, 384, 384))


WHITENING_CHANNELS = 2 * 3 * 2 * 2  # each eigenvector of the 2×2×3 patch covariance, and its negative

class TestTimeAugmentation(nn.Module):
    """Averages logits and embeddings over mirrored and shifted views, in one batched forward.

    'flip': the image and its mirror. 'flip-translate' (airbench's level 2): half that, plus half
    the mean over the four views shifted one pixel up-left or down-right (reflect padding), each
    with its mirror. Being a module, it exports into the ONNX graph with the model.
    """

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, model: Classifier, level: str):
        super().__init__()
        if level not in TTA_LEVELS:
            raise UserError(f"unknown test-time augmentation {level!r}; choose one of {', '.join(TTA_LEVELS)}")
        self.model = model
        self.level = level
        # views in order: plain, shifted one pixel down-right, one pixel up-left, then their mirrors
        weights = {"none": [1], "flip": [1, 1], "flip-translate": [2, 1, 1, 2, 1, 1]}[level]
        device = model.normalize.mean.device  # wrapping a model on the GPU gives a module on the GPU
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32, device=device) / sum(weights))

    def forward_with_embedding(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.level == "none":
            return self.model.forward_with_embedding(pixels)
        x = pixels.float()
        views = [x]
        if self.level == "flip-translate":
            size = x.shape[-1]
            padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            views += [padded[..., :size, :size], padded[..., 2:, 2:]]
        views += [v.flip(-1) for v in views]
        logits, embedding = self.model.forward_with_embedding(torch.cat(views))
        w = self.weights.view(-1, 1, 1)
        n = x.shape[0]  # not len(x): an int would fix the exported graph's batch size
        return (logits.view(len(views), n, -1) * w).sum(0), (embedding.view(len(views), n, -1) * w).sum(0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_with_embedding(pixels)[0]


def load_vgg16_features(weights: str, batch_norm: bool = False) -> nn.Sequential:
    """VGG16's convolutional blocks: weights 'none' (random), 'imagenet' or a state-dict path.

    'imagenet' uses torchvision's IMAGENET1K_V1 (of vgg16 or vgg16_bn) through the torch hub
    cache ($TORCH_HOME), downloading only when the file is not there; it never falls back to
    random weights.
    """
    from torchvision.models import VGG16_BN_Weights, VGG16_Weights
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=batch_norm)  # without VGG16's 100M-parameter classifier
    for m in features.modules():  # torchvision's own initialisation of VGG convolutions
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    if weights == "none":
        return features
    if weights == "imagenet":
        state = _imagenet_state_dict((VGG16_BN_Weights if batch_norm else VGG16_Weights).IMAGENET1K_V1)
    else:
        state = _state_dict_from_file(Path(weights))
    try:
        features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    except RuntimeError as exc:
        raise UserError(f"weights {weights!r} do not fit torchvision's VGG16 features: {exc}".splitlines()[0]) from exc
    return features


def _imagenet_state_dict(weights) -> dict[str, torch.Tensor]:
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # offline: URLError, socket errors, partial files
        raise UserError(
            f"ImageNet VGG16 weights are not available ({type(exc).__name__}: {exc}). Download "
            f"{weights.url} and save it as {cache} (or set TORCH_HOME), or pass --weights PATH to a "
            f"state-dict file, or --weights none to train from scratch."
        ) from exc


def read_torch_file(path: Path, what: str, missing_hint: str) -> object:
    """torch.load without code execution (weights_only); any failure is a one-line UserError."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}. {missing_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{what} {path} is unreadable ({type(exc).__name__}); it may be truncated or corrupt") from exc


def _state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    state = read_torch_file(path, "weights file", "Pass --weights imagenet, none, or a state-dict path.")
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    if not any(k.startswith("features.") for k in state):  # a saved `vgg.features` module
        state = {f"features.{k}": v for k, v in state.items()}
    return state


BUILDERS: dict[str, Callable[..., Classifier]] = {
    "seed_cnn": seed_cnn,
    "vgg16_3block": vgg16_3block,
    "vgg16_full": vgg16_full,
    "vgg16_bn": vgg16_bn,
    "airbench": airbench,
    "airbench_wide": airbench_wide,
}


def build_model(name: str, mean, std, **options) -> Classifier:
    if name not in BUILDERS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name](mean, std, **options)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """The study's table: trainable weights, and BatchNorm running statistics (mean and variance)."""
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen, "bn_statistics": stats, "total": trainable + frozen + stats}
