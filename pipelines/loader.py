"""The batch contract every backend shares, and the stages that run after a backend's iterator.

A backend produces ``(images, labels)`` on the training device: images either uint8 (N, 3, H, W)
(normalised here) or float already normalised, labels int64 (N,). This base class then runs, on that
device and in this order: normalisation if needed, PCA lighting (``aug_plus``), dtype and memory format,
and the mix — so the trainer never sees an unmixed batch when a mix is on. It also owns the
epoch/position bookkeeping and the ``state_dict`` protocol; a backend adds its own state.

Every random stream (shuffles, augmentation, lighting, worker seeds) is derived with
:func:`pipelines.seeds.derive_seed` from ``(seed, rank, epoch, stream)``; no backend has its own formula.

What a loader checks when it is built (seconds, before any decoding; see :mod:`pipelines.checks`):
every file of the split exists with the manifest's size, each webdataset tar's ``.idx`` has the
manifest's checksum and the tar header at every offset it lists is intact and names that member, and
an FFCV beton's header, fields and per-sample metadata agree with the manifest. Damaged pixel bytes of
the right size pass these checks: ``rmix verify`` (checksums and a decode of every sample) is the full
check.

A dataset named by URL (``http(s)://.../manifest.json``, ``pipe:CMD {}``; :mod:`shards.remote`): the
torch backend streams its shards (``streams_urls``); the others get a manifest of local copies in the
node-local shard cache, downloaded and verified here before the backend sees it.
"""

from __future__ import annotations

from contextlib import contextmanager

import os
import re
from typing import Any, Iterator, Optional

import torch

from rmix import Mix, MixedBatch, NoMix
from rmix.boxes import PastePlan
from shards.manifest import load_manifest
from shards.remote import RemoteOptions, ShardCache, split_is_remote

from .normalise import Normalise
from .presets import PCA_EIGVAL, PCA_EIGVEC, Preset
from .seeds import derive_rng

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(?::(\d+))?")


def resolve_device(device="auto") -> torch.device:
    """The training device of a loader, always with an index when it is a GPU.

    'auto' (or None) -> this process's current CUDA device when CUDA is available, else cpu;
    'cuda' -> the current CUDA device (``torch.cuda.current_device()``, which DDP trainers set to
    LOCAL_RANK), so every consumer (DALI's ``device_id`` included) sees the same GPU; 'cuda:N' ->
    GPU N; 'cpu'. A ``torch.device`` is accepted in the same forms. Anything else raises one
    ``ValueError`` line.
    """
    spec = "auto" if device is None else str(device)
    m = _DEVICE_RE.fullmatch(spec)
    if m is None:
        raise ValueError(f"device must be {DEVICE_FORMS}, got {device!r}")
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device={spec!r} asked for, but CUDA is not available; use device='auto' or 'cpu'")
    index = int(m.group(1)) if m.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device={spec!r}, but this machine has {count} CUDA device(s): use cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


@contextmanager
def one_torch_thread(enabled: bool = True):
    """Run the block on one torch intra-op thread, then give the caller its thread count back.

    For the work after a loader's iterator on a CPU: the decoder's threads (DALI, FFCV) or worker
    processes (torch) are decoding the next batches meanwhile, and torch's own threads would only contend
    with them for the same cores (RecursiveMix cost 17 % -> 8 % of DALI's throughput in rmix bench).
    """
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Loader:
    """Base of every backend: an iterable of :class:`rmix.MixedBatch` on the training device.

    Each batch is a fresh tensor the caller may read but must not modify in place (a RecursiveMix
    history keeps a reference to it until the next batch).

    The loop, with the mix's contract explicit::

        for b in loader:
            logits = model(b.images)
            ...
            loader.record_logits(logits)   # RecursiveMix's history triplet; a no-op for other mixes

    ``loader.mix`` stays readable (its ``state_dict`` is part of ``loader.state_dict()``), but the
    trainer talks to the mix through :meth:`record_logits` only.

    Start-of-loader checks (module header) catch missing, truncated and structurally damaged files in
    seconds; ``rmix verify`` is the full, pixel-level check.

    Subclasses implement ``_batches(start)`` (raw ``(images, labels)`` from batch ``start`` of the
    current epoch), ``__len__`` and optionally ``_backend_state`` / ``_load_backend_state``.
    """

    backend = "base"
    #: the shard format the backend reads ('wds' or 'ffcv')
    shard_format = "wds"
    #: the backend reads shards by URL itself (torch); the others read local files, so a split named
    #: by URL is first downloaded into the node-local shard cache (:class:`shards.remote.ShardCache`)
    streams_urls = False
    #: the backend decodes in threads or processes of its own, concurrently with the work after the
    #: iterator (normalisation, lighting, the mix), which then runs single-threaded on a CPU
    decodes_in_parallel = True

    def __init__(self, manifest, split: str, *, batch_size: int, train: bool, preset: Preset,
                 device="auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                 mix: Optional[Mix] = None, channels_last: bool = False, dtype="float32",
                 num_workers: int = 0, remote: Optional[RemoteOptions] = None):
        self.remote = remote if remote is not None else RemoteOptions()
        self.manifest = manifest if isinstance(manifest, dict) else load_manifest(manifest, self.remote)
        if (not self.streams_urls and split in self.manifest["splits"]
                and split_is_remote(self.manifest, split, self.shard_format)):
            self.manifest = ShardCache(self.remote).localise(self.manifest, split, self.shard_format)
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
        # every backend hands the mix a fresh tensor per batch and the trainer only reads it, so a
        # mix with history may hold a reference instead of a full-batch copy (measured in rmix bench)
        self.mix.borrow_batches()
        self.channels_last, self.dtype = channels_last, DTYPES[dtype]
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.num_samples = int(self.manifest["splits"][split]["num_samples"]) if split in self.manifest["splits"] else 0
        self.epoch, self.position = 0, 0
        self._lighting_rng = derive_rng(seed, rank, 0, "lighting")  # one stream for the run, saved in state_dict
        self._mean = torch.tensor(preset.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(preset.std, device=self.device).view(1, 3, 1, 1)
        self._normalise_cpu = Normalise(preset.mean, preset.std) if self.device.type == "cpu" else None
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

    def record_logits(self, logits: torch.Tensor) -> None:
        """Hand the model's logits on the last batch to the mix (RecursiveMix's history triplet).

        The documented path from the trainer to the mix: call it after every forward pass with the
        logits of the batch just yielded (they are detached here). A no-op for mixes whose
        ``uses_logits`` is False."""
        if self.mix.uses_logits:
            self.mix.record_logits(logits.detach())

    def __iter__(self) -> Iterator[MixedBatch]:
        one_thread = self.device.type == "cpu" and self.decodes_in_parallel
        for raw in self._batches(self.position):  # (images, labels), or with the mix's paste already applied
            self.position += 1
            with one_torch_thread(one_thread):
                batch = self._finish(*raw)
            yield batch
        # a full pass ends the epoch: the next iteration is the next epoch
        self.set_epoch(self.epoch + 1)

    def _mixes_uint8(self) -> bool:
        """Whether a uint8 batch is mixed before its normalisation (see :meth:`_finish`)."""
        return self.mix.exact_on_uint8 and not (self.preset.lighting and self.train)

    def _finish(self, images: torch.Tensor, labels: torch.Tensor, pasted: Optional[PastePlan] = None) -> MixedBatch:
        # A uint8 batch is mixed before normalisation when the mix only copies pixels (nearest paste,
        # CutMix): normalisation is a per-channel affine map, so the result is the same, on a quarter
        # of the bytes, and normalisation becomes the one float conversion the batch needs anyway.
        # PCA lighting is per sample and must act before the paste, so it keeps the float order.
        # ``pasted``: a backend that asked the mix for its paste ahead (``mix.plan_paste``) applied it already.
        if not images.is_floating_point() and self._mixes_uint8():
            batch = self.mix(images, labels) if pasted is None else self.mix(images, labels, pasted=pasted)
            batch.images = self._to_model(self._normalise(batch.images))
        else:
            if pasted is not None:
                raise RuntimeError(f"{self.backend}: a paste was planned for a batch that is mixed after normalisation")
            if not images.is_floating_point():
                images = self._normalise(images)
            if self.preset.lighting and self.train:
                images = self._lighting(images)
            batch = self.mix(self._to_model(images), labels)
        batch.labels = labels
        return batch

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) on 0..255 -> float32 ``(x - mean) / std``, in one fresh tensor (on the CPU
        one vectorised pass into huge pages, :mod:`pipelines.normalise`; the same bits either way)."""
        if self._normalise_cpu is not None and images.dim() == 4 and images.shape[1] == 3:
            return self._normalise_cpu(images)
        return (images.float() - self._mean) / self._std

    def _to_model(self, images: torch.Tensor) -> torch.Tensor:
        """The memory format and dtype the trainer asked for."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images if images.dtype == self.dtype else images.to(self.dtype)

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
