"""Box sampling and the resize-and-paste kernel shared by RecursiveMix, CutMix and ResizeMix.

Boxes are drawn on the host from a numpy Generator (a few scalars per batch), so the mixes never
read a value back from the device: no host-device sync in the hot path. Pasting runs on the device
of the images.

Frame: a box is ``(x1, y1, x2, y2)`` in pixels with x = column (dim 3), y = row (dim 2), x2/y2
exclusive, which is what ``torchvision.ops.roi_align`` expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import byte_shuffle
from .host_threads import over_batch


def sample_box(rng: np.random.Generator, ratio: float, height: int, width: int) -> tuple[int, int, int, int]:
    """One box of :func:`sample_boxes` as Python ints, from the same draws (Python-scalar draws give the values
    that ``size=1`` arrays give, ~10x faster: this is the one-box-per-batch hot path)."""
    half_w, half_h = int(width * ratio) // 2, int(height * ratio) // 2
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    return max(cx - half_w, 0), max(cy - half_h, 0), min(cx + half_w, width), min(cy + half_h, height)


def sample_boxes(rng: np.random.Generator, ratio: np.ndarray, height: int, width: int) -> np.ndarray:
    """Square-ratio boxes as in the seed's ``rand_bbox``: side = int(size * ratio), centre uniform
    over the image, half-sides of ``side // 2`` on each side of the centre, clipped to the image.

    Args:
        rng: the mix's generator; draws the centres (x first, then y).
        ratio: (n,) side ratios in [0, 1].
    Returns:
        (n, 4) int64 array of ``(x1, y1, x2, y2)``.
    """
    n = ratio.shape[0]
    if n == 1:
        return np.array([sample_box(rng, float(ratio[0]), height, width)], dtype=np.int64)
    half_w = (width * ratio).astype(np.int64) // 2
    half_h = (height * ratio).astype(np.int64) // 2
    cx = rng.integers(0, width, size=n)
    cy = rng.integers(0, height, size=n)
    return np.stack(
        [
            np.clip(cx - half_w, 0, width),
            np.clip(cy - half_h, 0, height),
            np.clip(cx + half_w, 0, width),
            np.clip(cy + half_h, 0, height),
        ],
        axis=1,
    )


def box_lam(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """1 - (clipped box area / image area), per box, as float32."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (1.0 - area / float(height * width)).astype(np.float32)


def resize(src: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a whole batch to ``size`` = (h, w) with the seed's settings (nearest; or bilinear with
    align_corners=True). uint8 is resized in float and rounded back, so it works on every device."""
    if mode == "nearest":
        return F.interpolate(src, size=size, mode="nearest")
    if src.is_floating_point():
        return F.interpolate(src, size=size, mode="bilinear", align_corners=True)
    out = F.interpolate(src.float(), size=size, mode="bilinear", align_corners=True)
    return out.round_().clamp_(0, 255).to(src.dtype)


_NEAREST: dict = {}  # (out_len, in_len, device) -> source index of each output position


def nearest_index(out_len: int, in_len: int, device: torch.device) -> torch.Tensor:
    """Source index of each of ``out_len`` positions resized nearest from ``in_len``, by PyTorch's rule
    (``floor(dst * float32(in / out))``, clamped), so a gather with it equals ``F.interpolate(mode=
    'nearest')`` bit for bit. Cached: a batch-level box has few distinct sizes."""
    key = (out_len, in_len, str(device))
    idx = _NEAREST.get(key)
    if idx is None:
        scale = torch.tensor(float(in_len), dtype=torch.float32) / float(out_len)
        idx = torch.floor(torch.arange(out_len, dtype=torch.float32) * scale).long().clamp_(max=in_len - 1)
        idx = _NEAREST.setdefault(key, idx.to(device))
    return idx


# Host index arrays the paste kernels read, cached (a loader asks for the same few every batch); nothing writes
# them (left writeable: numba compiles a kernel again for read-only arrays)
_NEAREST_HOST: dict = {}  # (out_len, in_len) -> nearest_index as a uint64 numpy array, for the numba kernels
_CYCLED: dict = {}  # (n, m) -> i % m for i < n


def _nearest_host(out_len: int, in_len: int) -> np.ndarray:
    idx = _NEAREST_HOST.get((out_len, in_len))
    if idx is None:
        idx = (nearest_index(out_len, in_len, torch.device("cpu")).numpy().astype(np.uint64) if out_len > 0
               else np.zeros(0, np.uint64))
        idx = _NEAREST_HOST.setdefault((out_len, in_len), idx)
    return idx


def _cycled_rows(n: int, m: int) -> np.ndarray:
    """(n,) int64 ``i % m``: the history row each sample shows (the documented row rule)."""
    rows = _CYCLED.get((n, m))
    if rows is None:
        rows = np.arange(n, dtype=np.int64) % m
        rows = _CYCLED.setdefault((n, m), rows)
    return rows


try:
    import numba
except ImportError:  # pragma: no cover - numba comes with FFCV, which the Makefile installs
    numba = None

if numba is not None:
    @numba.njit(nogil=True, cache=False)
    def _paste_nearest(dst, src, rows, cols, y1, x1):  # pragma: no cover - compiled
        nc = cols.shape[0]
        for n in range(dst.shape[0]):
            for c in range(dst.shape[1]):
                for i in range(rows.shape[0]):
                    s = src[n, c, rows[i]]
                    d = dst[n, c, y1 + i, x1:x1 + nc]  # a 1-D view of the box's row: 1.6x faster than indexing dst
                    for j in range(nc):
                        d[j] = s[cols[j]]  # cols is uint64: no negative-index wraparound branch (1.3x)
else:  # pragma: no cover
    _paste_nearest = None  # torch's path (the tests set this to exercise it)


def paste_one_box(dst: torch.Tensor, src: torch.Tensor, box: Sequence[int], mode: str) -> None:
    """In place: the whole of each ``src[i]`` resized into the same ``box`` of ``dst[i]``.

    Nearest on a CPU batch (uint8 or float32) is one compiled pass (numba) that reads each pasted pixel from
    its nearest source pixel and writes it straight into the box, split over the caller's intra-op threads:
    no temporary batch; a uint8 batch at least 16 pixels wide copies 16 pixels per byte shuffle
    (:mod:`rmix.byte_shuffle`, on x86-64 CPUs). Torch's own ops are slower there (``upsample_nearest2d``
    has no fast uint8 kernel, ``index_select`` along the last axis copies byte by byte, and both wake the
    OpenMP pool that DALI's threads share the cores with); without numba they remain the path. On a GPU a uint8 batch gathers the
    box's rows and then its columns with ``index_select``; float keeps ``F.interpolate``. Every path equals
    ``F.interpolate(mode='nearest')`` bit for bit.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        return  # zero-area box: nothing to paste (the seed would call interpolate with size 0)
    if mode != "nearest":
        dst[:, :, y1:y2, x1:x2] = resize(src, (y2 - y1, x2 - x1), mode)
        return
    kernel = _paste_nearest
    if dst.device.type == "cpu" and src.dtype == dst.dtype and not dst.requires_grad:
        d, s = dst.numpy(), src.numpy()
        shuffle = byte_shuffle.usable(d, s)  # uint8: 16 pixels per byte shuffle instead of one per load
        if shuffle or (kernel is not None and dst.dtype in (torch.uint8, torch.float32)):
            r, c = _nearest_host(y2 - y1, src.shape[2]), _nearest_host(x2 - x1, src.shape[3])
            pasted_bytes = dst.shape[0] * dst.shape[1] * r.shape[0] * c.shape[0] * dst.element_size()
            if shuffle:
                p = byte_shuffle.plan(c, x1, d.shape[3], s.shape[3])
                over_batch(lambda a, b: byte_shuffle.paste(d[a:b], s[a:b], r, y1, p), dst.shape[0], pasted_bytes,
                           byte_shuffle.MIN_CHUNK_BYTES)
            else:
                over_batch(lambda a, b: kernel(d[a:b], s[a:b], r, c, y1, x1), dst.shape[0], pasted_bytes)
            return
    if src.is_floating_point():
        dst[:, :, y1:y2, x1:x2] = resize(src, (y2 - y1, x2 - x1), mode)
        return
    rows = nearest_index(y2 - y1, src.shape[2], src.device)
    cols = nearest_index(x2 - x1, src.shape[3], src.device)
    picked = src.index_select(2, rows)  # whole rows: a contiguous copy per row, fast everywhere
    if dst.device.type == "cpu" and x2 - x1 >= 64:
        # (without numba) torch's index_select along the last axis copies uint8 byte by byte; numpy's take is 3x
        # faster on this axis for wide boxes (45 -> 16 ms for an 8x3x800x1088 batch, 17 -> 6 ms for
        # 64x3x224x224; slower on CIFAR's 32-pixel rows) and writes straight into the box, whatever the
        # strides of ``dst``
        np.take(picked.numpy(), cols.numpy(), axis=3, out=dst[:, :, y1:y2, x1:x2].numpy(), mode="clip")
        return
    dst[:, :, y1:y2, x1:x2] = picked.index_select(3, cols)


@dataclass(frozen=True)
class PastePlan:
    """One batch-level nearest paste, decided before the batch's pixels exist.

    A loader that writes the batch in a compiled pass of its own (the memory path's crop) can copy the
    pasted pixels in that same pass instead of a second one over the finished batch
    (:meth:`rmix.RecursiveMix.plan_paste`). Applying the plan to a batch gives what
    ``paste_one_box(batch, source[source_rows], box, 'nearest')`` gives, bit for bit.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in the batch's pixels; it may have zero area (nothing to paste).
        source: (M, C, h, w) images resized into the box, on the host.
        source_rows: (N,) int64, the row of ``source`` that sample i shows in its box.
        rows, cols: uint64 nearest source row of each box row and source column of each box column
            (PyTorch's rule, :func:`nearest_index`).
    """

    box: tuple[int, int, int, int]
    source: torch.Tensor
    source_rows: np.ndarray
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def nearest(cls, box: Sequence[int], source: torch.Tensor, n: int) -> "PastePlan":
        """The plan for ``box`` of an ``n``-sample batch, with sample i showing ``source[i % len(source)]``."""
        x1, y1, x2, y2 = map(int, box)
        h, w = max(y2 - y1, 0), max(x2 - x1, 0)
        return cls((x1, y1, x2, y2), source, _cycled_rows(n, source.shape[0]),
                   _nearest_host(h, source.shape[2]), _nearest_host(w, source.shape[3]))

    def apply(self, dst: torch.Tensor) -> None:
        """In place, the plain way: :func:`paste_one_box` of the plan's source rows (the reference)."""
        paste_one_box(dst, self.source.index_select(0, torch.from_numpy(self.source_rows)), self.box, "nearest")


def _source_coords(start: torch.Tensor, stop: torch.Tensor, out_len: int, in_len: int, mode: str):
    """For each sample and each output position along one axis: the source coordinate(s) of the
    resized history, and whether the position lies inside the box.

    Nearest follows PyTorch's rule (``floor(dst * float32(in / out))``, clamped), so a per-sample
    paste equals ``F.interpolate(mode='nearest')`` of the same box bit for bit.
    """
    device = start.device
    pos = torch.arange(out_len, device=device)
    rel = pos[None, :] - start[:, None]  # (n, out_len)
    length = (stop - start).clamp(min=1)
    inside = (rel >= 0) & (rel < (stop - start)[:, None])
    rel = rel.clamp(min=0)
    if mode == "nearest":
        scale = (torch.tensor(float(in_len), dtype=torch.float32, device=device) / length.float())[:, None]
        idx = torch.floor(rel.float() * scale).long().clamp_(max=in_len - 1)
        return inside, idx, None, None
    # bilinear, align_corners=True: src = dst * (in - 1) / (out - 1)
    scale = torch.where(length > 1, (in_len - 1) / (length - 1).clamp(min=1).float(), torch.zeros_like(length, dtype=torch.float32))
    src = rel.float() * scale[:, None]
    i0 = torch.floor(src).long().clamp_(max=in_len - 1)
    i1 = (i0 + 1).clamp_(max=in_len - 1)
    frac = (src - i0.float()).clamp_(0, 1)
    return inside, i0, i1, frac


def _gather_axis(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """x: (n, C, H, W); idx: (n, L) indices along ``dim`` (2 or 3) -> x with that axis of length L."""
    n, c, h, w = x.shape
    if dim == 2:
        index = idx[:, None, :, None].expand(n, c, idx.shape[1], w)
    else:
        index = idx[:, None, None, :].expand(n, c, h, idx.shape[1])
    return torch.gather(x, dim, index)


def paste_per_sample(dst: torch.Tensor, src: torch.Tensor, boxes: np.ndarray, mode: str) -> None:
    """In place: ``src[i]`` resized into ``boxes[i]`` of ``dst[i]``, every sample with its own box,
    in one batched gather (no Python loop over the batch, no device sync)."""
    n, _, height, width = dst.shape
    b = torch.from_numpy(boxes).to(dst.device, non_blocking=True)
    in_h, in_w = src.shape[-2:]
    in_y, y0, y1, fy = _source_coords(b[:, 1], b[:, 3], height, in_h, mode)
    in_x, x0, x1, fx = _source_coords(b[:, 0], b[:, 2], width, in_w, mode)
    if mode == "nearest":
        pasted = _gather_axis(_gather_axis(src, y0, 2), x0, 3)
    else:
        work = src if src.is_floating_point() else src.float()
        fy = fy.to(work.dtype)[:, None, :, None]
        fx = fx.to(work.dtype)[:, None, None, :]
        rows = torch.lerp(_gather_axis(work, y0, 2), _gather_axis(work, y1, 2), fy)
        pasted = torch.lerp(_gather_axis(rows, x0, 3), _gather_axis(rows, x1, 3), fx)
        if not dst.is_floating_point():
            pasted = pasted.round_().clamp_(0, 255)
        pasted = pasted.to(dst.dtype)
    inside = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (n, 1, H, W)
    dst.copy_(torch.where(inside, pasted, dst))
