"""Loaders with one batch contract for every backend.

``build_loader(manifest_or_dir, split, backend=..., ...)`` returns an iterable of
:class:`rmix.MixedBatch` on the training device with ``len()``, ``set_epoch(e)``, ``state_dict()`` and
``load_state_dict()``. Backends: ``dali`` (default; GPU decode with CUDA, same graph on CPU),
``memory`` (the CIFAR fast path), ``ffcv`` and ``torch`` (webdataset + torchvision).
"""

from __future__ import annotations

import importlib
from typing import Optional, Union

from rmix import Mix
from shards.manifest import load_manifest

from .loader import Loader, resolve_device
from .presets import PRESETS, Preset, default_preset, get_preset

BACKENDS = {
    "dali": ("pipelines.dali", "DaliLoader"),
    "memory": ("pipelines.memory", "MemoryLoader"),
    "ffcv": ("pipelines.ffcv_loader", "FfcvLoader"),
    "torch": ("pipelines.torch_wds", "TorchLoader"),
}


def build_loader(manifest_or_dir, split: str, *, backend: str = "dali", batch_size: int, train: bool,
                 device="auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                 preset: Union[str, Preset, None] = None, mix: Optional[Mix] = None,
                 channels_last: bool = False, dtype: str = "float32", num_workers: int = 0) -> Loader:
    """Build the loader of one split.

    Args:
        manifest_or_dir: ``OUT/<dataset>`` from ``rmix shards``, its ``manifest.json``, or the loaded dict.
        split: 'train' or 'val'.
        backend: 'dali', 'memory', 'ffcv' or 'torch'.
        batch_size: per-rank batch size.
        train: shuffle, augment, drop the last partial batch; else pad so each sample is seen once.
        device: 'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'.
        rank, world_size: DDP position; each rank gets its own part of the data and its own seed.
        preset: a name from ``pipelines.presets.PRESETS`` or None for the dataset's default.
        mix: a :mod:`rmix` mix (its history is owned here and saved in ``state_dict``), or None.
        channels_last, dtype: memory format and dtype of the images handed to the trainer.
        num_workers: decode threads/processes (default: cores, at most 8).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    manifest = manifest_or_dir if isinstance(manifest_or_dir, dict) else load_manifest(manifest_or_dir)
    preset = get_preset(preset, manifest["dataset"], train)
    module, cls = BACKENDS[backend]
    loader_cls = getattr(importlib.import_module(module), cls)
    return loader_cls(manifest, split, batch_size=batch_size, train=train, preset=preset, device=device,
                      rank=rank, world_size=world_size, seed=seed, mix=mix, channels_last=channels_last,
                      dtype=dtype, num_workers=num_workers)


__all__ = ["build_loader", "BACKENDS", "Loader", "PRESETS", "Preset", "default_preset", "resolve_device"]
