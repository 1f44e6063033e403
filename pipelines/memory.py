"""CIFAR fast path (backend ``'memory'``): the whole split as one uint8 tensor on the device.

CIFAR fits in memory, so per-sample pipelines only cost time: the split is decoded once from the
shards, and pad-crop + flip + normalise + mix run batched on the device (the approach of
cifar10-airbench). The epoch order is a permutation drawn from ``derive_seed(seed, 0, epoch,
"reader")``, identical on every rank, and each rank takes a strided slice: train keeps
``floor(N / world)`` samples per rank and drops the last partial batch, eval keeps every sample exactly
once across ranks. Augmentation draws come from ``derive_seed(seed, rank, epoch, "augment", batch)``,
so resuming at batch k needs no state at all.

On the CPU the crop is one compiled pass, and a RecursiveMix box (one per batch, nearest) is drawn
before it (:meth:`rmix.RecursiveMix.plan_paste`): the same pass copies the history pixels into the box,
so the mix neither walks the batch a second time nor wakes the threads again. Batches, targets, boxes
and draws are those of the plain route (the torch crop, then the mix's own paste), bit for bit.

Start checks: the tars are checked against their ``.idx`` (:mod:`pipelines.checks`), then read with
:func:`shards.reader.iter_tar`; a sample count or a label that disagrees with the manifest, or a
sample without its image or ``.cls``, is one :class:`ShardError` line naming the tar. Every image is
decoded here, so a damaged PNG fails at start too; ``rmix verify`` remains the full check.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

try:
    import numba
except ImportError:  # pragma: no cover - numba comes with the ffcv extra
    numba = None

from rmix import byte_shuffle
from rmix.boxes import PastePlan
from rmix.host_threads import over_batch
from shards.checks import check_wds_split
from shards.errors import ShardError
from shards.reader import iter_tar, split_files

from .loader import Loader
from .seeds import derive_seed

_CACHE: dict = {}  # (root, split) -> (images uint8 (N, 3, H, W), labels int64): decode once per process


def _decode_png(item: tuple[str, bytes]) -> np.ndarray:
    name, data = item
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise ShardError(f"{name}: cannot decode the image ({e})") from None


def load_split(manifest: dict, split: str, workers: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split from its webdataset shards, in shard order, as CPU tensors."""
    key = (manifest["root"], split)
    if key in _CACHE:
        return _CACHE[key]
    ext = manifest["splits"][split]["wds"]["ext"]
    num_classes = int(manifest["num_classes"])
    files = split_files(manifest, split, "wds")
    check_wds_split(manifest, split, files)
    blobs, labels = [], []
    for path, shard in zip(files, manifest["splits"][split]["wds"]["shards"]):
        count = 0
        for k, sample in iter_tar(path, fields=(ext, "cls")):
            if ext not in sample or "cls" not in sample:
                raise ShardError(f"{path}: sample {k} has no .{ext if ext not in sample else 'cls'}")
            try:
                label = int(sample["cls"])
            except ValueError:
                raise ShardError(f"{path}: sample {k} has a non-integer label {sample['cls'][:16]!r}") from None
            if not 0 <= label < num_classes:
                raise ShardError(f"{path}: sample {k} has label {label}, outside 0..{num_classes - 1}")
            blobs.append((f"{path}:{k}", sample[ext]))
            labels.append(label)
            count += 1
        if count != int(shard["num_samples"]):
            raise ShardError(f"{path}: {count} samples, manifest says {shard['num_samples']}")
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(pool.map(_decode_png, blobs, chunksize=256))
    if len({a.shape for a in arrays}) > 1:
        raise ShardError(f"{manifest['root']}: split {split!r} mixes image sizes; the memory backend needs one size")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    _CACHE[key] = (images, torch.tensor(labels, dtype=torch.int64))
    return _CACHE[key]


def _crop_flip_draws(n: int, pad: int, gen: torch.Generator, flip: bool):
    """The per-sample draws of :func:`batch_crop_flip`, in its order: row offsets, column offsets, flips."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, flips


def batch_crop_flip(images: torch.Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """RandomCrop(size, padding=pad) + RandomHorizontalFlip for a whole batch, in two gathers.

    Zero padding as torchvision's RandomCrop; draws come from ``gen`` (CPU) and only the small index
    tensors travel to the device.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy, dx, flips = _crop_flip_draws(n, pad, gen, flip)
    cols = dx[:, None] + torch.arange(w)[None, :]
    if flip:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(images.device, non_blocking=True)
    cols = cols.to(images.device, non_blocking=True)
    out = torch.gather(padded, 2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return torch.gather(out, 3, cols[:, None, None, :].expand(n, c, h, w))


if numba is not None:
    from rmix.byte_shuffle import store_pair  # a stub off x86-64, where no shuffle plan is made

    # Offsets are uint64 on purpose: numba wraps negative indices, and that per-element branch on a signed
    # index keeps LLVM from vectorising the row copies (a CIFAR batch of 512, one thread: 2.4 -> 1.0 ms here).
    # Mixing int64 and uint64 in numba gives float64, so every term is converted before it is added.
    @numba.njit(nogil=True, cache=False, inline="always")
    def _zeros(out, start, count):  # pragma: no cover - compiled
        for k in range(count):
            out[start + np.uint64(k)] = 0

    @numba.njit(nogil=True, cache=False)
    def _select_crop_flip(src, sel, dy, dx, flips, pad, out, hist, hist_sel, box_rows, box_cols, bx, by,
                          starts, windows, masks):  # pragma: no cover - compiled
        n_, c_, h, w = out.shape
        plane = h * w
        flat_src, flat_out, flat_hist = src.reshape(-1), out.reshape(-1), hist.reshape(-1)
        # the planned paste (rmix.boxes.PastePlan): box rows by.. read history rows box_rows, its columns
        # bx.. read history columns box_cols; no rows when nothing is pasted. With a shuffle plan (starts,
        # windows, masks: rmix.byte_shuffle.inside_plan) each box row is a few 16-byte stores
        hist_plane, hist_w = hist.shape[2] * hist.shape[3], np.uint64(hist.shape[3])
        nb_rows, nb_cols, chunks = box_rows.shape[0], box_cols.shape[0], starts.shape[0]
        out_base, hist_base = np.uint64(out.ctypes.data), np.uint64(hist.ctypes.data)
        mask_base = np.uint64(masks.ctypes.data)
        for n in range(n_):
            oy, ox, f = dy[n] - pad, dx[n] - pad, flips[n]
            # output columns [lo, hi) read a source column inside the image, the others are zero padding
            lo, hi = (max(0, ox), min(w, w + ox)) if f else (max(0, -ox), min(w, w - ox))
            width = max(hi - lo, 0)
            for c in range(c_):
                out_plane, src_plane = (n * c_ + c) * plane, (sel[n] * c_ + c) * plane
                for y in range(h):
                    row, sy = np.uint64(out_plane + y * w), y + oy
                    if sy < 0 or sy >= h or width == 0:
                        _zeros(flat_out, row, w)
                    else:
                        _zeros(flat_out, row, lo)
                        _zeros(flat_out, row + np.uint64(lo + width), w - lo - width)
                        first = row + np.uint64(lo)
                        if f:  # output column x reads source column w - 1 - x + ox
                            last = np.uint64(src_plane + sy * w + w - 1 + ox - lo)
                            for k in range(width):
                                flat_out[first + np.uint64(k)] = flat_src[last - np.uint64(k)]
                        else:  # output column x reads source column x + ox
                            start = np.uint64(src_plane + sy * w + ox + lo)
                            for k in range(width):
                                flat_out[first + np.uint64(k)] = flat_src[start + np.uint64(k)]
            if nb_rows == 0:
                continue
            # the paste, once the sample's planes are written and still in L1: kept out of the row loop above,
            # which then compiles to a faster crop (the loader, old and new kernel in one process, paired: mix
            # off 1.06-1.10x, RecursiveMix 1.03-1.05x; README, eighth session)
            for c in range(c_):
                out_rows = np.uint64((n * c_ + c) * plane + by * w)
                hist_rows = np.uint64((hist_sel[n] * c_ + c) * hist_plane)
                for i in range(nb_rows):
                    row, hist_row = out_rows + np.uint64(i * w), hist_rows + box_rows[i] * hist_w
                    if chunks:
                        for k in range(chunks):
                            store_pair(out_base + row + np.uint64(starts[k]), hist_base + hist_row + windows[2 * k],
                                       mask_base + np.uint64(32 * k), hist_base + hist_row + windows[2 * k + 1],
                                       mask_base + np.uint64(32 * k + 16))
                    else:
                        at = row + np.uint64(bx)
                        for k in range(nb_cols):
                            flat_out[at + np.uint64(k)] = flat_hist[hist_row + box_cols[k]]


def fuses_paste(images: torch.Tensor) -> bool:
    """Whether :func:`select_crop_flip` copies a planned paste in its own pass for this dataset tensor."""
    return images.device.type == "cpu" and numba is not None and images.is_contiguous()


_NO_ROWS = np.zeros(0, dtype=np.uint64)
_NO_SEL = np.zeros(0, dtype=np.int64)
_NO_MASKS = np.zeros((0, 16), dtype=np.uint8)


def select_crop_flip(images: torch.Tensor, sel: torch.Tensor, pad: int, gen: torch.Generator,
                     flip: bool = True, paste: Optional[PastePlan] = None) -> torch.Tensor:
    """``batch_crop_flip(images.index_select(0, sel), pad, gen, flip)`` bit for bit, in one pass; then
    ``paste.apply(batch)`` when a RecursiveMix paste was planned (:meth:`rmix.RecursiveMix.plan_paste`).

    On the CPU (with numba, which comes with FFCV) the sample selection, zero-padded crop and flip are one
    pass of row copies instead of a select, a pad and two gathers (torch's uint8 gather copies byte by byte):
    ~1 ms for a CIFAR batch of 512 here, against ~25 ms for the torch ops. The paste rides in the same pass:
    once a sample's planes are written, and still in L1, its box rows are overwritten with their history
    pixels (16-byte byte shuffles for a box at least 16 wide, :func:`rmix.byte_shuffle.inside_plan`; byte by
    byte otherwise), so the mix neither walks the batch again nor wakes the threads a second time. The batch
    is split over the intra-op threads (:func:`rmix.host_threads.over_batch`): nothing decodes beside this
    path. Elsewhere (a GPU, no numba) it is those torch ops and the plan's own paste.
    """
    if not fuses_paste(images):
        out = batch_crop_flip(images.index_select(0, sel), pad, gen, flip)
        if paste is not None:
            paste.apply(out)
        return out
    n = sel.shape[0]
    dy, dx, flips = _crop_flip_draws(n, pad, gen, flip)
    out = torch.empty((n, *images.shape[1:]), dtype=images.dtype)
    src, o, s, y, x, f = images.numpy(), out.numpy(), sel.numpy(), dy.numpy(), dx.numpy(), flips.numpy()
    if paste is not None and paste.rows.shape[0] and paste.cols.shape[0]:
        if paste.source.dtype != images.dtype or paste.source.shape[1] != images.shape[1]:
            raise ValueError(f"the paste's source is {paste.source.dtype} with {paste.source.shape[1]} channels, "
                             f"the dataset {images.dtype} with {images.shape[1]}")
        hist, hsel, rows, cols = paste.source.contiguous().numpy(), paste.source_rows, paste.rows, paste.cols
        bx, by = paste.box[0], paste.box[1]
        shuffles = byte_shuffle.inside_plan(o, hist, cols, bx)  # uint8 batches only
    else:  # nothing to paste: no box rows
        hist, hsel, rows, cols, bx, by, shuffles = src, _NO_SEL, _NO_ROWS, _NO_ROWS, 0, 0, None
    starts, windows, masks = shuffles if shuffles is not None else (_NO_SEL, _NO_ROWS, _NO_MASKS)
    over_batch(lambda a, b: _select_crop_flip(src, s[a:b], y[a:b], x[a:b], f[a:b], pad, o[a:b], hist, hsel[a:b],
                                              rows, cols, bx, by, starts, windows, masks), n, o.nbytes)
    return out


class MemoryLoader(Loader):
    backend = "memory"
    decodes_in_parallel = False  # nothing decodes beside the batched augmentation: it keeps every thread

    def __init__(self, manifest, split, **kw):
        super().__init__(manifest, split, **kw)
        if self.preset.kind != "cifar":
            raise ValueError(f"backend 'memory' is the CIFAR fast path; preset {self.preset.name!r} needs dali, ffcv or torch")
        images, labels = load_split(self.manifest, split, self.num_workers)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)

    def _indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        if self.train:
            # rank 0's stream on purpose: every rank draws the same permutation and takes its slice
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, 0, self.epoch, "reader")))
            per_rank = n // self.world_size
            return order[self.rank :: self.world_size][:per_rank]
        return torch.arange(n)[self.rank :: self.world_size]

    def __len__(self) -> int:
        n = self.images.shape[0]
        if self.train:
            return (n // self.world_size) // self.batch_size
        return -(-len(range(self.rank, n, self.world_size)) // self.batch_size)

    def _batches(self, start: int) -> Iterator:
        idx = self._indices().to(self.device)
        fused = fuses_paste(self.images) and self._mixes_uint8()
        for b in range(start, len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            if self.train:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, self.rank, self.epoch, "augment", b))
                # RecursiveMix's paste is copied by the crop's own pass (one walk of the batch, one wake-up
                # of the threads): measured in rmix bench loaders, see pipelines.memory.select_crop_flip
                plan = (self.mix.plan_paste((sel.shape[0], *self.images.shape[1:]), self.images.dtype, self.device)
                        if fused else None)
                images = select_crop_flip(self.images, sel, self.preset.pad, gen, paste=plan)
                yield images, self.labels.index_select(0, sel), plan
            else:
                yield self.images.index_select(0, sel), self.labels.index_select(0, sel)
