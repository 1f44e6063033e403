"""uint8 image batch -> a fresh, normalised float32 (N, 3, H, W) tensor in one pass, on the CPU.

The torch and FFCV backends hand their batches to the trainer as fresh tensors (a RecursiveMix history
keeps a reference to the previous batch, so a reused buffer would change under it). On a CPU the cost
of that freshness is mostly the kernel zero-filling new pages: a 64 x 3 x 224 x 224 float32 batch is
38 MB, above glibc's largest mmap threshold (32 MiB), so every batch is a new mapping and 9,400 page
faults -- about 25 ms per batch here, more than the normalisation itself. Batches that large are
mapped with transparent huge pages (``MADV_HUGEPAGE``: 19 faults), and the conversion, layout change
(any strides in, contiguous NCHW out) and normalisation run as one pass.

That pass is torch's own float32 arithmetic, ``(float(v) - mean) / std`` per element, so the result is bit
for bit ``Loader._finish``'s ``(images.float() - mean) / std`` (one IEEE subtraction and division each,
no fused multiply-add). Compiled with numpy's error model (no zero-division check per element) the loop
vectorises: 3.4x faster than the 256-entry lookup table it replaced (a CIFAR batch of 512: 0.90 ->
0.26 ms here). A channels-last batch (FFCV's output) is read in memory order a block of rows at a time and
dealt to the three planes from a buffer in cache: reading each channel at stride 3 does not vectorise
(CIFAR batch of 512: 1.70 -> 0.57 ms; ImageNet 64 x 224^2: 9.9 -> 4.1 ms). Without numba (it comes with
FFCV) the same values come from torch ops.
"""

from __future__ import annotations

import mmap
from typing import Sequence

import numpy as np
import torch

from rmix.host_threads import over_batch

_BLOCK = 12288  # floats in one block of channels-last rows: 48 KB, still in cache for the second pass
HUGE_BATCH_BYTES = 32 << 20  # glibc's largest dynamic mmap threshold: above it malloc maps fresh pages every time

try:
    import numba
except ImportError:  # pragma: no cover - numba comes with the ffcv extra
    numba = None


def fresh_empty(shape: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """A new uninitialised CPU tensor; one of at least ``HUGE_BATCH_BYTES`` is an anonymous mapping
    advised to use huge pages (its memory goes back when the tensor is freed)."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_BATCH_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(tuple(shape), dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype).view(tuple(shape))  # the tensor keeps the mapping alive


if numba is not None:
    @numba.njit(nogil=True, cache=False, error_model="numpy")
    def _normalise_nchw(src, mean, std, dst):  # pragma: no cover - compiled
        n_, c_, h_, w_ = src.shape
        for n in range(n_):
            for c in range(c_):
                m, s = mean[c], std[c]
                for h in range(h_):
                    row_in, row_out = src[n, c, h], dst[n, c, h]
                    for w in range(w_):
                        row_out[w] = (np.float32(row_in[w]) - m) / s


    @numba.njit(nogil=True, cache=False, error_model="numpy")
    def _normalise_nhwc(src, mean_rep, std_rep, dst):  # pragma: no cover - compiled
        # src (N, H, W, 3) contiguous, dst (N, 3, H, W). Reading the channels apart (stride 3) does not
        # vectorise, so each block of rows is normalised in memory order into a small float buffer, whose
        # values are then dealt to the three planes (mean_rep / std_rep: the channel statistics repeated
        # along a block). Offsets are uint64: numba's negative-index branch would stop the vectorising.
        n_, h_, w_, _ = src.shape
        row = 3 * w_
        rows = max(1, _BLOCK // row)
        tmp = np.empty(rows * row, np.float32)
        flat_src, flat_dst = src.reshape(-1), dst.reshape(-1)
        plane = np.uint64(h_ * w_)
        for n in range(n_):
            for y0 in range(0, h_, rows):
                y1 = min(h_, y0 + rows)
                base = np.uint64((n * h_ + y0) * row)
                for k in range((y1 - y0) * row):
                    tmp[k] = (np.float32(flat_src[base + np.uint64(k)]) - mean_rep[k]) / std_rep[k]
                first = np.uint64((n * 3 * h_ + y0) * w_)
                for p in range((y1 - y0) * w_):
                    q, t = first + np.uint64(p), np.uint64(3 * p)
                    flat_dst[q] = tmp[t]
                    flat_dst[q + plane] = tmp[t + np.uint64(1)]
                    flat_dst[q + plane + plane] = tmp[t + np.uint64(2)]


class Normalise:
    """``(x - mean) / std`` per channel (0..255-scale statistics) from uint8 into a fresh float32 tensor.

    ``normalise(images)``: ``images`` uint8 (N, 3, H, W) on the CPU with any strides (e.g. FFCV's
    channels-last view of its reused buffer) -> a new contiguous float32 (N, 3, H, W) tensor. One
    vectorised pass of torch's float32 arithmetic (numba, GIL released), the batch split over the caller's
    intra-op threads (:func:`rmix.host_threads.over_batch`): the result equals
    ``(images.float() - mean) / std`` bit for bit.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._mean_host, self._std_host = self.mean.view(3).numpy(), self.std.view(3).numpy()
        self._by_width: dict = {}

    def _repeated(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The statistics repeated over one block of channels-last rows of this width (``_normalise_nhwc``)."""
        if width not in self._by_width:
            pixels = width * max(1, _BLOCK // (3 * width))
            self._by_width[width] = (np.tile(self._mean_host, pixels), np.tile(self._std_host, pixels))
        return self._by_width[width]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or images.device.type != "cpu":
            raise ValueError(f"Normalise takes CPU uint8 (N, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)} on {images.device}")
        out = fresh_empty(images.shape)
        if numba is not None and images.permute(0, 2, 3, 1).is_contiguous():  # channels last (FFCV's, OpenCV's)
            src, dst = images.permute(0, 2, 3, 1).numpy(), out.numpy()
            mean, std = self._repeated(images.shape[3])
            over_batch(lambda a, b: _normalise_nhwc(src[a:b], mean, std, dst[a:b]), src.shape[0], dst.nbytes)
        elif numba is not None:
            src, dst = images.numpy(), out.numpy()
            mean, std = self._mean_host, self._std_host
            over_batch(lambda a, b: _normalise_nchw(src[a:b], mean, std, dst[a:b]), src.shape[0], dst.nbytes)
        else:  # the same float32 arithmetic, three passes
            out.copy_(images).sub_(self.mean).div_(self.std)
        return out
