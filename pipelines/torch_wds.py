"""Torch backend: ``webdataset`` + PIL + torchvision transforms in a ``torch.utils.data.DataLoader``,
the baseline users know. Shards are split across ranks (a seeded shard order, the same on every rank,
sliced ``rank::world_size``); decoding and augmentation run in the workers, which build each uint8
batch straight into shared memory; normalisation, the mix and everything after run on the training
device. On a CPU the normalisation is one pass into a fresh float32 tensor (:mod:`pipelines.normalise`;
measured cheaper than normalising per sample in the workers, as torchvision's ``Normalize`` does); on
a GPU it runs after the copy, which moves a quarter of the bytes of float32.

Splitting across workers (the unit is the batch, so every worker is busy whatever the shard count):
global batch ``k`` of a rank's epoch is made by worker ``k % num_workers`` (counted from the batch the
pass starts at), and the DataLoader's in-order round robin hands them out in order. Where the batch's
samples come from:

* sample split (eval always; training when the rank has fewer shards than workers, or the workers'
  whole-shard shares would differ by more than 10 %): every worker reads the rank's whole stream of
  raw tar members -- the same shard order and shuffle buffer in every worker -- and decodes only the
  samples of its own batches. The batches are exactly those of one worker reading alone; the cost is
  reading the rank's bytes once per worker (a tar member skipped is not decoded);
* shard split (training, at least one shard per worker): worker ``w`` reads only its own shards
  ``rank_shards[w::num_workers]`` with its own shuffle buffer and cycles them for its share of the
  batches, so each byte is read once (webdataset's ``split_by_worker``, with full batches per worker).

In training every rank takes ``len()`` = ``(num_samples // world_size) // batch_size`` full batches,
cycling its shards when it has fewer samples (webdataset's ``repeat`` + ``with_epoch`` idiom); eval
reads every sample exactly once across ranks (ranks get uneven counts when shards do not divide
evenly) and the last batch may be partial. Augmentation draws are seeded per batch,
``derive_seed(seed, rank, epoch, "workers", k)``, so batch ``k`` is the same whichever worker makes
it and however many workers there are: resuming mid-epoch tells the workers the batch to start from,
and they skip the raw samples before it without decoding them, to the same pixels.

The workers persist across epochs (``persistent_workers``); the epoch and the start batch reach them
through a two-element shared-memory tensor read when each pass begins.

Seeds (:mod:`pipelines.seeds`): the shard order is ``derive_seed(seed, 0, epoch, "reader")`` (the same
on every rank, which then takes its slice), the sample shuffle buffer ``(seed, rank, epoch,
"shuffle", s)`` (``s`` = 0 for the rank's stream, ``w + 1`` for worker ``w``'s own shards) and the
augmentation of batch ``k`` ``(seed, rank, epoch, "workers", k)``.

Errors: the tars are checked against their ``.idx`` at start (:mod:`pipelines.checks`; Python's
``tarfile`` reading a stream ends quietly at a damaged header, which would drop the rest of the shard).
A read or decode error inside a DataLoader worker comes back as one :class:`ShardError` line naming
the shard (and the sample when known), not a worker traceback. ``rmix verify`` is the full check.

Shards by URL (``http(s)://``, ``pipe:``; :mod:`shards.remote`) are streamed by the workers through
webdataset's opener with bounded retries; there are no start checks then (they would read every tar),
each shard's sample count, size and sha256 are checked as it streams instead.
"""

from __future__ import annotations

import io
import itertools
import random
from typing import Iterator, Optional

import numpy as np

import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from shards.checks import check_wds_split
from shards.errors import ShardError
from shards.reader import split_files
from shards.remote import shard_checks, split_is_remote, split_urls, stream_samples

from .loader import Loader
from .normalise import Normalise
from .presets import Preset
from .seeds import derive_seed

_WORKER_PREFIX = f"{ShardError.__module__}.{ShardError.__name__}: "


def raise_shard_error(exn: Exception) -> bool:
    """webdataset handler: any read or decode error becomes one ShardError line naming the shard.

    webdataset's tar iterators append the stream and url to ``exn.args`` and call the handler again
    on the way out, so an error we raised already is re-raised with its first line only.
    """
    if isinstance(exn, ShardError):
        raise ShardError(str(exn.args[0]) if exn.args else "shard error") from None
    url = getattr(exn, "url", None) or next((a for a in exn.args if isinstance(a, str) and a.endswith(".tar")), None)
    key = getattr(exn, "key", None)
    cause = exn.__cause__ or exn
    detail = str(cause.args[0]).split(" @ ")[0] if cause.args else ""
    where = f"{url}" + (f": sample {key}" if key else "") if url else "a shard of this split"
    raise ShardError(f"{where}: {type(cause).__name__}{': ' + detail if detail else ''}") from None


def _one_line(e: ShardError) -> str:
    """The original message of a ShardError re-raised by a DataLoader worker (which wraps it in the
    worker's traceback)."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(_WORKER_PREFIX):
            return ln[len(_WORKER_PREFIX):]
    return lines[-1] if lines else "shard error"


def torchvision_transform(preset: Preset, to_tensor: bool = True):
    """The seed's torchvision transform for a preset, ending in a uint8 CHW tensor (or, with
    ``to_tensor=False``, in the PIL image the loader's workers write into their batch)."""
    last = [T.PILToTensor()] if to_tensor else []
    if preset.kind == "imagenet" and preset.train:
        ops = [T.RandomResizedCrop(preset.size), T.RandomHorizontalFlip()]
        if preset.color_jitter:
            cj = preset.color_jitter
            ops.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
        return T.Compose(ops + last)
    if preset.kind == "imagenet":
        return T.Compose([T.Resize(preset.resize), T.CenterCrop(preset.size)] + last)
    if preset.train:
        return T.Compose([T.RandomCrop(preset.size, padding=preset.pad), T.RandomHorizontalFlip()] + last)
    return T.Compose(last)


def _shared_empty(shape, dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory: a worker's batch reaches the main process without a
    copy (what ``default_collate`` does for the tensors it stacks)."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)


class _RankStream(torch.utils.data.IterableDataset):
    """The batches of one rank's epoch, made inside the DataLoader's workers (module header).

    Picklable and fixed for the loader's life; what changes per pass is read from ``state``, a
    shared-memory int64 tensor the main process fills before each pass (:meth:`set_pass`): the start
    batch, the shard-order seed, the shuffle seeds (rank stream, then one per worker) and one
    augmentation seed per batch -- every seed derived in the main process, none in a worker.
    """

    def __init__(self, urls, counts, ext, transform, *, batch_size, train, rank, world_size, seed,
                 num_batches, num_workers, remote=None, checks=None):
        self.urls, self.counts, self.ext, self.transform = urls, counts, ext, transform
        # shards by URL: read with shards.remote's retries and checks (remote: RemoteOptions, checks:
        # each shard's (samples, bytes, sha256)); local files: webdataset's tar reader as it is
        self.remote, self.checks = remote, checks
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.num_batches, self.num_workers = rank, world_size, num_batches, num_workers
        self.state = torch.zeros(2 + num_workers + 1 + num_batches, dtype=torch.int64).share_memory_()

    def set_pass(self, epoch: int, start: int) -> None:
        """Seeds of ``epoch`` and the batch to start from, for the workers' next pass."""
        seeds = [start, derive_seed(self.seed, 0, epoch, "reader")]  # the shard order: the same on every rank
        seeds += [derive_seed(self.seed, self.rank, epoch, "shuffle", s) for s in range(self.num_workers + 1)]
        self.state[:len(seeds)] = torch.tensor(seeds)
        # batch k's augmentation, the same whichever worker makes it (only the batches still to come)
        self.state[len(seeds) + start:] = torch.tensor(
            [derive_seed(self.seed, self.rank, epoch, "workers", k) for k in range(start, self.num_batches)],
            dtype=torch.int64)

    def rank_shards(self, order_seed: int) -> list[int]:
        """This rank's shards: an order the same on every rank (seeded in training), sliced."""
        order = list(range(len(self.urls)))
        if self.train:
            random.Random(order_seed).shuffle(order)
        return order[self.rank::self.world_size]

    def worker_shards(self, order_seed: int, num_workers: int) -> Optional[list[list[int]]]:
        """Shard split: each worker's own shards, or None for the sample split (module header)."""
        shards = self.rank_shards(order_seed)
        if not self.train or num_workers < 2 or len(shards) < num_workers:
            return None  # (one worker: its own shards are the rank's stream)
        own = [shards[w::num_workers] for w in range(num_workers)]
        sizes = [sum(self.counts[i] for i in s) for s in own]
        return own if min(sizes) >= 0.9 * max(sizes) else None

    def _samples(self, shards: list[int], shuffle_seed: int, quota: Optional[int]):
        """Raw (undecoded) samples of ``shards`` in the epoch's order; with a ``quota`` (training) the
        shards cycle until that many samples."""
        if quota is not None:
            shards = shards * max(1, -(-quota // max(1, sum(self.counts[i] for i in shards))))
        urls = [self.urls[i] for i in shards]
        if self.remote is not None:
            samples = stream_samples(urls, [self.checks[i] for i in shards], self.remote)
        else:
            samples = wds.tarfile_samples(({"url": u} for u in urls), handler=raise_shard_error)
        if self.train:
            samples = wds.shuffle(1000, 100, rng=random.Random(shuffle_seed))(samples)
        return itertools.islice(samples, quota) if quota is not None else samples

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != self.num_workers:
            raise RuntimeError(f"_RankStream made for {self.num_workers} workers runs in {num_workers}")
        state = self.state.tolist()  # read once: the main process fills it before the pass
        start, order_seed, shuffle_seeds = state[0], state[1], state[2:3 + num_workers]
        batch_seeds = state[3 + num_workers:]
        mine = range(start + worker, self.num_batches, num_workers)  # the global batches this worker makes
        if not mine:
            return
        B = self.batch_size
        own = self.worker_shards(order_seed, num_workers)
        if own is None:  # the rank's stream; this worker's batches are its positions mine[i]
            stream = self._samples(self.rank_shards(order_seed), shuffle_seeds[0],
                                   self.num_batches * B if self.train else None)
            positions = mine
        else:  # its own shards: global batch k is batch (k - lead) // num_workers of shard group lead
            lead = mine[0] % num_workers
            stream = self._samples(own[lead], shuffle_seeds[lead + 1],
                                   len(range(lead, self.num_batches, num_workers)) * B)
            positions = [(k - lead) // num_workers for k in mine]
        pos = 0
        for k, p in zip(mine, positions):
            batch = []
            for sample in stream:  # skip (without decoding) up to the batch, then take it
                if pos >= p * B:
                    batch.append(sample)
                pos += 1
                if pos >= (p + 1) * B:
                    break
            if not batch:
                return
            yield self._make_batch(batch, batch_seeds[k])

    def _make_batch(self, samples: list[dict], seed: int):
        """Decode and augment one batch straight into a shared-memory uint8 (N, 3, H, W) tensor (a
        quarter of the bytes of float32 to fault in and move); torchvision's random transforms draw
        from torch's generator, seeded per batch."""
        torch.manual_seed(seed)
        out = out_np = None
        labels = []
        for i, sample in enumerate(samples):
            try:
                with Image.open(io.BytesIO(sample[self.ext])) as im:
                    im.load()  # an RGB image is used as decoded (ImageFolder's convert("RGB") copies it)
                    arr = np.asarray(self.transform(im if im.mode == "RGB" else im.convert("RGB")))
                labels.append(int(sample["cls"]))
            except Exception as e:  # noqa: BLE001 -- one ShardError line naming the shard and sample
                e.url, e.key = sample.get("__url__"), sample.get("__key__")
                raise_shard_error(e)
            if out is None:
                out = _shared_empty((len(samples), 3) + arr.shape[:2], torch.uint8)
                out_np = out.numpy()
            out_np[i] = arr.transpose(2, 0, 1)
        return out, torch.tensor(labels, dtype=torch.int64)


class TorchLoader(Loader):
    backend = "torch"
    streams_urls = True  # shards named by URL are streamed, never cached to disk

    def __init__(self, manifest, split, **kw):
        super().__init__(manifest, split, **kw)
        remote = split_is_remote(self.manifest, split, "wds") if split in self.manifest["splits"] else False
        if remote:  # streamed by URL, each shard checked as it streams (shards.remote)
            files = split_urls(self.manifest, split)
        else:
            files = split_files(self.manifest, split, "wds")
            check_wds_split(self.manifest, split, files, self.rank, self.world_size)
        shards = self.manifest["splits"][split]["wds"]["shards"]
        if self.train and len(files) < self.world_size:  # a rank without shards could not take len() steps
            raise ValueError(f"split {split!r} has {len(files)} webdataset shard(s) for {self.world_size} ranks; "
                             f"the torch backend splits ranks by shard: reshard with smaller shards "
                             f"(rmix shards --samples-per-shard) or use the dali backend")
        self._counts = [int(s["num_samples"]) for s in shards]
        self._stream = _RankStream([str(f) for f in files], self._counts, self.manifest["splits"][split]["wds"]["ext"],
                                   torchvision_transform(self.preset, to_tensor=False), batch_size=self.batch_size,
                                   train=self.train, rank=self.rank, world_size=self.world_size, seed=self.seed,
                                   num_batches=len(self), num_workers=self.num_workers,
                                   remote=self.remote if remote else None,
                                   checks=shard_checks(self.manifest, split) if remote else None)
        # on a CPU the uint8 batch is normalised here in one pass into a fresh float32 tensor
        # (pipelines.normalise; measured cheaper than normalising in the workers); on a GPU after the copy
        self._normalise = Normalise(self.preset.mean, self.preset.std) if self.device.type == "cpu" else None
        self._loader = None  # the DataLoader and its persistent workers, started on the first pass

    def __len__(self) -> int:
        if self.train:
            return (self.num_samples // self.world_size) // self.batch_size
        mine = sum(self._counts[self.rank::self.world_size])  # eval: the rank's shards in order
        return -(-mine // self.batch_size)

    def _batches(self, start: int) -> Iterator:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self._stream, batch_size=None, num_workers=self.num_workers, persistent_workers=True,
                pin_memory=self.device.type == "cuda")
        self._stream.set_pass(self.epoch, start)  # read by the workers as the pass starts
        try:
            for images, labels in self._loader:
                if self._normalise is not None:
                    images = self._normalise(images)
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        except ShardError as e:
            raise ShardError(_one_line(e)) from None
