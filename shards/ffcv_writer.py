"""FFCV ``.beton`` writer: an RGB image field and an int label field, written with FFCV's own
``DatasetWriter`` to a temporary name and renamed when complete.

FFCV (1.0.2) does not watch its worker processes: when one raises (``ENOSPC`` while it flushes a page,
a decoder error), the main process waits for its progress counter forever, and the other workers spin
forever waiting for the failed worker's page to be written. So the workers run a guarded job that
reports any exception on a queue and exits, and the main process, while inside FFCV's loop, handles
``SIGCHLD``: a child that exited with a report stops the write (the other workers are killed, the
temporary file and FFCV's shared memory removed) and becomes one :class:`ShardError` line. Work is
handed out through a shared chunk counter instead of FFCV's work queue, so nothing is left queued
behind a failed run. (A worker killed outright, e.g. by the OOM killer, reports nothing and still
hangs FFCV.) FFCV's orchestration itself (``DatasetWriter._write_common``: prepare, start the workers,
wait, finalize) is called as is; it is private API of the pinned ffcv==1.0.2.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import threading
from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np

from .errors import ShardError
from .progress import Progress
from .sources import Source

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
CHUNK = 256  # samples a worker takes at a time


class _Indexed:
    """FFCV's indexable-dataset protocol over the kept samples of a source."""

    def __init__(self, source: Source, indices: Sequence[int]):
        # a numpy array, not a list: 8 bytes a sample, and pages the forked workers share
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        return self.source.array(j), self.source.label(j)


class _Plan:
    """What every worker shares (inherited through fork): the samples, the next chunk to take, a stop
    flag, the workers' pids, the queue a failing worker reports on, and the seed of each chunk's
    draws (:meth:`get`)."""

    def __init__(self, dataset: _Indexed, workers: int, chunk: int = CHUNK, seed: Sequence[int] = (0,)):
        ctx = mp.get_context("fork")
        self.dataset, self.chunk, self.seed = dataset, chunk, [int(x) for x in seed]
        self.next_chunk = ctx.Value("q", 0)
        self.stop = ctx.Value("b", 0, lock=False)  # one byte, set once: no lock a killed worker could hold
        self.pids = ctx.Array("q", workers)
        self.started = ctx.Value("q", 0)
        self.errors = ctx.SimpleQueue()

    def get(self):
        """FFCV's ``input_queue.get()``: the next ``[(dest index, dataset index), ...]`` or None.

        Called in the worker just before it encodes the chunk, so this is where numpy's global
        generator is seeded for it: FFCV's ``RGBImageField`` in 'proportion' mode picks the images it
        compresses with ``np.random.rand()``. Seeded per chunk from ``seed`` and the chunk's number,
        each sample's draw is the same whichever worker takes its chunk and however many there are."""
        if self.stop.value:
            return None
        with self.next_chunk.get_lock():
            c = self.next_chunk.value
            self.next_chunk.value = c + 1
        start, n = c * self.chunk, len(self.dataset)
        if start >= n:
            return None
        np.random.seed(np.random.SeedSequence(self.seed + [c]).generate_state(1)[0])
        return [(i, i) for i in range(start, min(start + self.chunk, n))]

    def register(self) -> None:
        with self.started.get_lock():
            self.pids[self.started.value] = os.getpid()
            self.started.value += 1

    def kill_workers(self) -> None:
        """SIGKILL every worker; exited ones are zombies until reaped, so their pids are not reused."""
        self.stop.value = 1
        for pid in self.pids[: self.started.value]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        mp.active_children()  # reap them


def _guarded_job(workqueue, metadata_sm, metadata_type, fields, allocator, done_number, allocations_queue,
                 plan: _Plan):
    """FFCV's ``worker_job_indexed_dataset`` fed from ``plan``; an exception is reported, not printed."""
    from ffcv.writer import worker_job_indexed_dataset

    plan.register()
    if plan.stop.value:
        os._exit(0)
    try:
        worker_job_indexed_dataset(plan, metadata_sm, metadata_type, fields, allocator, done_number,
                                   allocations_queue, plan.dataset)
    except KeyboardInterrupt:  # Ctrl-C reaches the main process too, which reports it as such
        os._exit(1)
    except BaseException as e:  # noqa: BLE001 -- every failure must reach the main process
        plan.stop.value = 1
        plan.errors.put((getattr(e, "errno", None), f"{type(e).__name__}: {e}"))
        os._exit(1)  # SIGCHLD tells the main process to read the report


class _WorkerFailed(Exception):
    pass


@contextmanager
def _stop_on_worker_report(plan: _Plan):
    """While FFCV's main loop runs, turn a worker's report into :class:`_WorkerFailed` in this thread
    (the signal also interrupts FFCV's blocking waits). Only the main thread can take signals; elsewhere
    the write runs unguarded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = [True]

    def on_child_exit(signum, frame):
        if armed[0] and not plan.errors.empty():
            armed[0] = False
            raise _WorkerFailed()

    previous = signal.signal(signal.SIGCHLD, on_child_exit)
    try:
        yield
    finally:
        armed[0] = False
        signal.signal(signal.SIGCHLD, previous)


def _release_shared_memory(writer) -> None:
    """FFCV unlinks its metadata segment only on success; without this a failed run ends with
    ``resource_tracker: ... leaked shared_memory objects``."""
    from multiprocessing import shared_memory

    sm = getattr(writer, "metadata_sm", None)
    if isinstance(sm, shared_memory.SharedMemory):
        try:
            sm.close()
        except BufferError:
            pass
        try:
            sm.unlink()
        except FileNotFoundError:  # FFCV got there first
            pass


@contextmanager
def ffcv_progress(desc: str, enabled: bool = True):
    """FFCV's ``DatasetWriter`` always draws a tqdm bar, which off a terminal (a log file, CI) is one
    endless line of carriage-return frames. Inside this block it draws :class:`shards.progress.Progress`
    instead: a bar on a terminal, a plain line every 30 s elsewhere, nothing with ``enabled=False``
    (``--no-progress``)."""
    import ffcv.writer

    bar = ffcv.writer.tqdm
    ffcv.writer.tqdm = lambda *a, **k: Progress(k.get("total", a[0] if a else 0), desc=desc, enabled=enabled)
    try:
        yield
    finally:
        ffcv.writer.tqdm = bar


def write_beton(path: str, source: Source, indices: Sequence[int], write_mode: str = "raw",
                max_resolution: Optional[int] = None, jpeg_quality: int = 90,
                compress_probability: float = 0.5, workers: int = 1, progress: bool = True,
                seed: Sequence[int] = (0,)) -> None:
    """Write ``source[indices]`` to ``path`` (via ``path.tmp``); :class:`ShardError` on any failure.

    ``seed`` (a few integers) fixes 'proportion' mode's choice of the images it compresses (see
    :meth:`_Plan.get`), so every sample is stored the same way in every run. The file's bytes are the
    same in every run with ``workers=1``; with more, FFCV's writer processes claim the file's pages in
    the order they fill them, a race, so the layout (and the beton's sha256) can differ between runs
    while each sample's stored bytes do not."""
    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    except ImportError as e:
        raise ShardError(f"FFCV output needs the ffcv package ({e}); install with `make setup` or drop ffcv from --formats") from None
    if write_mode not in WRITE_MODES:
        raise ShardError(f"unknown FFCV write mode {write_mode!r}; choose from {', '.join(WRITE_MODES)}")
    if not len(indices):
        raise ShardError(f"{path}: no samples to write")
    tmp = path + ".tmp"
    writer = DatasetWriter(
        tmp,
        {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                   jpeg_quality=jpeg_quality, compress_probability=compress_probability),
            "label": IntField(),
        },
        num_workers=max(1, workers),
    )
    plan = _Plan(_Indexed(source, indices), max(1, workers), CHUNK, seed)
    ok = False
    try:
        with ffcv_progress(f"{os.path.basename(path).rsplit('.', 1)[0]} ffcv", progress), _stop_on_worker_report(plan):
            # FFCV's own prepare / start workers / wait / finalize, with our job and no work queue items
            writer._write_common(len(indices), [], _guarded_job, (plan,))
        ok = True
    except _WorkerFailed:
        pass
    finally:
        if not ok:  # a worker failed, FFCV's main side raised (e.g. ENOSPC in finalize), or an interrupt
            plan.kill_workers()
            _release_shared_memory(writer)
            if os.path.exists(tmp):
                os.remove(tmp)
    if not ok:
        code, message = plan.errors.get()
        if code == errno.ENOSPC:
            raise ShardError(f"disk full while writing {tmp}; free space and rerun the same command to resume")
        raise ShardError(f"FFCV writer failed on {tmp}: {message}")
    os.replace(tmp, path)
