"""Augmentation presets mirroring the seed's torchvision transforms (implus/RecursiveMix-pytorch
dataset.py), as data that every backend turns into its own operators.

Means and stds are on the 0..255 scale (what DALI and FFCV normalise uint8 with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CIFAR_MEAN = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)  # the seed's CIFAR normalisation
CIFAR_STD = (0.2023 * 255, 0.1994 * 255, 0.2010 * 255)

# AlexNet-style PCA lighting (the seed's Lighting with these eigen values/vectors, on the 0..1 scale)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


@dataclass(frozen=True)
class Preset:
    """What one split's images go through.

    kind: 'imagenet' (random-resized-crop / resize+centre-crop) or 'cifar' (pad+crop / identity).
    size: output side. resize: eval resize of the shorter side (ImageNet). pad: CIFAR crop padding.
    color_jitter: brightness/contrast/saturation strength (0 = off). lighting: PCA alpha std (0 = off).
    """

    name: str
    kind: str
    train: bool
    size: int
    mean: tuple
    std: tuple
    resize: Optional[int] = None
    pad: int = 0
    color_jitter: float = 0.0
    lighting: float = 0.0


PRESETS = {
    p.name: p
    for p in (
        Preset("imagenet_train", "imagenet", True, 224, IMAGENET_MEAN, IMAGENET_STD),
        Preset("imagenet_train_plus", "imagenet", True, 224, IMAGENET_MEAN, IMAGENET_STD, color_jitter=0.4, lighting=0.1),
        Preset("imagenet_eval", "imagenet", False, 224, IMAGENET_MEAN, IMAGENET_STD, resize=256),
        Preset("cifar_train", "cifar", True, 32, CIFAR_MEAN, CIFAR_STD, pad=4),
        Preset("cifar_eval", "cifar", False, 32, CIFAR_MEAN, CIFAR_STD),
    )
}


def default_preset(dataset: str, train: bool, aug_plus: bool = False) -> Preset:
    """The seed's transform for a dataset: CIFAR-style for cifar10/cifar100/digits, else ImageNet."""
    if dataset in ("cifar10", "cifar100", "digits"):
        return PRESETS["cifar_train" if train else "cifar_eval"]
    if not train:
        return PRESETS["imagenet_eval"]
    return PRESETS["imagenet_train_plus" if aug_plus else "imagenet_train"]


def get_preset(preset, dataset: str, train: bool) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset is None:
        return default_preset(dataset, train)
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}") from None
