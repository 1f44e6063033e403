"""RecursiveMix and the baseline mixes, as stateful callables on batched tensors.

Every mix is ``mix(images, targets) -> MixedBatch`` and runs on the device of ``images``. The dense
mixes (``DetRecursiveMix``, ``SegRecursiveMix`` in ``DENSE_MIXES``, not in the classification ``MIXES``)
take annotations instead: ``mix(images, boxes, labels)`` / ``mix(images, seg) -> DenseMixed``.
"""

from .base import Mix
from .baselines import CutMix, Mixup, NoMix, ResizeMix
from .batch import MixedBatch, smooth_one_hot
from .dense import DENSE_MIXES, DenseMixed, DetRecursiveMix, SegRecursiveMix
from .losses import roi_consistency_loss, soft_target_cross_entropy
from .recursive_mix import RecursiveMix

MIXES = {
    "none": NoMix,
    "mixup": Mixup,
    "cutmix": CutMix,
    "resizemix": ResizeMix,
    "recursive_mix": RecursiveMix,
}


def build_mix(name: str, **kwargs) -> Mix:
    """Mix by the seed's ``--aug`` name ('none', 'mixup', 'cutmix', 'resizemix', 'recursive_mix')."""
    try:
        cls = MIXES[name]
    except KeyError:
        raise ValueError(f"unknown mix {name!r}; choose one of {sorted(MIXES)}") from None
    if cls is NoMix:
        kwargs.pop("alpha", None)
    return cls(**kwargs)


__all__ = [
    "Mix", "MixedBatch", "RecursiveMix", "Mixup", "CutMix", "ResizeMix", "NoMix", "MIXES", "build_mix",
    "smooth_one_hot", "soft_target_cross_entropy", "roi_consistency_loss",
    "DetRecursiveMix", "SegRecursiveMix", "DenseMixed", "DENSE_MIXES",
]
