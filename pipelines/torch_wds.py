"""Torch backend: ``webdataset`` + PIL + torchvision transforms in a ``torch.utils.data.DataLoader``,
the baseline users know. Shards are split across ranks (node splitter bound to our rank) and across
workers (``wds.split_by_worker``); decoding and augmentation run in the workers, normalisation, the
mix and everything after on the training device.

Limits of this design, which DALI and the memory backend do not have: shards are the unit of
splitting, so a rank sees whole shards (use at least ``world_size * num_workers`` shards; in training
a rank with fewer samples cycles its shards so every rank takes ``len()`` steps, and eval is exactly
once across ranks only when shards divide evenly), and resuming mid-epoch replays the epoch's order
and skips the batches already seen.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch
import webdataset as wds
from torchvision import transforms as T

from .loader import Loader, split_files
from .presets import Preset


def torchvision_transform(preset: Preset):
    """The seed's torchvision transform for a preset, ending in a uint8 CHW tensor."""
    to_uint8 = T.PILToTensor()
    if preset.kind == "imagenet" and preset.train:
        ops = [T.RandomResizedCrop(preset.size), T.RandomHorizontalFlip()]
        if preset.color_jitter:
            cj = preset.color_jitter
            ops.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
        return T.Compose(ops + [to_uint8])
    if preset.kind == "imagenet":
        return T.Compose([T.Resize(preset.resize), T.CenterCrop(preset.size), to_uint8])
    if preset.train:
        return T.Compose([T.RandomCrop(preset.size, padding=preset.pad), T.RandomHorizontalFlip(), to_uint8])
    return to_uint8


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, manifest, split, **kw):
        super().__init__(manifest, split, **kw)
        self._urls = [str(f) for f in split_files(self.manifest, split, "wds")]
        self._ext = self.manifest["splits"][split]["wds"]["ext"]
        self._transform = torchvision_transform(self.preset)

    def _dataset(self):
        rank, world, epoch, seed = self.rank, self.world_size, self.epoch, self.seed

        def by_rank(urls):
            urls = list(urls)
            random.Random(seed * 1009 + epoch).shuffle(urls) if self.train else None
            return urls[rank::world]

        ds = wds.WebDataset(self._urls, nodesplitter=by_rank, workersplitter=wds.split_by_worker,
                            shardshuffle=False, empty_check=False)
        if self.train:
            ds = ds.shuffle(1000, rng=random.Random(seed * 7919 + epoch * 31 + rank))
        ds = ds.decode("pil").to_tuple(self._ext, "cls").map_tuple(self._transform, int)
        # workers send small partial batches; the main process re-batches them, so a partial batch at
        # the end of each worker's stream is not dropped (webdataset's WebLoader idiom)
        return ds.batched(16, partial=True)

    def __len__(self) -> int:
        per_rank = self.num_samples // self.world_size
        return per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)

    def _batches(self, start: int) -> Iterator:
        gen = torch.Generator().manual_seed(self.seed * 65537 + self.epoch * 97 + self.rank)
        loader = wds.WebLoader(self._dataset(), batch_size=None, num_workers=self.num_workers, generator=gen,
                               pin_memory=self.device.type == "cuda")
        loader = loader.unbatched().batched(self.batch_size, partial=not self.train)
        if self.train:
            # every rank must take the same number of steps (DDP), but whole shards per rank can be
            # uneven: cycle the rank's stream and cut the epoch at len() batches (webdataset's idiom)
            loader = loader.repeat(2).with_epoch(len(self))
        for b, (images, labels) in enumerate(loader):
            if b < start:
                continue  # resume: replay the epoch's deterministic order, skip what was seen
            yield (images.to(self.device, non_blocking=True),
                   torch.as_tensor(labels, dtype=torch.int64).to(self.device, non_blocking=True))
