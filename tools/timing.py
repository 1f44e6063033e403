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
    # this process from its nanosecond clock: os.times() counts 10 ms ticks, and a memory-path epoch is
    # ~0.25 CPU-s, so ticks quantised its images per CPU-second to +-4 %
    t = os.times()
    total = time.process_time() + t.children_user + t.children_system
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
    return measure_side_by_side({"job": job}, repeats, device, warmup)["job"]


def measure_side_by_side(jobs: dict, repeats: int, device="cpu", warmup: bool = True) -> dict:
    """Time several jobs side by side: each warmed up once, then ``repeats`` rounds that run every job once,
    the order rotating each round. A change in the host's load over the run then falls on every job alike,
    and round ``r`` of one job can be paired with round ``r`` of another (:func:`paired`). Returns one
    :class:`Timing` per name of ``jobs``."""
    names = list(jobs)
    items = {k: jobs[k]() if warmup else 0 for k in names}
    walls: dict = {k: [] for k in names}
    cpus: dict = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            c0, t0 = tree_cpu_seconds(), time.perf_counter()
            items[k] = jobs[k]()
            sync(device)
            walls[k].append(time.perf_counter() - t0)
            cpus[k].append(tree_cpu_seconds() - c0)
    return {k: Timing(walls[k], cpus[k], items[k]) for k in names}


def paired(a: Timing, b: Timing) -> tuple[float, float, float]:
    """Rate of ``a`` over rate of ``b`` per round of one :func:`measure_side_by_side` run: (median, min, max).
    Pairing each round with the same round of the other job cancels the drift that unpaired medians keep."""
    if len(a.walls) != len(b.walls):
        raise ValueError(f"paired() needs the same rounds, got {len(a.walls)} and {len(b.walls)}")
    ratios = [(a.items / wa) / (b.items / wb) for wa, wb in zip(a.walls, b.walls)]
    return statistics.median(ratios), min(ratios), max(ratios)


def cost_in_words(on: Timing, off: Timing) -> str:
    """What switching something on costs in items/s, from paired rounds, saying plainly when the rounds
    disagree on its sign (the difference is then inside the noise)."""
    mid, lo, hi = paired(on, off)
    cost, worst, best = 1 - mid, 1 - lo, 1 - hi
    if len(on.walls) < 3:
        return f"{100 * cost:.1f}% ({len(on.walls)} round(s): too few to tell it from noise; use --repeats 3 or more)"
    words = f"{100 * cost:.1f}% (per round {100 * best:.1f} to {100 * worst:.1f}%)"
    return words + (" -- inside the noise: the rounds disagree on its sign" if best < 0 < worst else "")


def compare(a: Timing, b: Timing) -> str:
    """``a`` relative to ``b`` in words, saying plainly when the difference is inside the noise."""
    ratio = a.per_s / b.per_s
    noise = a.rel_spread() + b.rel_spread()
    verdict = "within the spread of the repeats (no measurable difference)" if abs(ratio - 1) <= noise else \
        ("faster" if ratio > 1 else "slower")
    return f"{ratio:.3f}x ({verdict}; spread +-{100 * noise:.1f}%)"
