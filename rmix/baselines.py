"""Baseline mixes for the model-zoo comparisons, with RecursiveMix's call signature.

Mixup and CutMix follow the seed's ``mixup`` / ``cutmix`` in implus/RecursiveMix-pytorch utils.py
(one lam and one partner permutation per batch; CutMix's side ratio is sqrt(1 - Beta(alpha, alpha))
with the same clipped, centre-uniform box as RecursiveMix). ResizeMix follows Qin et al. 2020
("ResizeMix: Mixing Data with Preserved Object Information and True Labels"): the whole partner
image is resized by a factor tau ~ U(low, high) and pasted fully inside the image.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .base import Mix
from .batch import MixedBatch
from .boxes import box_lam, resize, sample_boxes


class NoMix(Mix):
    """Pass-through: soft targets, lam = 1, no boxes."""

    name = "none"
    exact_on_uint8 = True

    def _mix(self, images, targets):
        return MixedBatch(images, targets, None, self._full_lam(images.shape[0], 1.0, images.device))


class _PartnerMix(Mix):
    """Mixes whose second image comes from a permutation of the same batch."""

    def __init__(self, alpha: float, num_classes: Optional[int] = None, smoothing: float = 0.0, seed: int = 0):
        super().__init__(num_classes=num_classes, smoothing=smoothing, seed=seed)
        if alpha <= 0:
            raise ValueError(f"{type(self).__name__} alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def _partner(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.rng.permutation(n)).to(device, non_blocking=True)


class Mixup(_PartnerMix):
    """x = lam * x + (1 - lam) * x[perm], lam ~ Beta(alpha, alpha) per batch."""

    name = "mixup"

    def _mix(self, images, targets):
        n = images.shape[0]
        lam = float(self.rng.beta(self.alpha, self.alpha))
        perm = self._partner(n, images.device)
        partner = images[perm]
        if images.is_floating_point():
            images.mul_(lam).add_(partner, alpha=1.0 - lam)
        else:  # uint8: blend in float, round back
            images.copy_((images.float() * lam + partner.float() * (1.0 - lam)).round_().clamp_(0, 255))
        mixed, _, lam_t = self._scalar_lam_batch(targets, targets[perm], lam)
        return MixedBatch(images, mixed, None, lam_t)


class _PasteMix(_PartnerMix):
    """Paste (part of) a partner image into one box shared by the batch."""

    def _box(self, height: int, width: int) -> np.ndarray:
        raise NotImplementedError

    def _paste(self, images: torch.Tensor, perm: torch.Tensor, box: np.ndarray) -> None:
        """Paste partner ``perm[i]`` into ``box`` of image i; index only what is pasted, never the
        whole batch (a full ``images[perm]`` is a copy of the batch)."""
        raise NotImplementedError

    def _mix(self, images, targets):
        n, _, height, width = images.shape
        box = self._box(height, width)
        perm = self._partner(n, images.device)
        lam = float(box_lam(box[None], height, width)[0])
        if lam >= 1.0:
            return MixedBatch(images, targets, None, self._full_lam(n, 1.0, images.device))
        self._paste(images, perm, box)
        mixed, boxes, lam_t = self._scalar_lam_batch(targets, targets[perm], lam, box)
        return MixedBatch(images, mixed, boxes, lam_t)


class CutMix(_PasteMix):
    """The partner's pixels inside a box replace ours; box side ratio sqrt(1 - Beta(alpha, alpha))."""

    name = "cutmix"
    exact_on_uint8 = True

    def _box(self, height, width):
        ratio = np.sqrt(1.0 - self.rng.beta(self.alpha, self.alpha, size=1))
        return sample_boxes(self.rng, ratio, height, width)[0]

    def _paste(self, images, perm, box):
        x1, y1, x2, y2 = (int(v) for v in box)
        # The box sliced in the batch's memory order: on a channels-last batch (DALI's host crop gives one) the
        # NCHW slice copies 1-byte runs, the NHWC one whole box rows (64 x 224^2 uint8: 20 -> 2.4 ms here).
        if not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
            region = images.permute(0, 2, 3, 1)[:, y1:y2, x1:x2]
        else:
            region = images[:, :, y1:y2, x1:x2]
        # a copy of the boxes, then whole samples of it in partner order: index_select along the batch copies
        # contiguous blocks, where images[perm, :, y1:y2, x1:x2] gathered element by element (2.6x slower on
        # a CIFAR batch of 512)
        region.copy_(region.clone().index_select(0, perm))


class ResizeMix(_PasteMix):
    """The whole partner image, scaled by tau ~ U(low, high), pasted fully inside the image."""

    name = "resizemix"

    @property
    def exact_on_uint8(self) -> bool:
        return self.interpolation == "nearest"

    def __init__(self, alpha: float = 1.0, low: float = 0.1, high: float = 0.8, interpolation: str = "nearest", **kw):
        super().__init__(alpha=alpha, **kw)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"ResizeMix needs 0 <= low <= high <= 1, got {low}, {high}")
        self.low, self.high, self.interpolation = low, high, interpolation

    def _box(self, height, width):
        tau = self.rng.uniform(self.low, self.high)
        h, w = int(height * tau), int(width * tau)
        y1 = int(self.rng.integers(0, height - h + 1))
        x1 = int(self.rng.integers(0, width - w + 1))
        return np.array([x1, y1, x1 + w, y1 + h], dtype=np.int64)

    def _paste(self, images, perm, box):
        x1, y1, x2, y2 = (int(v) for v in box)
        images[:, :, y1:y2, x1:x2] = resize(images, (y2 - y1, x2 - x1), self.interpolation)[perm]
