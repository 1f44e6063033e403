"""FFCV backend: FFCV's ``Loader`` on our ``.beton`` with its JIT-compiled decoders and transforms
(RandomResizedCrop decode, flip, translate); normalisation, lighting and the mix run after it on the
device, shared with every backend. DDP uses FFCV's ``distributed=True`` (a DistributedSampler over
the beton, so it needs the process group up). Resume replays the epoch order (FFCV draws it from
``seed + epoch``) and skips what was seen; FFCV's own augmentation draws are not seedable, so the
images of a resumed epoch match in order and label but not pixel for pixel.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .loader import Loader, split_files
from .presets import Preset


def _import_ffcv():
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise ImportError(f"backend 'ffcv' needs the ffcv package ({e}); install with `make setup`") from None


def ffcv_pipelines(preset: Preset, device: torch.device):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                       SimpleRGBImageDecoder)
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, ToDevice, ToTensor, ToTorchImage

    size = (preset.size, preset.size)
    if preset.kind == "imagenet":
        decode = [RandomResizedCropRGBImageDecoder(size)] if preset.train else [
            CenterCropRGBImageDecoder(size, ratio=preset.size / preset.resize)]
    else:
        decode = [SimpleRGBImageDecoder()]
    aug = []
    if preset.train:
        aug = [RandomHorizontalFlip()] + ([RandomTranslate(padding=preset.pad)] if preset.pad else [])
    image = decode + aug + [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
    # no Squeeze: a last batch of one sample would become 0-d and break ToDevice; flattened later
    label = [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=True)]
    return {"image": image, "label": label}


class FfcvLoader(Loader):
    backend = "ffcv"

    def __init__(self, manifest, split, **kw):
        super().__init__(manifest, split, **kw)
        _import_ffcv()
        from ffcv.loader import Loader as _FFCVLoader
        from ffcv.loader import OrderOption

        self._path = str(split_files(self.manifest, split, "ffcv")[0])
        self._loader = _FFCVLoader(
            self._path, batch_size=self.batch_size, num_workers=self.num_workers,
            order=OrderOption.RANDOM if self.train else OrderOption.SEQUENTIAL,
            distributed=self.world_size > 1, seed=self.seed, drop_last=self.train,
            pipelines=ffcv_pipelines(self.preset, self.device))

    def __len__(self) -> int:
        return len(self._loader)

    def _batches(self, start: int) -> Iterator:
        self._loader.next_epoch = self.epoch
        for b, (images, labels) in enumerate(self._loader):
            if b < start:
                continue
            # ToTorchImage gives a channels-last view; the contract is plain NCHW unless asked
            yield images.contiguous(), labels.long().view(-1)
