"""One dict per recipe, every hyperparameter of a run in it: the study's experiments, then ours.

Each holds exactly the keys of its loop's type (`StudyRecipe`, `FastRecipe`), checked when this
module loads, when a recipe is named and when a run resumes: a misspelt key fails at once.

The study used Keras defaults it does not name. We chose the closest PyTorch equivalents:
Adam with Keras' defaults (lr 1e-3, betas 0.9/0.999, eps 1e-7) since the study's schedule
steps between Adam-scale rates (1e-3 → 5e-4); Keras' Glorot-uniform initialisation and
BatchNorm eps/momentum; L2 as Keras' kernel_regularizer (loss += l2 · Σw² on conv kernels).
See docs/training.md for the reasoning and the measured results.
"""

from __future__ import annotations

from typing import Literal, TypedDict, get_type_hints

from cifar10.errors import UserError


class Recipe(TypedDict):
    """What every recipe says, whichever loop trains it (`check` holds recipes to it)."""

    name: str
    loop: Literal["study", "fast"]  # training/study.py or training/fast.py
    model: str
    weights: str  # VGG recipes: imagenet, none, or a state-dict path
    freeze: bool
    normalization: str
    augment: dict
    uploads: dict
    epochs: int
    batch_size: int
    lr: float
    seed: int
    limit: int | None
    holdout: int


class StudyRecipe(Recipe):
    lr_steps: dict
    l2: float


class FastRecipe(Recipe):
    momentum: float
    weight_decay: float
    bias_lr_factor: float
    lr_shape: dict
    label_smoothing: float
    lookahead: dict
    whitening_images: int
    whitening_eps: float
    whitening_bias_epochs: int
    tta: str

_CNN = dict(
    loop="study",
    model="seed_cnn",
    weights="none",
    freeze=False,
    normalization="unit",  # pixels / 255, the study's "no normalisation" baseline
    augment={},
    uploads={},  # training.uploads: blur, noise and lossy re-encoding of a share of the images
    epochs=10,
    batch_size=64,
    lr=1e-3,
    lr_steps={},  # {epoch: lr}, 0-based epochs as in Keras' LearningRateScheduler
    l2=0.0,
    seed=0,
    limit=None,  # train and test on the first N images only: quick runs and tests
    holdout=0,  # keep the last N training images out of training, for choices made after it
)

_VGG = dict(
    _CNN,
    model="vgg16_3block",
    weights="imagenet",  # the study fine-tuned ImageNet weights; --weights none trains from scratch
    normalization="global_zscore",
    lr=1e-4,  # a fine-tuning rate, so pretrained filters are adjusted rather than overwritten
)

# What uploads do to photographs (training/uploads.py): a share of the images blurred, a share
# made noisy, then a share re-encoded as JPEG at phones' and browsers' qualities and a share as
# WebP, each at a random strength, regenerated every epoch (docs/training.md). The study's
# networks train on this first mix; `fast` on milder shares, chosen on held-out images.
UPLOADS = dict(
    blur=0.15, blur_sigma=(0.3, 1.0),
    noise=0.15, noise_sigma=(2.0, 12.0),
    jpeg=0.5, jpeg_quality=(30, 95),
    webp=0.1, webp_quality=(50, 95),
)  # fmt: skip
FAST_UPLOADS = dict(UPLOADS, blur=0.1, noise=0.1, jpeg=0.35, webp=0.05)

# Held out of training by the fast recipes: the images the exported bundle's temperature is
# fitted on (training/calibration.py), and its KNN's k chosen on.
CALIBRATION_HOLDOUT = 2000

AIRBENCH_WHITENING_EPS = 5e-4  # airbench94's: added to the whitening's eigenvalues (training/fast.py)

# Keller Jordan's airbench94 techniques (training/fast.py), with airbench94's published values
# except the length (30 epochs, not 9.9: this CPU's 30-minute budget allows it) and what we add:
# upload augmentation and a held-out tail for calibration (docs/training.md).
_FAST = dict(
    loop="fast",
    model="airbench",
    weights="none",
    freeze=False,
    normalization="channel_zscore",
    augment=dict(flip="alternating", translate=2),
    uploads=FAST_UPLOADS,
    epochs=30,
    batch_size=1024,
    lr=11.5,  # per 1024 images, decoupled from momentum (see training/fast.py)
    momentum=0.85,
    weight_decay=0.0153,  # per 1024 images, decoupled from the learning rate
    bias_lr_factor=64.0,  # BatchNorm shifts learn this much faster (without more decay)
    lr_shape=dict(start=0.2, peak_at=0.23, end=0.07),  # triangular, as fractions of lr
    label_smoothing=0.2,
    lookahead=dict(start_epoch=3, every=5, decay=0.95, power=3.0),
    whitening_images=5000,
    whitening_eps=AIRBENCH_WHITENING_EPS,
    whitening_bias_epochs=3,
    tta="flip-translate",  # what the final test accuracy is reported with
    seed=0,
    limit=None,
    holdout=CALIBRATION_HOLDOUT,
)

# airbench95's wider network with its learning rate (10.0, 0.87× airbench94's) and length (15
# epochs), and `fast`'s upload mix. Tried as the default's replacement and not chosen: a step
# costs 2.6× `fast`'s and it gained little on held-out images (docs/training.md).
_FAST_WIDE = dict(_FAST, model="airbench_wide", epochs=15, lr=10.0)

# VGG16 from scratch with the fast loop: BatchNorm after every convolution (vgg16_bn), else the
# study's head; no whitening, no faster BatchNorm shifts. Rates in the loop's decoupled form:
# lr 4.4 is a peak of 0.2 per image-mean step at batch 512 with momentum 0.9, weight decay 5e-4
# at lr 0.4. Length and lr chosen on 5,000 held-out training images among 15 or 30 epochs and
# lr 2.2, 4.4, 8.8 (docs/training.md).
_VGG_FAST = dict(
    _FAST,
    model="vgg16_bn",
    weights="none",
    freeze=False,
    epochs=30,
    batch_size=512,
    lr=4.4,
    momentum=0.9,
    weight_decay=0.0044,
    bias_lr_factor=1.0,
    lr_shape=dict(start=0.2, peak_at=0.25, end=0.02),
    whitening_images=0,
    uploads=UPLOADS,
)

# The study's CNN (82k parameters) with the same loop and rates, and lighter label smoothing
# since so small a net underfits rather than overfits. Length chosen on 5,000 held-out training
# images: 86.60% at 70 epochs against 84.78% at 35 (docs/training.md).
_CNN_FAST = dict(_VGG_FAST, model="seed_cnn", label_smoothing=0.1, epochs=70)

RECIPES: dict[str, dict] = {
    "cnn-baseline": _CNN,
    "cnn-znorm": dict(_CNN, normalization="global_zscore"),
    "cnn-augment": dict(_CNN, normalization="global_zscore", augment=dict(rotation=15, shift=0.1, flip=True)),
    # The study's scheduler read `if epoch > 50: 5e-4 elif epoch > 75: 3e-4`; the elif is never
    # reached, so its run used 1e-3 then 5e-4 from epoch 51 on. We reproduce that.
    "cnn-schedule": dict(
        _CNN,
        normalization="global_zscore",
        augment=dict(rotation=15, shift=0.1, flip=True),
        epochs=100,
        lr_steps={51: 5e-4},
        l2=1e-4,
    ),
    "vgg16-3block": _VGG,
    "vgg16-full": dict(_VGG, model="vgg16_full"),
    "vgg16-full-imagenet-norm": dict(_VGG, model="vgg16_full", normalization="imagenet"),
    # Beyond the study (docs/training.md): the fast loop of training/fast.py.
    "fast": _FAST,
    "fast-wide": _FAST_WIDE,
    "vgg16-fast": _VGG_FAST,
    "cnn-fast": _CNN_FAST,
}

OVERRIDABLE = ("epochs", "batch_size", "lr", "seed", "weights", "freeze", "limit", "holdout", "uploads", "whitening_eps")
UPLOAD_STEPS = ("blur", "noise", "jpeg", "webp")
# each step's strength, drawn per image from a range: its key and the bounds a range must lie in
# (blur: training/uploads.py sizes its kernel for the largest σ; codecs: Pillow's quality scale, JPEG up to the 95 its docs advise)
UPLOAD_STRENGTHS = {"blur_sigma": (0.0, 1.0), "noise_sigma": (0.0, 255.0), "jpeg_quality": (1, 95), "webp_quality": (1, 100)}


def upload_shares(spec: str, uploads: dict) -> dict:
    """`--uploads` applied to a recipe's mix: 'none', or new shares and strength ranges such as
    'jpeg=0.25,webp=0.05,jpeg_quality=50-95'.

    What the spec leaves out stays the recipe's, so a candidate mix is one line on the command
    line (scripts/choose_on_holdout.sh).
    """
    if spec.strip() == "none":
        return {}
    usage = (
        f"--uploads {spec!r}: write 'none' or comma-separated STEP=SHARE and STRENGTH=LOW-HIGH pairs, STEP one of "
        f"{', '.join(UPLOAD_STEPS)} with SHARE in [0, 1], STRENGTH one of "
        + ", ".join(f"{key} within {low:g}-{high:g}" for key, (low, high) in UPLOAD_STRENGTHS.items())
    )
    mix = dict(uploads or {k: v for k, v in UPLOADS.items() if k not in UPLOAD_STEPS})
    for part in spec.split(","):
        key, _, value = (text.strip() for text in part.partition("="))
        if key in UPLOAD_STEPS:
            mix[key] = _share(value, usage)
        elif key in UPLOAD_STRENGTHS:
            mix[key] = _strength(value, UPLOAD_STRENGTHS[key], integer=key.endswith("_quality"), usage=usage)
        else:
            raise UserError(usage)
    if mix.get("jpeg", 0) + mix.get("webp", 0) > 1:
        raise UserError(f"--uploads {spec!r}: an image is re-encoded as JPEG or as WebP, so their shares add up to at most 1")
    return mix


def _share(text: str, usage: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(usage) from None
    if not 0 <= value <= 1:
        raise UserError(usage)
    return value


def _strength(text: str, bounds: tuple[float, float], integer: bool, usage: str) -> tuple:
    low_text, _, high_text = text.partition("-")
    try:
        low, high = (int(t) if integer else float(t) for t in (low_text, high_text))
    except ValueError:
        raise UserError(usage) from None
    if not bounds[0] <= low <= high <= bounds[1]:
        raise UserError(usage)
    return low, high


def get_recipe(name: str, **overrides) -> dict:
    """The recipe with command-line overrides applied (None means 'keep the recipe's value')."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    unknown = set(overrides) - set(OVERRIDABLE)
    if unknown:
        raise UserError(f"cannot override {sorted(unknown)}; overridable: {', '.join(OVERRIDABLE)}")
    recipe = dict(RECIPES[name], name=name)
    if overrides.get("uploads") is not None:
        if recipe["loop"] != "fast":
            raise UserError(f"--uploads applies to the fast loop's recipes (fast, cnn-fast, vgg16-fast), not {name}")
        overrides = dict(overrides, uploads=upload_shares(overrides["uploads"], recipe["uploads"]))
    if overrides.get("whitening_eps") is not None:
        if not recipe.get("whitening_images"):
            raise UserError(f"--whitening-eps applies to recipes with airbench's whitening layer (fast, fast-wide), not {name}")
        if overrides["whitening_eps"] <= 0:
            raise UserError(f"--whitening-eps must be positive, got {overrides['whitening_eps']:g}")
    vgg = recipe["model"].startswith("vgg")
    if not vgg and (overrides.get("weights") is not None or overrides.get("freeze")):
        raise UserError(f"--weights and --freeze apply to the VGG recipes (they load pretrained convolutions), not {name}")
    if overrides.get("limit") is not None and overrides["limit"] < 1:
        raise UserError(f"--limit must be at least 1, got {overrides['limit']}")
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    if recipe["limit"] is not None and overrides.get("holdout") is None:  # a quick run keeps the same share out
        recipe["holdout"] = min(recipe["holdout"], recipe["limit"] * recipe["holdout"] // 50_000)
    if recipe["epochs"] < 1 or recipe["batch_size"] < 1 or recipe["lr"] <= 0:
        raise UserError("--epochs and --batch-size must be at least 1 and --lr positive")
    return check(recipe)


def resumed(recipe: dict) -> dict:
    """A checkpoint's recipe, checked, with the keys recipes gained after older checkpoints were
    written: `loop` (a recipe without one is the study's) and, for the fast ones, `weights`, `freeze`
    and `whitening_eps` (airbench94's, the value before it was a key)."""
    recipe = dict(recipe)
    recipe.setdefault("loop", "study")
    if recipe["loop"] == "fast":
        recipe.setdefault("weights", "none")
        recipe.setdefault("freeze", False)
        recipe.setdefault("whitening_eps", AIRBENCH_WHITENING_EPS)
    return check(recipe)


def check(recipe: dict) -> dict:
    """The recipe, if it has exactly its loop's keys with values of their types; else a UserError naming each fault."""
    kinds = get_type_hints(FastRecipe if recipe.get("loop") == "fast" else StudyRecipe)
    name = recipe.get("name", "?")
    faults = [f"unknown key {key!r}" for key in recipe if key not in kinds]
    faults += [f"no {key!r}" for key in kinds if key not in recipe]
    faults += [f"{key}={recipe[key]!r} is not {getattr(kind, '__name__', kind)}" for key, kind in kinds.items() if key in recipe and not _is(recipe[key], kind)]
    if faults:
        raise UserError(f"recipe {name}: {'; '.join(faults)} (a {recipe.get('loop', 'study')} recipe has: {', '.join(kinds)})")
    return recipe


def _is(value, kind) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if getattr(kind, "__origin__", None) is Literal:
        return value in kind.__args__
    if isinstance(kind, type):
        return isinstance(value, kind)
    return isinstance(value, tuple(t for t in kind.__args__ if isinstance(t, type)))  # a union such as int | None


for _name, _recipe in RECIPES.items():  # a misspelt key in this file fails at import, not mid-run
    check(dict(_recipe, name=_name))


def lr_at(recipe: dict, epoch: int) -> float:
    """The learning rate of a 0-based epoch under the recipe's step schedule."""
    lr = recipe["lr"]
    for start, value in sorted(recipe["lr_steps"].items()):
        if epoch >= start:
            lr = value
    return lr


def describe_uploads(uploads: dict) -> str:
    """One line for recipe tables: which steps, on what share, at what strength."""
    if not uploads:
        return "none"
    parts = []
    for step, strength, unit in (("blur", "blur_sigma", "σ px"), ("noise", "noise_sigma", "σ"), ("jpeg", "jpeg_quality", "q"), ("webp", "webp_quality", "q")):
        share = uploads.get(step, 0.0)
        if share:
            low, high = uploads[strength]
            parts.append(f"{step} {share:.0%} ({unit} {low:g}–{high:g})")
    return ", ".join(parts)
