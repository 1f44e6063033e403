"""The batch contract every backend shares, and the stages that run after a backend's iterator.

A backend produces ``(images, labels)`` on the training device: images either uint8 (N, 3, H, W)
(normalised here) or float already normalised, labels int64 (N,). This base class then runs, on that
device and in this order: normalisation if needed, PCA lighting (``aug_plus``), dtype and memory format,
and the mix — so the trainer never sees an unmixed batch when a mix is on. It also owns the
epoch/position bookkeeping and the ``state_dict`` protocol; a backend adds its own state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from rmix import Mix, MixedBatch, NoMix, RecursiveMix
from shards.errors import ShardError
from shards.manifest import load_manifest

from .presets import PCA_EIGVAL, PCA_EIGVEC, Preset

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device) -> torch.device:
    """'auto' -> cuda (this process's current GPU) when available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for, but CUDA is not available; use device='auto' or 'cpu'")
    return device


def split_files(manifest: dict, split: str, fmt: str) -> list[Path]:
    """The files of one split in one format, checked to exist with the manifest's sizes (a cheap stat
    per file that catches missing and truncated shards before any worker starts)."""
    root = Path(manifest["root"])
    if split not in manifest["splits"]:
        raise ShardError(f"split {split!r} not in {root}/manifest.json (has {', '.join(manifest['splits'])})")
    entry = manifest["splits"][split]
    if fmt not in entry:
        raise ShardError(f"{root} has no {fmt} files for split {split!r}; rerun `rmix shards --formats {fmt}`")
    # (relative path, bytes) of each file: the wds tars, or the one FFCV beton
    items = [(s["tar"], s["bytes"]) for s in entry["wds"]["shards"]] if fmt == "wds" else \
        [(entry["ffcv"]["path"], entry["ffcv"]["bytes"])]
    files = []
    for rel, nbytes in items:
        path = root / rel
        if not path.is_file():
            raise ShardError(f"missing shard {path}")
        if os.path.getsize(path) != nbytes:
            raise ShardError(f"corrupt shard {path}: {os.path.getsize(path)} bytes, manifest says {nbytes}")
        files.append(path)
    return files


class Loader:
    """Base of every backend: an iterable of :class:`rmix.MixedBatch` on the training device.

    Each batch is a fresh tensor the caller may read but must not modify in place (a RecursiveMix
    history keeps a reference to it until the next batch).

    Subclasses implement ``_batches(start)`` (raw ``(images, labels)`` from batch ``start`` of the
    current epoch), ``__len__`` and optionally ``_backend_state`` / ``_load_backend_state``.
    """

    backend = "base"

    def __init__(self, manifest, split: str, *, batch_size: int, train: bool, preset: Preset,
                 device="auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                 mix: Optional[Mix] = None, channels_last: bool = False, dtype="float32",
                 num_workers: int = 0):
        self.manifest = manifest if isinstance(manifest, dict) else load_manifest(manifest)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.split, self.batch_size, self.train, self.preset = split, batch_size, train, preset
        self.device = resolve_device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_classes = int(self.manifest["num_classes"])
        self.mix = mix if mix is not None else NoMix(num_classes=self.num_classes)
        if getattr(self.mix, "num_classes", None) is None:
            self.mix.num_classes = self.num_classes
        if isinstance(self.mix, RecursiveMix):
            # every backend hands the mix a fresh tensor per batch and the trainer only reads it, so
            # the history can hold a reference instead of a full-batch copy (measured in rmix bench)
            self.mix.copy_history = False
        self.channels_last, self.dtype = channels_last, DTYPES[dtype]
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.num_samples = int(self.manifest["splits"][split]["num_samples"]) if split in self.manifest["splits"] else 0
        self.epoch, self.position = 0, 0
        self._lighting_rng = np.random.default_rng([seed, rank, 7])
        self._mean = torch.tensor(preset.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(preset.std, device=self.device).view(1, 3, 1, 1)
        if preset.lighting:
            eig = torch.tensor(PCA_EIGVEC) * torch.tensor(PCA_EIGVAL)[None, :]
            self._pca = (eig * 255.0).to(self.device)  # lighting on the 0..255 scale

    # -- iteration ------------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def _batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch (and reset the mix history, per the mix)."""
        self.epoch, self.position = epoch, 0
        self.mix.set_epoch(epoch)

    def __iter__(self) -> Iterator[MixedBatch]:
        for images, labels in self._batches(self.position):
            self.position += 1
            yield self._finish(images, labels)
        # a full pass ends the epoch: the next iteration is the next epoch
        self.set_epoch(self.epoch + 1)

    def _finish(self, images: torch.Tensor, labels: torch.Tensor) -> MixedBatch:
        if not images.is_floating_point():
            images = (images.float() - self._mean) / self._std
        if self.preset.lighting and self.train:
            images = self._lighting(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if images.dtype != self.dtype:
            images = images.to(self.dtype)
        batch = self.mix(images, labels)
        batch.labels = labels
        return batch

    def _lighting(self, images: torch.Tensor) -> torch.Tensor:
        """AlexNet PCA lighting, per sample, in normalised space (offset / std)."""
        alpha = torch.from_numpy(self._lighting_rng.normal(0.0, self.preset.lighting, (images.shape[0], 3)))
        offset = alpha.float().to(images.device, non_blocking=True) @ self._pca.T  # (N, 3) on 0..255
        return images + (offset[:, :, None, None] / self._std)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Epoch, position in the epoch, RNG states and the mix history: enough to resume exactly."""
        return {
            "backend": self.backend, "epoch": self.epoch, "position": self.position,
            "rank": self.rank, "world_size": self.world_size, "seed": self.seed,
            "mix": self.mix.state_dict(), "lighting_rng": self._lighting_rng.bit_generator.state,
            "backend_state": self._backend_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["backend"] != self.backend:
            raise ValueError(f"loader state is from backend {state['backend']!r}, this loader is {self.backend!r}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"loader state is for rank {state['rank']}/{state['world_size']}, "
                             f"this loader is {self.rank}/{self.world_size}")
        self.epoch, self.position = state["epoch"], state["position"]
        self.mix.load_state_dict(state["mix"])
        self._lighting_rng.bit_generator.state = state["lighting_rng"]
        self._load_backend_state(state["backend_state"])

    def _backend_state(self) -> Any:
        return None

    def _load_backend_state(self, state: Any) -> None:
        pass


def decode_ascii_labels(raw: torch.Tensor) -> torch.Tensor:
    """(N, W) uint8 rows of ASCII digits padded with zeros (webdataset ``.cls``) -> (N,) int64,
    vectorised on the tensor's device."""
    raw = raw.long()
    is_digit = (raw >= 48) & (raw <= 57)
    n_digits = is_digit.sum(1, keepdim=True)
    pos = torch.arange(raw.shape[1], device=raw.device)[None, :]
    power = (n_digits - 1 - pos).clamp(min=0)
    weights = torch.where(is_digit, torch.pow(10, power), torch.zeros_like(power))
    return ((raw - 48).clamp(min=0) * weights).sum(1)
