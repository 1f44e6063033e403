"""FFCV backend: FFCV's ``Loader`` on our ``.beton`` with its JIT-compiled decoders and transforms
(RandomResizedCrop decode, flip, translate); colour jitter (``aug_plus``), normalisation, lighting and
the mix run after it on the device, shared with every backend. Training in DDP uses FFCV's
``distributed=True`` (a DistributedSampler over the beton, so it needs the process group up); eval
gives each rank the strided slice ``rank::world_size`` of the beton (FFCV's distributed sequential
order pads with repeated samples, which would count them twice). The epoch order is FFCV's, drawn
from ``derive_seed(seed, 0, 0, "reader") + epoch`` (the same on every rank). Resume replays the epoch
order and skips what was seen.

Seeds of the augmentation. FFCV's crop, flip and translate draw inside its JIT code from numba's
generator, one per thread, which numpy's seeding does not reach. Our image decoder seeds the calling
thread's generator before each batch from ``derive_seed(seed, rank, 0, "augment")`` and the batch's
sample indices (:class:`_SeedsItsBatch`). With ``num_workers=1`` FFCV decodes and augments on that
one thread, so a run is reproducible and a resumed epoch continues pixel for pixel. With more
workers FFCV runs those loops as numba ``prange`` loops on a pool of threads, each drawing from its
own unseeded generator in whatever order the pool takes the images: order and labels are still
exact, the crops, flips and translations are not (FFCV gives no public hook to seed a pool thread
per sample). The colour jitter below is seeded either way.

FFCV refills its output buffers a few batches later, and every loader yields fresh tensors (a
RecursiveMix history keeps the previous batch). On a CPU the one pass that makes the batch fresh is
also the normalisation: FFCV's uint8 channels-last view -> a new normalised NCHW float32 tensor
(:mod:`pipelines.normalise`, exact ``(x - mean) / std``). Measured against the alternatives on this
2-core machine: FFCV's ``NormalizeImage`` inside the JIT pipeline then a copy out of its reused
float buffer was 3x slower on CIFAR (torch's channels-last -> NCHW float copy), and copying the uint8
batch then normalising in torch costs three full-size temporaries. On a GPU the uint8 batch goes to
the device (``ToDevice``) and is copied and normalised there. The beton is read through the page cache
(``os_cache``, as ffcv-imagenet's ``in_memory=1``) when it takes at most a quarter of physical memory.

Colour jitter: FFCV has no colour operator, so ``aug_plus``'s ColorJitter(0.4, 0.4, 0.4) runs here on
the uint8 batch on the device, before normalisation, with torchvision's formulas for uint8 tensors
(brightness, then contrast, then saturation -- DALI's ``color_twist`` also applies them in one fixed
order; torchvision draws the order at random) and per-sample factors from
``derive_rng(seed, rank, epoch, "augment", batch)``.

Start checks (:func:`pipelines.checks.check_beton`): the beton's header, fields and every sample's
metadata are checked against the manifest with numpy before FFCV allocates its buffers (a corrupted
width once made it ask for 192 GiB). ``rmix verify`` is the full, pixel-level check.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from shards.checks import check_beton
from shards.reader import split_files

from .loader import Loader
from .normalise import Normalise
from .presets import Preset
from .seeds import derive_rng, derive_seed

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _import_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise ImportError(f"backend 'ffcv' needs the ffcv package ({e}); install with `make setup`") from None


class _SeedsItsBatch:
    """Mixin for an FFCV image decoder: before decoding a batch, seed numba's generator of the calling
    thread from ``batch_seed`` and the batch's sample indices, so every JIT draw of that batch -- the
    decoder's crop, then ``RandomHorizontalFlip`` and ``RandomTranslate`` after it -- is a function of
    the seed and of which samples the batch holds, the same in every run and on a resumed epoch (whose
    order FFCV replays from its own seed).

    numba keeps one generator per thread, seeded from the OS at its first use, and numpy's
    ``np.random.seed`` outside JIT code does not reach it; the only way in is a seed call inside JIT
    code on the thread that draws. That thread is FFCV's epoch thread when FFCV runs single-threaded
    (``num_workers=1``). With more workers FFCV's loops are numba ``prange`` loops whose iterations run
    on a pool of threads, each drawing from its own generator in whatever order the pool hands out
    the images: those draws stay unseeded (module header)."""

    batch_seed = 0

    def generate_code(self):
        from ffcv.pipeline.compiler import Compiler

        decode = Compiler.compile(super().generate_code())
        base = self.batch_seed % _PRIME

        def seeded_decode(batch_indices, my_storage, metadata, storage_state):
            h = base
            for i in range(len(batch_indices)):
                h = (h * 1000003 + np.int64(batch_indices[i]) + 1) % _PRIME
            np.random.seed(h)
            return decode(batch_indices, my_storage, metadata, storage_state)

        return seeded_decode


_PRIME = 4294967291  # the largest prime below 2**32: a batch's seed is a uint32
_SEEDED: dict = {}


def _seeded(decoder_class, seed: int, *args, **kwargs):
    """An instance of ``decoder_class`` that seeds the draws of each batch (:class:`_SeedsItsBatch`)."""
    cls = _SEEDED.get(decoder_class)
    if cls is None:
        cls = _SEEDED[decoder_class] = type(decoder_class.__name__, (_SeedsItsBatch, decoder_class), {})
    decoder = cls(*args, **kwargs)
    decoder.batch_seed = seed
    return decoder


def ffcv_pipelines(preset: Preset, device: torch.device, seed: int = 0):
    """FFCV pipelines giving uint8 images (a channels-last view of FFCV's reused buffer) and labels;
    the JIT draws of each batch are seeded from ``seed`` and the batch's indices (:class:`_SeedsItsBatch`).

    On the CPU there is no ``ToDevice`` (it would copy into another reused buffer for nothing); on a
    GPU the uint8 batch is copied to the device and normalised there."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                       SimpleRGBImageDecoder)
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, ToDevice, ToTensor, ToTorchImage

    size = (preset.size, preset.size)
    if preset.kind == "imagenet":
        decode = [_seeded(RandomResizedCropRGBImageDecoder, seed, size)] if preset.train else [
            _seeded(CenterCropRGBImageDecoder, seed, size, ratio=preset.size / preset.resize)]
    else:
        decode = [_seeded(SimpleRGBImageDecoder, seed)]
    aug = []
    if preset.train:
        aug = [RandomHorizontalFlip()] + ([RandomTranslate(padding=preset.pad)] if preset.pad else [])
    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    image = decode + aug + [ToTensor()] + to_device + [ToTorchImage()]
    # no Squeeze: a last batch of one sample would become 0-d and break ToDevice; flattened later
    label = [IntDecoder(), ToTensor()] + to_device
    return {"image": image, "label": label}


def os_cache_fits(path: str) -> bool:
    """FFCV's ``os_cache``: read the beton through the page cache (memory-mapped, what ffcv-imagenet
    runs with ``in_memory=1``) when it takes at most a quarter of physical memory; otherwise FFCV's
    own process cache, which does not assume the file stays cached."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return os.path.getsize(path) * 4 <= physical


def color_jitter_factors(rng: np.random.Generator, n: int, strength: float) -> np.ndarray:
    """(n, 3) brightness, contrast and saturation factors, each U(max(0, 1 - s), 1 + s) as
    torchvision's ColorJitter(s, s, s)."""
    return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=(n, 3))


def batch_color_jitter(images: torch.Tensor, factors: np.ndarray) -> torch.Tensor:
    """Brightness, contrast, saturation on a uint8 (N, 3, H, W) batch with per-sample ``factors``
    (N, 3), on the batch's device; the result is a new uint8 tensor.

    Each step is torchvision's for a uint8 tensor (``adjust_brightness`` / ``adjust_contrast`` /
    ``adjust_saturation``: blend with black, with the image's mean grey, with its grey image; clamp;
    truncate to uint8), so one sample equals the three functional calls in this order.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"batch_color_jitter takes uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    dev = images.device

    def ratios(j):  # the factor and 1 - factor, each rounded once to float32 as torchvision's scalars
        f = torch.from_numpy(factors[:, j].astype(np.float32)).to(dev, non_blocking=True).view(-1, 1, 1, 1)
        g = torch.from_numpy((1.0 - factors[:, j]).astype(np.float32)).to(dev, non_blocking=True).view(-1, 1, 1, 1)
        return f, g

    def gray(x):  # uint8 (N, 1, H, W), truncated as torchvision's rgb_to_grayscale on uint8
        r, g_, b = x.unbind(1)
        return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g_ + GRAY_WEIGHTS[2] * b).to(torch.uint8).unsqueeze(1)

    def blend(x, other, f, g):
        return (f * x + g * other).clamp(0, 255).to(torch.uint8)

    f, g = ratios(0)
    x = blend(images, torch.zeros((), device=dev), f, g)
    f, g = ratios(1)
    x = blend(x, gray(x).float().mean((1, 2, 3), keepdim=True), f, g)
    f, g = ratios(2)
    return blend(x, gray(x), f, g)


@contextmanager
def caller_torch_threads():
    """Give the caller its torch intra-op thread count back after the block.

    FFCV's Loader calls ``torch.set_num_threads(num_workers)`` when it is built and at every ``iter()``
    (``ffcv.pipeline.compiler.Compiler.set_num_threads``); left alone, building our loader with 1 worker would
    leave the whole training process on one intra-op thread. FFCV's own numba threads are not touched.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


class FfcvLoader(Loader):
    backend = "ffcv"
    shard_format = "ffcv"

    def __init__(self, manifest, split, **kw):
        super().__init__(manifest, split, **kw)
        with caller_torch_threads():  # importing ffcv and building its Loader both set torch's threads
            self._loader = self._build()
        self._normalise = Normalise(self.preset.mean, self.preset.std) if self.device.type == "cpu" else None

    def _build(self):
        """Check the beton and build FFCV's own Loader on it."""
        _import_ffcv()
        from ffcv.loader import Loader as _FFCVLoader
        from ffcv.loader import OrderOption

        self._path = str(split_files(self.manifest, self.split, "ffcv")[0])
        check_beton(self.manifest, self.split, self._path, fixed_size=self.preset.kind == "cifar")
        if self.train:
            placement = dict(distributed=self.world_size > 1, order=OrderOption.RANDOM)
        else:  # exactly once across ranks, no process group needed
            placement = dict(distributed=False, order=OrderOption.SEQUENTIAL,
                             indices=np.arange(self.rank, self.num_samples, self.world_size))
        self._jitter = self.preset.color_jitter if self.train else 0.0
        return _FFCVLoader(
            self._path, batch_size=self.batch_size, num_workers=self.num_workers,
            seed=derive_seed(self.seed, 0, 0, "reader"), drop_last=self.train,
            pipelines=ffcv_pipelines(self.preset, self.device, derive_seed(self.seed, self.rank, 0, "augment")),
            os_cache=os_cache_fits(self._path),
            **placement)

    def __len__(self) -> int:
        return len(self._loader)

    def _batches(self, start: int) -> Iterator:
        self._loader.next_epoch = self.epoch
        with caller_torch_threads():
            batches = iter(self._loader)
        for b, (images, labels) in enumerate(batches):
            if b < start:
                continue
            # FFCV refills its output buffers batches_ahead later: every batch leaves as a fresh tensor
            if self._jitter:
                rng = derive_rng(self.seed, self.rank, self.epoch, "augment", b)
                images = batch_color_jitter(images, color_jitter_factors(rng, images.shape[0], self._jitter))
            if self._normalise is not None:  # CPU: one pass, uint8 view -> fresh normalised NCHW float32
                images = self._normalise(images)
            else:  # GPU: a fresh NCHW uint8 tensor, normalised on the device after
                images = images.contiguous() if self._jitter else images.clone(memory_format=torch.contiguous_format)
            yield images, labels.view(-1).to(torch.int64, copy=True)
