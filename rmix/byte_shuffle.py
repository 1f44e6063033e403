"""Nearest paste of a uint8 batch with byte shuffles (SSSE3 ``pshufb``): 16 pasted pixels per instruction pair.

The nearest resize of a box reads, for every pasted row, the same source columns ``cols``: a gather that a
scalar loop does byte by byte (~1 ns per pixel here, the same as OpenCV's ``INTER_NEAREST``). Because
``cols`` is shared by every row of every plane of the batch, the gather can be planned once per box and
replayed with byte shuffles:

* a box row is cut into *chunks* of 16 output bytes (the last chunk overlaps its neighbour instead of running
  past the box; a box narrower than 16 pixels gets one chunk that keeps the pixels around it);
* each chunk reads ``windows`` of 16 source bytes; a window's 16-byte mask sends each output byte to its
  column in the window, or to zero (``0x80``) when another window holds it; the chunk is the OR of its
  windows' shuffles. A downscale by up to 2 needs two windows per chunk, CIFAR's 32-byte rows always two.

numba has no byte shuffle of its own, so the instruction comes from LLVM (``llvm.x86.ssse3.pshuf.b.128``)
through a numba intrinsic. :data:`AVAILABLE` is False where the CPU lacks it (not x86-64, or no SSSE3) or numba
is missing; :func:`rmix.boxes.paste_one_box` then keeps its scalar kernel. Both give ``F.interpolate(mode=
'nearest')`` bit for bit (tests/test_rmix.py checks the two against it and against each other). The memory
path's crop kernel uses :func:`store_pair` on the plan of :func:`inside_plan`: chunks that lie inside a box at
least 16 wide, stored without reading the row back (tests/test_pipelines.py checks it against the torch route).

Measured here (AMD EPYC, one thread, median over 300 RecursiveMix boxes, alpha 0.5), scalar -> shuffles:
CIFAR batch 512 x 3 x 32 x 32 0.27 -> 0.20 ms; ImageNet 64 x 3 x 224 x 224 1.70 -> 1.42 ms; ADE20K 8 x 3 x 512 x
512 1.55 -> 0.78 ms; COCO 8 x 3 x 800 x 1088 5.8 -> 3.8 ms. Past the caches the bound is reading the history's
rows from memory (the same paste on one plane in cache: 3.3x), hence the prefetch below.
"""

from __future__ import annotations

import platform

import numpy as np

try:
    import numba
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba comes with FFCV, which the Makefile installs
    numba = None

PREFETCH_ROWS = 4  # source and destination rows asked for this many rows ahead ...
PREFETCH_FROM_BYTES = 4 << 20  # ... when the history batch is this big (beyond the caches: detection,
# ImageNet). A detection batch's paste went 2.5 -> 1.3 ms with it (best of 40), ImageNet 0.56 -> 0.51 ms; a
# CIFAR batch, which stays in cache, gets slower with it (0.12 -> 0.14 ms)
# Split over the intra-op threads only from 1 MB pasted per thread: waking a pool thread costs ~0.3 ms on this
# VM, what the kernel takes for ~1 MB (a CIFAR batch's paste, ~0.3 MB, went 0.35 -> 0.26 ms on one thread)
MIN_CHUNK_BYTES = 1 << 20
MASK_ZERO = 0x80  # a pshufb mask byte with the high bit set writes zero


def _cpu_has_pshufb() -> bool:
    if numba is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import llvmlite.binding as llvm
    try:
        return bool(llvm.get_host_cpu_features().get("ssse3", False))
    except RuntimeError:  # pragma: no cover - features unknown on this host: stay scalar
        return False


AVAILABLE = _cpu_has_pshufb()

if AVAILABLE:
    _V16 = ir.VectorType(ir.IntType(8), 16)

    def _load16(builder, addr):
        return builder.load(builder.inttoptr(addr, _V16.as_pointer()), align=1)

    def _two_shuffles(builder, src0, mask0, src1, mask1):
        """IR for ``pshufb(src0, mask0) | pshufb(src1, mask1)``: 16 bytes each, unaligned, uint64 addresses."""
        shuffle = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16, _V16]),
                                                 "llvm.x86.ssse3.pshuf.b.128")
        return builder.or_(builder.call(shuffle, [_load16(builder, src0), _load16(builder, mask0)]),
                           builder.call(shuffle, [_load16(builder, src1), _load16(builder, mask1)]))

    @intrinsic
    def _shuffle_pair(typingctx, dst, src0, mask0, src1, mask1, keep):
        """Store ``pshufb(src0, mask0) | pshufb(src1, mask1) | (dst & keep)`` at ``dst``: 16 bytes each,
        unaligned, addresses as uint64. ``keep`` is zeros (overwrite), 0xFF where a pixel beside a narrow box
        stays, or all 0xFF (OR into the chunk's earlier windows): no branch per chunk."""
        sig = types.void(types.uint64, types.uint64, types.uint64, types.uint64, types.uint64, types.uint64)

        def codegen(context, builder, signature, args):
            dst, src0, mask0, src1, mask1, keep = args
            out = _two_shuffles(builder, src0, mask0, src1, mask1)
            out = builder.or_(out, builder.and_(_load16(builder, dst), _load16(builder, keep)))
            builder.store(out, builder.inttoptr(dst, _V16.as_pointer()), align=1)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def store_pair(typingctx, dst, src0, mask0, src1, mask1):
        """Store ``pshufb(src0, mask0) | pshufb(src1, mask1)`` at ``dst`` (16 bytes, unaligned, addresses as
        uint64), reading nothing at ``dst``: for a chunk that lies inside its box, written right after the
        row around it (a 16-byte load of bytes that were just stored would wait for those stores)."""
        sig = types.void(types.uint64, types.uint64, types.uint64, types.uint64, types.uint64)

        def codegen(context, builder, signature, args):
            dst, src0, mask0, src1, mask1 = args
            builder.store(_two_shuffles(builder, src0, mask0, src1, mask1), builder.inttoptr(dst, _V16.as_pointer()),
                          align=1)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _prefetch(typingctx, addr, write):
        """Ask for the cache line at ``addr`` (uint64) ahead of use: ``llvm.prefetch``, a hint that never faults."""
        sig = types.void(types.uint64, types.boolean)

        def codegen(context, builder, signature, args):
            addr, write = args
            i32 = ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32]),
                "llvm.prefetch.p0i8")
            ptr = builder.inttoptr(addr, ir.IntType(8).as_pointer())
            with builder.if_else(write) as (then, otherwise):
                with then:
                    builder.call(fn, [ptr, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
                with otherwise:
                    builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    @numba.njit(nogil=True, cache=False)
    def _plan(cols, x1, width, in_w):  # pragma: no cover - compiled
        nc = cols.shape[0]
        nch = (nc + 15) // 16 if nc >= 16 else 1
        starts = np.empty(nch, np.int64)  # first output column of each chunk in the destination row
        for k in range(nch):
            starts[k] = x1 + min(16 * k, nc - 16) if nc >= 16 else min(x1, width - 16)
        offs = np.zeros((nch, 16), np.int64)  # at most 16 windows per chunk
        masks = np.full((nch, 16, 16), MASK_ZERO, np.uint8)
        keep = np.zeros(16, np.uint8)
        used = np.zeros(nch, np.int64)
        for k in range(nch):
            cur = -1
            for b in range(16):
                j = starts[k] + b - x1
                if j < 0 or j >= nc:  # only in a box narrower than 16: a pixel beside the box stays
                    keep[b] = 0xFF
                    continue
                col = np.int64(cols[j])
                if cur < 0 or col >= offs[k, cur] + 16:  # cols only grow: a new window from this column
                    cur += 1
                    offs[k, cur] = min(col, in_w - 16)
                masks[k, cur, b] = col - offs[k, cur]
            used[k] = cur + 1
        pairs = (used.max() + 1) // 2
        # flat, in the order the kernel reads them: per chunk, per pair of windows
        windows = offs[:, :2 * pairs].copy().reshape(-1).astype(np.uint64)
        window_masks = masks[:, :2 * pairs].copy().reshape(-1, 16)
        keeps = np.full((nch, pairs, 16), 0xFF, np.uint8)  # later pairs OR into the chunk
        for k in range(nch):
            keeps[k, 0] = keep  # the first pair overwrites, but for the pixels beside a narrow box
        span = np.array([cols[0], cols[nc - 1] + 1], np.int64)  # source columns read: for the prefetch
        return starts, windows, window_masks, keeps.reshape(-1, 16), span

    @numba.njit(nogil=True, cache=False)
    def _paste(dst, src, rows, y1, ahead, starts, windows, masks, keeps, span):  # pragma: no cover - compiled
        d0, d1, d2 = dst.strides[0], dst.strides[1], dst.strides[2]
        s0, s1, s2 = src.strides[0], src.strides[1], src.strides[2]
        d_base, s_base = np.uint64(dst.ctypes.data), np.uint64(src.ctypes.data)
        m_base, k_base = np.uint64(masks.ctypes.data), np.uint64(keeps.ctypes.data)
        nch = starts.shape[0]
        pairs = windows.shape[0] // (2 * nch)
        lo_d, hi_d = starts[0], starts[nch - 1] + 16
        for n in range(dst.shape[0]):
            for c in range(dst.shape[1]):
                s_plane = s_base + np.uint64(n * s0 + c * s1)
                for i in range(rows.shape[0]):
                    s_row = s_plane + rows[i] * np.uint64(s2)
                    d_row = d_base + np.uint64(n * d0 + c * d1 + (y1 + i) * d2)
                    if ahead and i + ahead < rows.shape[0]:
                        s_next = s_plane + rows[i + ahead] * np.uint64(s2)
                        d_next = d_row + np.uint64(ahead * d2)
                        for a in range(span[0], span[1], 64):
                            _prefetch(s_next + np.uint64(a), False)
                        for a in range(lo_d, hi_d, 64):
                            _prefetch(d_next + np.uint64(a), True)
                    q = 0  # pair index over the whole plan
                    for k in range(nch):
                        d = d_row + np.uint64(starts[k])
                        for _ in range(pairs):
                            _shuffle_pair(d, s_row + windows[2 * q], m_base + np.uint64(32 * q),
                                          s_row + windows[2 * q + 1], m_base + np.uint64(32 * q + 16),
                                          k_base + np.uint64(16 * q))
                            q += 1

elif numba is not None:  # pragma: no cover - not x86-64: kernels that take a shuffle plan get none
    @numba.njit(nogil=True, cache=False)
    def store_pair(dst, src0, mask0, src1, mask1):
        raise RuntimeError("byte shuffles need an x86-64 CPU with SSSE3")


_PLANS: dict = {}  # (box columns, source width, destination width, x1 where it matters) -> plan


def plan(cols: np.ndarray, x1: int, width: int, in_w: int):
    """The shuffle plan of one box's columns (see the module docstring); cached per geometry."""
    nc = cols.shape[0]
    key = (nc, in_w, width, x1 if nc < 16 else -1)
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS.setdefault(key, _plan(cols, 0 if nc >= 16 else x1, width, in_w))
    if nc >= 16:  # chunk starts are planned for x1 = 0
        p = (p[0] + x1, *p[1:])
    return p


def inside_plan(dst: np.ndarray, src: np.ndarray, cols: np.ndarray, x1: int):
    """``(starts, windows, masks)`` for :func:`store_pair`, or None: for arrays :func:`usable` takes and a box at
    least 16 pixels wide whose chunks each read at most two windows (a downscale by up to 2, e.g. every
    RecursiveMix box on CIFAR), every chunk lies inside the box, so a kernel that has just written the row around
    it stores the chunks without reading anything back."""
    if cols.shape[0] < 16 or not usable(dst, src):
        return None
    starts, windows, masks, _, _ = plan(cols, x1, dst.shape[3], src.shape[3])
    return (starts, windows, masks) if windows.shape[0] == 2 * starts.shape[0] else None


def usable(dst: np.ndarray, src: np.ndarray) -> bool:
    """Whether :func:`paste` takes these arrays: uint8, NCHW with unit column stride, both at least 16 wide."""
    return (AVAILABLE and dst.dtype == np.uint8 and src.dtype == np.uint8 and dst.ndim == 4 and src.ndim == 4
            and dst.strides[3] == 1 and src.strides[3] == 1 and dst.shape[3] >= 16 and src.shape[3] >= 16)


def paste(dst: np.ndarray, src: np.ndarray, rows: np.ndarray, y1: int, box_plan) -> None:
    """In place: ``dst[n, c, y1 + i, x1 + j] = src[n, c, rows[i], cols[j]]`` for the ``cols`` and ``x1`` that
    ``box_plan = plan(cols, x1, ...)`` was made from (rows, cols: uint64; cols non-decreasing, as a nearest
    index is). Needs :func:`usable`."""
    ahead = PREFETCH_ROWS if src.nbytes >= PREFETCH_FROM_BYTES else 0
    _paste(dst, src, rows, y1, ahead, *box_plan)
