"""Run a GIL-free CPU kernel over a batch in the caller's intra-op threads.

The CPU kernels of the memory path and of the paste (numba, ``nogil=True``) are single-threaded loops over
the samples of a batch. Splitting the batch into contiguous chunks, one per thread, lets them use the cores
that torch's own ops would. The number of threads is ``torch.get_num_threads()``: the budget the caller has
set for intra-op work (a loader whose decoder runs beside the batch work sets it to 1, so nothing is split
there, and the memory path keeps every core).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

MIN_CHUNK_BYTES = 1 << 16  # below ~64 KB per thread, waking a thread costs more than it saves

_POOL: dict = {}
_LOCK = threading.Lock()
# A forked child (a DataLoader worker) inherits the pools but not their threads: it builds its own
os.register_at_fork(after_in_child=_POOL.clear)


def _pool(threads: int) -> ThreadPoolExecutor:
    with _LOCK:
        pool = _POOL.get(threads)
        if pool is None:
            pool = _POOL[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="rmix-host")
        return pool


def over_batch(kernel: Callable[[int, int], None], n: int, nbytes: int, min_chunk_bytes: int = 0) -> None:
    """Call ``kernel(start, stop)`` on contiguous chunks of ``range(n)`` that together cover it once:
    the first chunk in the calling thread, the others in a pool, one per intra-op thread, when the
    ``nbytes`` the kernel writes are worth it: at least ``min_chunk_bytes`` per thread (default
    :data:`MIN_CHUNK_BYTES`; a kernel that writes many bytes per microsecond asks for more). Exceptions
    propagate."""
    threads = min(torch.get_num_threads(), n, max(1, nbytes // (min_chunk_bytes or MIN_CHUNK_BYTES)))
    if threads <= 1:
        kernel(0, n)
        return
    bounds = [n * i // threads for i in range(threads + 1)]
    futures = [_pool(threads).submit(kernel, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    kernel(bounds[0], bounds[1])
    for f in futures:
        f.result()
