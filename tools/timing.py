"""The one timing helper of every benchmark: wall time and CPU time of the whole process tree.

``os.times()`` counts this process and the children it has *reaped*; persistent DataLoader workers
(and FFCV/DALI helper processes) are alive while we measure, so their CPU time is not in it. The
tree clock adds the live descendants' CPU time read with psutil. A worker reaped between two readings
moves from the live sum to ``os.times()``' children total, so nothing is counted twice or lost.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import psutil
import torch


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process, its reaped children and its live descendants."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in psutil.Process().children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:  # exited between listing and reading: counted once reaped
            continue
    return total


def sync(device) -> None:
    """Wait for queued device work, so a reading covers it (CUDA only)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Repeated measurements of one job: wall and tree-CPU seconds per repeat, items per repeat."""

    walls: list
    cpus: list
    items: int

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def per_s(self) -> float:
        return self.items / self.wall

    @property
    def per_cpu_s(self) -> float:
        return self.items / max(statistics.median(self.cpus), 1e-9)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of items per second over the repeats."""
        return self.items / max(self.walls), self.items / min(self.walls)

    def rel_spread(self) -> float:
        """Half the min-max range of items/s, relative to the median: the noise of this cell."""
        lo, hi = self.spread
        return (hi - lo) / 2 / self.per_s


def measure(job: Callable[[], int], repeats: int, device="cpu", warmup: bool = True) -> Timing:
    """Run ``job`` (returns the number of items it processed) once to warm up, then ``repeats`` times."""
    items = job() if warmup else 0
    walls, cpus = [], []
    for _ in range(repeats):
        sync(device)
        c0, t0 = tree_cpu_seconds(), time.perf_counter()
        items = job()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(tree_cpu_seconds() - c0)
    return Timing(walls, cpus, items)


def compare(a: Timing, b: Timing) -> str:
    """``a`` relative to ``b`` in words, saying plainly when the difference is inside the noise."""
    ratio = a.per_s / b.per_s
    noise = a.rel_spread() + b.rel_spread()
    verdict = "within the spread of the repeats (no measurable difference)" if abs(ratio - 1) <= noise else \
        ("faster" if ratio > 1 else "slower")
    return f"{ratio:.3f}x ({verdict}; spread +-{100 * noise:.1f}%)"
