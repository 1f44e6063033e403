"""``rmix shards``: one dataset into webdataset shards (+ DALI index) and FFCV betons, resumably.

The job is a deterministic plan: for each split, the samples in an order shuffled by ``seed``
(shards are read sequentially, so the order is fixed at write time). Workers encode samples in
parallel; the main process writes them in plan order. After each completed shard a journal
(``.progress.json``) records it, with the plan position it ends at and the rejects before it. A killed
run, rerun with the same arguments, resumes after the last journalled shard and produces the same
files as an uninterrupted run; a finished run is a no-op. The manifest is written last.

Every parameter is checked up front (:meth:`ShardParams.validate`), and one job at a time writes into
an output directory: the job holds an exclusive lock on ``OUT/<dataset>/.lock``, and a second one
stops at once with one line naming the first one's pid.
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing as mp
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .errors import ShardError
from .ffcv_writer import write_beton
from .manifest import FORMAT_VERSION, manifest_path, sha256_file, write_json_atomic
from .progress import Progress
from .sources import ImageFolderSource, Reject, Source, open_source
from .wds_writer import ShardInfo, WdsShardWriter

DATASETS = ("cifar10", "cifar100", "imagenet", "digits")
FORMATS = ("wds", "ffcv")
JOURNAL = ".progress.json"
LOCK = ".lock"
REJECTS = "rejects.tsv"


@dataclass
class ShardParams:
    """Everything that determines the bytes written; a resume must match it exactly."""

    dataset: str
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    samples_per_shard: Optional[int] = None
    shard_bytes: Optional[int] = None
    max_side: Optional[int] = None
    quality: int = 90
    seed: int = 0
    ffcv_write_mode: Optional[str] = None
    ffcv_max_resolution: Optional[int] = None
    ffcv_compress_probability: float = 0.5

    def validate(self) -> "ShardParams":
        """Check every field; raise :class:`ShardError` naming the first bad one (as its CLI flag)."""
        from .ffcv_writer import WRITE_MODES
        from .sources import SPLITS

        def fail(msg):
            raise ShardError(msg)

        if self.dataset not in DATASETS:
            fail(f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats or len(set(self.formats)) != len(self.formats):
            fail(f"--formats {','.join(map(str, self.formats)) or '(none)'}: list each of {', '.join(FORMATS)} at most once")
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits or len(set(self.splits)) != len(self.splits):
            fail(f"--split {','.join(map(str, self.splits)) or '(none)'}: list each of {', '.join(SPLITS)} at most once")
        for flag, value, low in (("--samples-per-shard", self.samples_per_shard, 1),
                                 ("--shard-bytes", self.shard_bytes, 1),
                                 ("--max-side", self.max_side, 1),
                                 ("--ffcv-max-resolution", self.ffcv_max_resolution, 1)):
            if value is not None and (not _is_int(value) or value < low):
                fail(f"{flag} must be an integer >= {low}, got {value!r}")
        if not _is_int(self.quality) or not 1 <= self.quality <= 100:
            fail(f"--quality is a JPEG quality 1..100, got {self.quality!r}")
        if not _is_int(self.seed) or self.seed < 0:
            fail(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.ffcv_write_mode is not None and self.ffcv_write_mode not in WRITE_MODES:
            fail(f"unknown --ffcv-write-mode {self.ffcv_write_mode!r}; choose from {', '.join(WRITE_MODES)}")
        p = self.ffcv_compress_probability
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            fail(f"--ffcv-compress-probability is a probability in [0, 1], got {p!r}")
        if self.max_side is not None and self.dataset != "imagenet":
            fail(f"--max-side resizes ImageNet images; {self.dataset} images are 32x32 and are never resized")
        return self

    def resolved(self) -> "ShardParams":
        p = ShardParams(**asdict(self))
        if p.samples_per_shard is None and p.shard_bytes is None:
            p.shard_bytes = 1 << 30  # ~1 GB shards: the size real ImageNet wants
        if p.ffcv_write_mode is None:
            p.ffcv_write_mode = "proportion" if p.dataset == "imagenet" else "raw"
        if p.dataset == "imagenet" and p.ffcv_max_resolution is None:
            p.ffcv_max_resolution = p.max_side or 512
        return p


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# -- parallel encoding ---------------------------------------------------------------------------
# Workers are forked after the source is built, so they share its memory (CIFAR's arrays, the file
# list) instead of receiving a pickled copy with every task.
_WORKER_SOURCE: Optional[Source] = None


def _worker_init() -> None:
    # the default SIGTERM action, whatever handler the forking process had installed (a trainer's, say):
    # Pool.__exit__ terminates its workers with SIGTERM, and a worker that survives it hangs the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _encode_chunk(indices: list[int]) -> list:
    return [_WORKER_SOURCE.encode(i) for i in indices]


def encode_in_order(source: Source, order: np.ndarray, start: int, workers: int, chunk: int = 64) -> Iterator:
    """Yield ``(position, Encoded | Reject)`` for ``order[start:]``, in order."""
    global _WORKER_SOURCE
    todo = order[start:]
    chunks = [todo[i : i + chunk].tolist() for i in range(0, len(todo), chunk)]
    pos = start
    if workers <= 1:
        for c in chunks:
            for i in c:
                yield pos, source.encode(i)
                pos += 1
        return
    _WORKER_SOURCE = source
    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        for results in pool.imap(_encode_chunk, chunks):
            for r in results:
                yield pos, r
                pos += 1


# -- the job ---------------------------------------------------------------------------------------
class Journal:
    """``.progress.json``: what is complete, written atomically after each step."""

    def __init__(self, root: Path, params: dict):
        self.path = root / JOURNAL
        self.state = {"params": params, "splits": {}}
        if self.path.is_file():
            with open(self.path) as f:
                old = json.load(f)
            if old.get("params") != params:
                raise ShardError(
                    f"{root} holds an unfinished job with other parameters; rerun with the same "
                    f"arguments to resume, or remove {self.path} (and the shards) to start over"
                )
            self.state = old

    def split(self, split: str) -> dict:
        return self.state["splits"].setdefault(
            split, {"position": 0, "shards": [], "rejects": [], "wds_done": False, "ffcv": None}
        )

    def save(self) -> None:
        write_json_atomic(self.path, self.state)


def _out_dir(out: Path, dataset: str) -> Path:
    root = Path(out) / dataset
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ShardError(f"cannot create output directory {root}: {e.strerror}") from None
    if not os.access(root, os.W_OK):
        raise ShardError(f"output directory {root} is not writable")
    return root


def _check_inputs(params: ShardParams, src: Optional[Path], workers: int) -> None:
    params.validate()
    if not _is_int(workers) or workers < 0:
        raise ShardError(f"--workers must be an integer >= 0 (0 = all cores), got {workers!r}")
    if params.dataset == "digits" and src is not None:
        raise ShardError("digits is built in (scikit-learn's digits, written under OUT/digits/source); "
                         "it takes no --src")


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``root/.lock`` while a job writes there; a second job fails at once.

    A POSIX record lock (``lockf``), not ``flock``: it belongs to this process alone, so the encode
    workers forked while it is held do not inherit it, and a job killed with -9 releases it even if an
    orphaned worker lingers."""
    path = root / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ShardError(f"{root} is being written by another `rmix shards` (pid {holder}); wait for it "
                             f"to finish (then rerun: a finished job is a no-op) or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: removing it would race with a waiting job)


def build(params: ShardParams, src: Optional[Path], out: Path, workers: int = 0, progress: bool = True) -> dict:
    """Run (or resume, or skip) the sharding job; return the manifest.

    Raises :class:`ShardError` (one line for the user) on bad parameters or inputs, a disk full, or
    another job writing into the same ``out/<dataset>``.
    """
    _check_inputs(params, src, workers)
    params = params.resolved()
    workers = workers or os.cpu_count() or 1
    root = _out_dir(out, params.dataset)
    with _exclusive(root):
        return _build_locked(params, src, root, workers, progress)


def _build_locked(params: ShardParams, src, root: Path, workers: int, progress: bool) -> dict:
    pdict = asdict(params)
    mpath = manifest_path(root)
    if mpath.is_file():
        with open(mpath) as f:
            done = json.load(f)
        if done.get("params") == pdict:
            print(f"rmix shards: {root} is already complete (manifest.json matches these arguments); nothing to do")
            return done
        raise ShardError(f"{root} already holds shards made with other arguments; choose another --out or remove it")

    t0 = time.time()
    journal = Journal(root, pdict)
    try:
        manifest = _run(params, src, root, journal, workers, progress)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ShardError(f"disk full while writing under {root}; free space and rerun the same command to resume") from None
        raise
    manifest["seconds"] = round(time.time() - t0, 2)
    write_json_atomic(mpath, manifest)
    _write_rejects(root, journal)
    os.remove(journal.path)
    return manifest


def _run(params: ShardParams, src, root: Path, journal: Journal, workers: int, progress: bool) -> dict:
    from . import __version__

    splits_out, classes = {}, None
    for split in params.splits:
        # every source of a dataset carries the same class list (CIFAR's meta file, ImageNet's train/)
        source = open_source(params.dataset, src, split, root, params.max_side, params.quality)
        classes = source.classes
        state = journal.split(split)
        order = np.random.default_rng([params.seed, params.splits.index(split)]).permutation(len(source))
        entry: dict = {"num_source": len(source)}

        if "wds" in params.formats or isinstance(source, ImageFolderSource):
            # the wds pass also finds the rejects, which the FFCV beton must leave out
            _wds_pass(params, source, order, split, root, state, journal, workers, progress)
        if "wds" in params.formats:
            entry["wds"] = {"shards": state["shards"], "ext": source.ext, "fields": [source.ext, "cls"]}
        rejected = {r[0] for r in state["rejects"]}
        kept = [int(i) for i in order if int(i) not in rejected]
        entry["num_samples"] = len(kept)
        entry["rejected"] = len(rejected)
        if not kept:
            if not state["rejects"]:
                raise ShardError(f"[{split}] the source has no samples")
            _, path, _, reason = state["rejects"][0]
            raise ShardError(f"[{split}] all {len(order)} images were rejected, e.g. {path}: {reason}")

        if "ffcv" in params.formats:
            if state["ffcv"] is None:
                rel = os.path.join("ffcv", f"{split}.beton")
                os.makedirs(root / "ffcv", exist_ok=True)
                t = time.time()
                print(f"[{split}] writing FFCV {rel} ({len(kept)} samples, {params.ffcv_write_mode})")
                # the beton keeps source order: FFCV's loader shuffles at read time
                write_beton(str(root / rel), source, sorted(kept), params.ffcv_write_mode,
                            params.ffcv_max_resolution, params.quality, params.ffcv_compress_probability, workers,
                            progress)
                state["ffcv"] = {"path": rel, "num_samples": len(kept), "bytes": os.path.getsize(root / rel),
                                 "sha256": sha256_file(root / rel), "write_mode": params.ffcv_write_mode,
                                 "max_resolution": params.ffcv_max_resolution, "seconds": round(time.time() - t, 2)}
                journal.save()
            entry["ffcv"] = state["ffcv"]
        splits_out[split] = entry
        _summary(split, entry)

    return {
        "format_version": FORMAT_VERSION,
        "tool": f"rmix-loaders {__version__}",
        "dataset": params.dataset,
        "num_classes": len(classes),
        "classes": classes,
        "splits": splits_out,
        "params": asdict(params),
        "rejects_file": REJECTS,
    }


def _wds_pass(params, source, order, split, root, state, journal, workers, progress) -> None:
    if state["wds_done"]:
        return
    write = "wds" in params.formats
    start = state["position"]
    for s in state["shards"]:  # a journalled shard must still be there, whole
        if not (root / s["tar"]).is_file() or os.path.getsize(root / s["tar"]) != s["bytes"]:
            raise ShardError(f"{root / s['tar']} is missing or changed since it was written; remove {root} and start over")
    for stale in (root / "wds").glob(f"{split}-*.tmp") if (root / "wds").is_dir() else []:
        stale.unlink()  # a shard the killed run did not finish
    if start:
        print(f"[{split}] resuming after {len(state['shards'])} complete shards ({start}/{len(order)} samples)")
    rejects: list = list(state["rejects"])

    def on_shard(info: ShardInfo) -> None:
        state["shards"].append(info.to_dict())
        state["position"] = info.end
        state["rejects"] = [r for r in rejects if r[2] < info.end]
        journal.save()

    bar = Progress(len(order), start, desc=f"{split} wds" if write else f"{split} check", enabled=progress)
    writer = WdsShardWriter(str(root), "wds", split, params.samples_per_shard, params.shard_bytes,
                            start_shard=len(state["shards"]), on_shard=on_shard) if write else None
    try:
        for pos, item in encode_in_order(source, order, start, workers):
            if isinstance(item, Reject):
                rejects.append([int(order[pos]), item.path, pos, item.reason])
            elif writer is not None:
                writer.write(item, pos)
            bar.update(1)
            if len(rejects):
                bar.note(f"{len(rejects)} rejected")
        if writer is not None:
            writer.close(end=len(order))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    state["rejects"] = rejects
    state["position"] = len(order)
    state["wds_done"] = True
    journal.save()


def _summary(split: str, entry: dict) -> None:
    parts = [f"[{split}] {entry['num_samples']} samples written, {entry['rejected']} rejected"]
    if "wds" in entry:
        shards = entry["wds"]["shards"]
        parts.append(f"wds: {len(shards)} shards, {sum(s['bytes'] for s in shards) / 1e6:.1f} MB")
    if "ffcv" in entry:
        parts.append(f"ffcv: {entry['ffcv']['bytes'] / 1e6:.1f} MB")
    print("; ".join(parts))


def _write_rejects(root: Path, journal: Journal) -> None:
    with open(root / REJECTS, "w") as f:
        f.write("split\tpath\treason\n")
        for split, st in journal.state["splits"].items():
            for _, path, _, reason in st["rejects"]:
                f.write(f"{split}\t{path}\t{reason}\n")
