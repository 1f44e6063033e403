"""Loaders with one batch contract for every backend.

``build_loader(manifest_or_dir, split, backend=..., ...)`` returns an iterable of
:class:`rmix.MixedBatch` on the training device with ``len()``, ``set_epoch(e)``, ``state_dict()`` and
``load_state_dict()``. Backends: ``dali`` (default; GPU decode with CUDA, same graph on CPU),
``memory`` (the CIFAR fast path), ``ffcv`` and ``torch`` (webdataset + torchvision). After each
forward pass the trainer calls ``loader.record_logits(logits)`` (RecursiveMix's history).

Building a loader checks its files in seconds (sizes, ``.idx`` against tar headers, the FFCV beton's
metadata; :mod:`shards.checks`); ``rmix verify`` is the full, pixel-level check.
"""

from __future__ import annotations

from typing import Optional, Union

from rmix import Mix
from shards.manifest import load_manifest
from shards.remote import RemoteOptions

from .loader import Loader, resolve_device
from .presets import PRESETS, Preset, default_preset, get_preset

BACKENDS = {
    "dali": "DALI webdataset reader + decode/augment graph (GPU 'mixed' decode with CUDA, CPU without)",
    "memory": "CIFAR fast path: the split as one uint8 tensor on the device, batched augmentation",
    "ffcv": "FFCV Loader on our .beton",
    "torch": "webdataset + PIL + torchvision in a DataLoader",
}


def backend_class(backend: str) -> type:
    """The loader class of a backend. Imported on demand: DALI and FFCV take seconds to import, and
    a user of one backend need not have the other installed."""
    if backend == "dali":
        from .dali import DaliLoader
        return DaliLoader
    if backend == "memory":
        from .memory import MemoryLoader
        return MemoryLoader
    if backend == "ffcv":
        from .ffcv_loader import FfcvLoader
        return FfcvLoader
    if backend == "torch":
        from .torch_wds import TorchLoader
        return TorchLoader
    raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def build_loader(manifest_or_dir, split: str, *, backend: str = "dali", batch_size: int, train: bool,
                 device="auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                 preset: Union[str, Preset, None] = None, mix: Optional[Mix] = None,
                 channels_last: bool = False, dtype: str = "float32", num_workers: int = 0,
                 remote: Optional[RemoteOptions] = None) -> Loader:
    """Build the loader of one split.

    Args:
        manifest_or_dir: ``OUT/<dataset>`` from ``rmix shards``, its ``manifest.json``, the loaded dict,
            or a URL: ``http(s)://.../manifest.json``, ``pipe:CMD`` with ``{}`` for each file's path
            (:mod:`shards.remote`; torch streams the shards, the other backends read them from a
            node-local cache).
        split: 'train' or 'val'.
        backend: 'dali', 'memory', 'ffcv' or 'torch'.
        batch_size: per-rank batch size.
        train: shuffle, augment, drop the last partial batch; else each sample is seen exactly once
            (across ranks), in the same preprocessing on every backend.
        device: 'auto' (the current CUDA device when available, else cpu), 'cpu', 'cuda' (the current
            CUDA device, ``torch.cuda.current_device()``), 'cuda:N'; anything else is a ValueError.
        rank, world_size: DDP position; each rank gets its own part of the data and its own seed.
        preset: a name from ``pipelines.presets.PRESETS`` or None for the dataset's default.
        mix: a :mod:`rmix` mix (its history is owned here and saved in ``state_dict``), or None;
            feed it the model's logits with ``loader.record_logits(logits)``.
        channels_last, dtype: memory format and dtype of the images handed to the trainer.
        num_workers: decode threads/processes (default: cores, at most 8).
        remote: :class:`shards.remote.RemoteOptions` for files named by URL (retries, timeout,
            skipping, the cache directory); None for the defaults.
    """
    loader_cls = backend_class(backend)
    manifest = manifest_or_dir if isinstance(manifest_or_dir, dict) else load_manifest(manifest_or_dir, remote)
    preset = get_preset(preset, manifest["dataset"], train)
    return loader_cls(manifest, split, batch_size=batch_size, train=train, preset=preset, device=device,
                      rank=rank, world_size=world_size, seed=seed, mix=mix, channels_last=channels_last,
                      dtype=dtype, num_workers=num_workers, remote=remote)


__all__ = ["build_loader", "backend_class", "BACKENDS", "Loader", "PRESETS", "Preset", "default_preset", "resolve_device"]
