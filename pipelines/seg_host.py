"""mmseg's stock segmentation transforms on the host, with OpenCV, for the CPU path of the ADE20K loader.

On a CPU, DALI's operators cost more than the OpenCV calls mmseg makes (measured here on 512x512 crops:
``fn.hsv`` 10 ms an image against ~1 ms for OpenCV's two colour conversions, a bilinear resize 2-3x
OpenCV's), so :class:`pipelines.dali_seg.ADE20KDaliLoader` lets DALI read and decode (its threads, its
shuffling, sharding and checkpoints) and runs the rest here, one sample per thread of a pool (OpenCV and
numpy release the GIL). It computes what mmseg computes, call for call:

* train, as UPerNet's ADE20K pipeline (``LoadAnnotations(reduce_zero_label=True), RandomResize(scale,
  ratio_range, keep_ratio=True), RandomCrop(crop, cat_max_ratio), RandomFlip(0.5), PhotoMetricDistortion``):
  ratio ~ U(ratio_range), target ``(int(scale[0] r), int(scale[1] r))``, mmcv's ``rescale_size`` and
  ``cv2.resize`` (bilinear image, nearest labels), crop offsets ``randint(0, margin + 1)`` re-drawn up to 10
  times while one class covers ``cat_max_ratio`` or more of the crop (or the crop holds one class), the flip,
  and the photometric steps with mmseg's arithmetic (float32 ``x * alpha + beta``, clipped, truncated to
  uint8 -- done as 256-entry tables --, OpenCV's uint8 HSV for saturation and hue, hue shift
  ``randint(-18, 18)``, contrast before or after the colour steps at random);
* eval: ``Resize(scale, keep_ratio=True)`` of the image; the label map stays at the original size.

So the pixels and labels equal mmseg's for the same random draws (tested against mmcv and mmseg's own
``PhotoMetricDistortion``). The draws come from a numpy Generator per sample (``derive_rng(seed, rank,
epoch, "augment", index)``), not from mmseg's global ``numpy.random``. Images arrive RGB (DALI's CPU decoder
gives RGB 2.6x faster than BGR) and leave BGR, as ``LoadImageFromFile`` gives them: OpenCV's RGB<->HSV
conversions are its BGR ones with the channels named the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

try:
    import cv2
except ImportError as _e:  # opencv-python comes with ffcv (make setup)
    raise ImportError(f"the host augmentation needs OpenCV ({_e}); install with `make setup`") from None

IGNORE_INDEX = 255
_LEVELS = np.arange(256, dtype=np.float32)
# mmseg's LoadAnnotations(reduce_zero_label=True): 0 -> 255, k -> k - 1, 255 stays 255
REDUCE_ZERO_LABEL = np.concatenate([[IGNORE_INDEX], np.arange(255)]).astype(np.uint8)
REDUCE_ZERO_LABEL[255] = IGNORE_INDEX


def rescale_size(h: int, w: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` for a ``(long, short)`` edge bound: (h, w) -> (new_h, new_w)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def convert_table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion.convert`` (``clip(x.astype(float32) * alpha + beta)`` as uint8) as a
    lookup table over the 256 levels: the same float32 arithmetic, once per level instead of per pixel."""
    return np.clip(_LEVELS * alpha + beta, 0, 255).astype(np.uint8)


@dataclass
class Draws:
    """What one sample drew (kept for the metainfo and for tests that replay them through mmseg)."""

    ratio: float = 1.0
    crop: Optional[tuple[int, int, int, int]] = None  # y1, y2, x1, x2
    flip: bool = False
    photometric: tuple = ()  # mmseg's draws in its call order: ("randint" | "uniform", value), ...


class _Recorder:
    """mmseg's draws (``randint(2)``, ``uniform(a, b)``, ``randint(a, b)``) from a Generator, recorded."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.log = rng, []

    def randint(self, low, high=None):
        v = int(self.rng.integers(low, high) if high is not None else self.rng.integers(low))
        self.log.append(("randint", v))
        return v

    def uniform(self, low, high):
        v = float(self.rng.uniform(low, high))
        self.log.append(("uniform", v))
        return v


class HostSegAugment:
    """mmseg's stock ADE20K transforms on one decoded sample (module header).

    ``augment(image_rgb, label, rng) -> (image_bgr, label, (new_h, new_w), draws)``; ``image_rgb`` HWC uint8,
    ``label`` HW uint8 as read from the PNG. The outputs are fresh arrays (the image may be a view with
    negative strides after the flip; the caller copies it into its batch).
    """

    def __init__(self, *, train: bool, scale=(2048, 512), ratio_range=(0.5, 2.0), crop=(512, 512),
                 cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True,
                 reduce_zero_label: bool = True, ignore_index: int = IGNORE_INDEX):
        self.train, self.scale, self.ratio_range, self.crop = train, tuple(scale), tuple(ratio_range), tuple(crop)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.reduce_zero_label, self.ignore_index = reduce_zero_label, ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator]):
        h, w = image.shape[:2]
        if self.reduce_zero_label:
            label = REDUCE_ZERO_LABEL[label]
        draws = Draws()
        if not self.train:  # Resize(scale, keep_ratio=True): the label map stays as read
            nh, nw = rescale_size(h, w, self.scale)
            image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
            return image[:, :, ::-1], label, (nh, nw), draws
        lo, hi = self.ratio_range
        draws.ratio = float(rng.random()) * (hi - lo) + lo  # RandomResize._random_sample_ratio
        nh, nw = rescale_size(h, w, (int(self.scale[0] * draws.ratio), int(self.scale[1] * draws.ratio)))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
        draws.crop = y1, y2, x1, x2 = self._crop_box(label, rng)
        image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
        draws.flip = bool(rng.random() < self.flip_prob)
        if draws.flip:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            rec = _Recorder(rng)
            image = self._photometric(np.ascontiguousarray(image), rec)
            draws.photometric = tuple(rec.log)
        return image[:, :, ::-1], np.ascontiguousarray(label), (nh, nw), draws

    def _crop_box(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """mmseg ``RandomCrop.crop_bbox``: a window, re-drawn (up to 10 times) while one class dominates it."""
        ch, cw = self.crop

        def draw():
            oy = int(rng.integers(0, max(label.shape[0] - ch, 0) + 1))
            ox = int(rng.integers(0, max(label.shape[1] - cw, 0) + 1))
            return oy, oy + ch, ox, ox + cw

        box = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                y1, y2, x1, x2 = box
                counts = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=256)
                counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = draw()
        return box

    @staticmethod
    def _photometric(rgb: np.ndarray, random: _Recorder) -> np.ndarray:
        """mmseg ``PhotoMetricDistortion.transform`` (defaults: brightness 32, contrast and saturation
        0.5-1.5, hue 18), its calls in its order; on RGB data (the HSV conversions name the channels)."""
        def contrast(img):
            if random.randint(2):
                return cv2.LUT(img, convert_table(alpha=random.uniform(0.5, 1.5)))
            return img

        img = rgb
        if random.randint(2):  # brightness
            img = cv2.LUT(img, convert_table(beta=random.uniform(-32, 32)))
        mode = random.randint(2)
        if mode == 1:
            img = contrast(img)
        if random.randint(2):  # saturation
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[:, :, 1] = cv2.LUT(hsv[:, :, 1], convert_table(alpha=random.uniform(0.5, 1.5)))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if random.randint(2):  # hue: (h + randint(-18, 18)) % 180 over OpenCV's 0..179 hue
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            shift = random.randint(-18, 18)
            hsv[:, :, 0] = ((np.arange(256) + shift) % 180).astype(np.uint8)[hsv[:, :, 0]]
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if mode == 0:
            img = contrast(img)
        return img
