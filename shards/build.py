"""``rmix shards``: one dataset into webdataset shards (+ DALI index) and FFCV betons, resumably.

The job is a deterministic plan: for each split, the samples in an order shuffled by ``seed``
(shards are read sequentially, so the order is fixed at write time). Workers encode samples in
parallel; the main process writes them in plan order. After each completed shard a journal
(``.progress.json``) records it, with the plan position it ends at and the rejects before it. A killed
run, rerun with the same arguments, resumes after the last journalled shard and produces the same
files as an uninterrupted run; a finished run is a no-op. The manifest is written last.

With ``--samples-per-shard`` (and no ``--shard-bytes``) shard ``i`` holds the samples at plan positions
``[i * S, (i + 1) * S)`` that were not rejected, so where every shard starts is known before anything
is encoded. That is what splits a job across machines: ``--part K/N`` writes the contiguous run of
shards ``[K * M // N, (K + 1) * M // N)`` of the ``M`` shards of each split, into the same layout
(``wds/<split>-NNNNNN.tar`` named by the global shard number), with its own lock and journal (each
part resumes on its own) and, when done, ``parts/part-K-of-N.json``. :func:`merge` checks that all N
parts are there and agree (arguments, classes, plan, shard files) and writes the one ``manifest.json``
(and ``rejects.tsv``) a single run would have written: the same shards, the same manifest but for its
``seconds``. Only the webdataset pass is split; one FFCV beton per split is one process's job.

Memory does not grow with the dataset beyond a few arrays: the source's file index is packed
(:class:`shards.sources.FileIndex`), the plan is one int64 array, and encoded samples in flight are
bounded (:func:`encode_in_order`), however far writing falls behind encoding.

Every parameter is checked up front (:meth:`ShardParams.validate`), and one job at a time writes into
an output directory: the job holds an exclusive lock on ``OUT/<dataset>/.lock`` (a part on
``.lock.part-K-of-N``), and a second one stops at once with one line naming the first one's pid.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from .errors import ShardError
from .ffcv_writer import write_beton
from .manifest import FORMAT_VERSION, manifest_path, sha256_file, write_json_atomic
from .progress import Progress
from .sources import SPLITS, ImageFolderSource, Reject, Source, open_source
from .wds_writer import ShardInfo, WdsShardWriter

DATASETS = ("cifar10", "cifar100", "imagenet", "digits")
FORMATS = ("wds", "ffcv")
JOURNAL = ".progress.json"
LOCK = ".lock"
REJECTS = "rejects.tsv"
PARTS = "parts"


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


def parse_part(part: Union[str, tuple, None]) -> Optional[tuple[int, int]]:
    """``"K/N"`` (or ``(K, N)``) -> ``(K, N)``, checked: parts are numbered ``0..N-1``."""
    if part is None:
        return None
    if isinstance(part, str):
        m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", part)
        if not m:
            raise ShardError(f"--part takes K/N (this machine's part K of N, numbered 0..N-1, e.g. 0/4), got {part!r}")
        k, n = int(m.group(1)), int(m.group(2))
    else:
        try:
            k, n = part
        except (TypeError, ValueError):
            raise ShardError(f"--part takes K/N (e.g. 0/4), got {part!r}") from None
        if not (_is_int(k) and _is_int(n)):
            raise ShardError(f"--part takes integers K/N, got {part!r}")
    if n < 1:
        raise ShardError(f"--part {k}/{n}: N is the number of parts, at least 1")
    if not 0 <= k < n:
        raise ShardError(f"--part {k}/{n}: K is this machine's part, 0..{n - 1} (parts are numbered from 0)")
    return int(k), int(n)


def _check_part(params: ShardParams, part: tuple[int, int]) -> None:
    if "ffcv" in params.formats:
        raise ShardError("--part splits the webdataset pass only (a split's FFCV beton is one file, written by one "
                         "process): use --formats wds with --part, and write the beton with one job without --part "
                         "into another --out")
    if params.samples_per_shard is None or params.shard_bytes is not None:
        raise ShardError("--part needs --samples-per-shard (and no --shard-bytes): a shard cut by bytes starts where "
                         "the bytes of every earlier sample end, so no part could know where its shards begin")


def _part_name(part: tuple[int, int]) -> str:
    return f"part-{part[0]}-of-{part[1]}"


def part_span(num_samples: int, samples_per_shard: int, part: Optional[tuple[int, int]]) -> tuple[int, int, int, int]:
    """``(first shard, end shard, first position, end position)`` of ``part`` in a split's plan: the
    contiguous run of shards ``[K * M // N, (K + 1) * M // N)`` of its ``M`` shards (the whole plan
    without a part)."""
    if part is None:
        return 0, 0, 0, num_samples
    k, n = part
    shards = -(-num_samples // samples_per_shard)
    a, b = shards * k // n, shards * (k + 1) // n
    return a, b, min(a * samples_per_shard, num_samples), min(b * samples_per_shard, num_samples)


def plan_order(params: ShardParams, split: str, num_samples: int) -> np.ndarray:
    """The write order of a split: source indices shuffled by ``seed`` (and the split)."""
    return np.random.default_rng([params.seed, params.splits.index(split)]).permutation(num_samples)


# -- parallel encoding ---------------------------------------------------------------------------
# Workers are forked after the source and the plan are built, so they share their memory (CIFAR's
# arrays, the file index, the plan) instead of receiving a pickled copy with every task; a task is a
# pair of plan positions.
_WORKER_SOURCE: Optional[Source] = None
_WORKER_ORDER: Optional[np.ndarray] = None


def _worker_init() -> None:
    # the default SIGTERM action, whatever handler the forking process had installed (a trainer's, say):
    # Pool.__exit__ terminates its workers with SIGTERM, and a worker that survives it hangs the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _encode_span(span: tuple[int, int]) -> list:
    a, b = span
    return [_WORKER_SOURCE.encode(int(i)) for i in _WORKER_ORDER[a:b]]


def encode_in_order(source: Source, order: np.ndarray, start: int, workers: int, chunk: int = 64,
                    stop: Optional[int] = None, ahead: int = 4) -> Iterator:
    """Yield ``(position, Encoded | Reject)`` for ``order[start:stop]``, in order.

    At most ``ahead`` chunks per worker are in flight: when writing is slower than encoding, the
    encoded samples wait in a window of ``workers * ahead * chunk`` samples instead of piling up
    (``Pool.imap`` keeps every finished result until it is consumed)."""
    global _WORKER_SOURCE, _WORKER_ORDER
    stop = len(order) if stop is None else stop
    spans = ((a, min(a + chunk, stop)) for a in range(start, stop, chunk))
    if workers <= 1:
        for a, b in spans:
            for pos in range(a, b):
                yield pos, source.encode(int(order[pos]))
        return
    _WORKER_SOURCE, _WORKER_ORDER = source, order
    ctx = mp.get_context("fork")
    try:
        with ctx.Pool(workers, initializer=_worker_init) as pool:
            pending = deque((span[0], pool.apply_async(_encode_span, (span,)))
                            for span in itertools.islice(spans, workers * ahead))
            while pending:
                first, result = pending.popleft()
                items = result.get()
                span = next(spans, None)
                if span is not None:
                    pending.append((span[0], pool.apply_async(_encode_span, (span,))))
                for k, item in enumerate(items):
                    yield first + k, item
    finally:
        _WORKER_SOURCE = _WORKER_ORDER = None


# -- the job ---------------------------------------------------------------------------------------
class Journal:
    """``.progress.json`` (a part's ``.progress.part-K-of-N.json``): what is complete, written
    atomically after each step."""

    def __init__(self, root: Path, params: dict, name: str = JOURNAL):
        self.path = root / name
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

    def split(self, split: str, start: int = 0) -> dict:
        return self.state["splits"].setdefault(
            split, {"position": start, "shards": [], "rejects": [], "wds_done": False, "ffcv": None}
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
def _exclusive(root: Path, name: str = LOCK) -> Iterator[None]:
    """Hold an exclusive lock on ``root/<name>`` while a job writes there; a second job fails at once.

    A POSIX record lock (``lockf``), not ``flock``: it belongs to this process alone, so the encode
    workers forked while it is held do not inherit it, and a job killed with -9 releases it even if an
    orphaned worker lingers."""
    path = root / name
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


def build(params: ShardParams, src: Optional[Path], out: Path, workers: int = 0, progress: bool = True,
          part: Union[str, tuple, None] = None) -> dict:
    """Run (or resume, or skip) the sharding job; return the manifest.

    With ``part`` (``"K/N"``), write part K of N (see the module docstring) and return its record,
    ``parts/part-K-of-N.json``; :func:`merge` makes the manifest once all N are done.

    Raises :class:`ShardError` (one line for the user) on bad parameters or inputs, a disk full, or
    another job writing into the same ``out/<dataset>``.
    """
    _check_inputs(params, src, workers)
    part = parse_part(part)
    if part is not None:
        _check_part(params, part)
    params = params.resolved()
    workers = workers or os.cpu_count() or 1
    root = _out_dir(out, params.dataset)
    with _exclusive(root, LOCK if part is None else f"{LOCK}.{_part_name(part)}"):
        return _build_locked(params, src, root, workers, progress, part)


def _part_files(root: Path) -> dict[tuple[int, int], Path]:
    """``{(K, N): path}`` of the completed parts' records under ``root/parts``."""
    found = {}
    for path in (root / PARTS).glob("part-*-of-*.json") if (root / PARTS).is_dir() else []:
        m = re.fullmatch(r"part-(\d+)-of-(\d+)\.json", path.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = path
    return dict(sorted(found.items()))


def _load_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"cannot read {path}: {e}") from None


def _build_locked(params: ShardParams, src, root: Path, workers: int, progress: bool,
                  part: Optional[tuple[int, int]]) -> dict:
    pdict = asdict(params)
    mpath = manifest_path(root)
    if mpath.is_file():
        with open(mpath) as f:
            done = json.load(f)
        if done.get("params") == pdict:
            print(f"rmix shards: {root} is already complete (manifest.json matches these arguments); nothing to do")
            return done
        raise ShardError(f"{root} already holds shards made with other arguments; choose another --out or remove it")

    parts = _part_files(root)
    if part is None:
        running = sorted(p.name for p in root.glob(f"{JOURNAL[:-5]}.part-*.json"))
        if parts or running:
            names = [f"{PARTS}/{p.name}" for p in parts.values()] + running
            shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            raise ShardError(f"{root} holds a job split in parts ({shown}); finish every part and run "
                             f"`rmix shards merge {root}`, or remove them to run it whole here")
    else:
        if (root / JOURNAL).is_file():
            raise ShardError(f"{root} holds an unfinished job run without --part ({root / JOURNAL}); rerun it without "
                             f"--part to resume, or remove it (and the shards) to split the job in parts")
        for (k, n), path in parts.items():
            other = _load_json(path)
            if other.get("params") != pdict:
                raise ShardError(f"{path} was written with other arguments; every part must get the same arguments "
                                 f"(only --part differs): {_param_diff(other.get('params') or {}, pdict)}")
            if n != part[1]:
                raise ShardError(f"{root} holds parts of a job split {n} ways ({path.name}), not {part[1]}; "
                                 f"use --part K/{n}, or remove {root / PARTS} to split it {part[1]} ways")
        if part in parts:
            print(f"rmix shards: part {part[0]}/{part[1]} of {root} is already complete ({parts[part]}); nothing to do")
            return _load_json(parts[part])

    t0 = time.time()
    journal = Journal(root, pdict, JOURNAL if part is None else f"{JOURNAL[:-5]}.{_part_name(part)}.json")
    try:
        manifest = _run(params, src, root, journal, workers, progress, part)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ShardError(f"disk full while writing under {root}; free space and rerun the same command to resume") from None
        raise
    manifest["seconds"] = round(time.time() - t0, 2)
    if part is None:
        write_json_atomic(mpath, manifest)
        _write_rejects(root, {split: st["rejects"] for split, st in journal.state["splits"].items()})
    else:
        os.makedirs(root / PARTS, exist_ok=True)
        write_json_atomic(root / PARTS / f"{_part_name(part)}.json", manifest)
    os.remove(journal.path)
    return manifest


def _param_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys) or "(none)"


def _split_entry(split: str, num_source: int, ext: str, formats: list[str], shards: list, rejects: list) -> dict:
    """A split's manifest entry (without its FFCV beton); one line if nothing is left to write."""
    entry: dict = {"num_source": num_source}
    if "wds" in formats:
        entry["wds"] = {"shards": shards, "ext": ext, "fields": [ext, "cls"]}
    rejected = len({r[0] for r in rejects})
    entry["num_samples"] = num_source - rejected
    entry["rejected"] = rejected
    if not entry["num_samples"]:
        if not rejects:
            raise ShardError(f"[{split}] the source has no samples")
        _, path, _, reason = rejects[0]
        raise ShardError(f"[{split}] all {num_source} images were rejected, e.g. {path}: {reason}")
    return entry


def _manifest(params: ShardParams, classes: list[str], splits: dict, tool: str) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "tool": tool,
        "dataset": params.dataset,
        "num_classes": len(classes),
        "classes": classes,
        "splits": splits,
        "params": asdict(params),
        "rejects_file": REJECTS,
    }


def _tool() -> str:
    from . import __version__

    return f"rmix-loaders {__version__}"


def _run(params: ShardParams, src, root: Path, journal: Journal, workers: int, progress: bool,
         part: Optional[tuple[int, int]] = None) -> dict:
    splits_out, classes = {}, None
    # every split is listed and checked (class folders against train's, none empty) before anything is
    # written: a bad val folder must not wait for the whole train split to be encoded first
    sources = {split: open_source(params.dataset, src, split, root, params.max_side, params.quality)
               for split in params.splits}
    for split in params.splits:
        # every source of a dataset carries the same class list (CIFAR's meta file, ImageNet's train/)
        source = sources.pop(split)
        classes = source.classes
        n = len(source)
        order = plan_order(params, split, n)
        span = part_span(n, params.samples_per_shard, part)
        state = journal.split(split, start=span[2])

        if part is not None and not n:
            raise ShardError(f"[{split}] the source has no samples")
        if "wds" in params.formats or isinstance(source, ImageFolderSource):
            # the wds pass also finds the rejects, which the FFCV beton must leave out
            _wds_pass(params, source, order, split, root, state, journal, workers, progress, span, part)
        if part is not None:
            splits_out[split] = {"num_source": n, "ext": source.ext, "shards_span": list(span[:2]),
                                 "positions": list(span[2:]), "shards": state["shards"], "rejects": state["rejects"]}
            print(f"[{split}] part {part[0]}/{part[1]}: positions {span[2]}..{span[3]} of {n}, "
                  f"{len(state['shards'])} shards, {len(state['rejects'])} rejected")
            continue
        entry = _split_entry(split, n, source.ext, params.formats, state["shards"], state["rejects"])

        if "ffcv" in params.formats:
            if state["ffcv"] is None:
                rejected = np.fromiter((r[0] for r in state["rejects"]), np.int64, len(state["rejects"]))
                keep = np.ones(n, bool)
                keep[rejected] = False
                kept = np.flatnonzero(keep)  # the beton keeps source order: FFCV's loader shuffles at read time
                rel = os.path.join("ffcv", f"{split}.beton")
                os.makedirs(root / "ffcv", exist_ok=True)
                t = time.time()
                print(f"[{split}] writing FFCV {rel} ({len(kept)} samples, {params.ffcv_write_mode})")
                # 'proportion' mode's draws seeded from --seed and the split: the same images compressed
                # in every run (the bytes are the same with --workers 1: shards.ffcv_writer.write_beton)
                write_beton(str(root / rel), source, kept, params.ffcv_write_mode,
                            params.ffcv_max_resolution, params.quality, params.ffcv_compress_probability, workers,
                            progress, seed=(params.seed, SPLITS.index(split)))
                state["ffcv"] = {"path": rel, "num_samples": len(kept), "bytes": os.path.getsize(root / rel),
                                 "sha256": sha256_file(root / rel), "write_mode": params.ffcv_write_mode,
                                 "max_resolution": params.ffcv_max_resolution, "seconds": round(time.time() - t, 2)}
                journal.save()
            entry["ffcv"] = state["ffcv"]
        splits_out[split] = entry
        _summary(split, entry)

    if part is not None:
        return {"format_version": FORMAT_VERSION, "tool": _tool(), "dataset": params.dataset, "classes": classes,
                "params": asdict(params), "part": list(part), "splits": splits_out}
    return _manifest(params, classes, splits_out, _tool())


def _wds_pass(params, source, order, split, root, state, journal, workers, progress, span, part) -> None:
    if state["wds_done"]:
        return
    write = "wds" in params.formats
    first_shard, end_shard, lo, hi = span
    by_position = params.samples_per_shard is not None and params.shard_bytes is None
    start = state["position"]
    for s in state["shards"]:  # a journalled shard must still be there, whole
        if not (root / s["tar"]).is_file() or os.path.getsize(root / s["tar"]) != s["bytes"]:
            raise ShardError(f"{root / s['tar']} is missing or changed since it was written; remove {root} and start over")
        number = (s["end"] - 1) // (params.samples_per_shard or 1)
        if by_position and s["tar"] != os.path.join("wds", f"{split}-{number:06d}.tar"):
            raise ShardError(f"{journal.path} was written by an older `rmix shards` (shards cut by written count); "
                             f"remove {root} and start over")
    if (root / "wds").is_dir():
        for stale in (root / "wds").glob(f"{split}-*.tmp"):  # a shard (or index) the killed run did not finish
            number = stale.name[len(split) + 1 :].split(".")[0]
            if part is None or number.isdigit() and first_shard <= int(number) < end_shard:  # not another part's
                stale.unlink()
    if start > lo:
        print(f"[{split}] resuming after {len(state['shards'])} complete shards ({start - lo}/{hi - lo} samples)")
    rejects: list = list(state["rejects"])

    def on_shard(info: ShardInfo) -> None:
        state["shards"].append(info.to_dict())
        state["position"] = info.end
        state["rejects"] = [r for r in rejects if r[2] < info.end]
        journal.save()

    bar = Progress(hi - lo, start - lo, desc=f"{split} wds" if write else f"{split} check", enabled=progress)
    writer = WdsShardWriter(str(root), "wds", split, params.samples_per_shard, params.shard_bytes,
                            start_shard=len(state["shards"]), on_shard=on_shard,
                            by_position=by_position) if write else None
    try:
        for pos, item in encode_in_order(source, order, start, workers, stop=hi):
            if isinstance(item, Reject):
                rejects.append([int(order[pos]), item.path, pos, item.reason])
            elif writer is not None:
                writer.write(item, pos)
            bar.update(1)
            if len(rejects):
                bar.note(f"{len(rejects)} rejected")
        if writer is not None:
            writer.close(end=hi)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    state["rejects"] = rejects
    state["position"] = hi
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


def _write_rejects(root: Path, rejects: dict) -> None:
    """``rejects.tsv``: ``{split: [[index, path, position, reason], ...]}`` in split, then plan order."""
    with open(root / REJECTS, "w") as f:
        f.write("split\tpath\treason\n")
        for split, rows in rejects.items():
            for _, path, _, reason in rows:
                f.write(f"{split}\t{path}\t{reason}\n")


# -- merging parts ---------------------------------------------------------------------------------
def merge(root: Union[str, Path]) -> dict:
    """Check the N parts under ``root`` (``OUT/<dataset>``) and write the manifest a single run with
    the same arguments would have written; return it.

    Every part must be complete (``parts/part-K-of-N.json`` for each K), made with the same arguments,
    the same tool version and class index, over the same source (sample counts), and together cover
    each split's plan with no gap or overlap; every shard they list must be here with its size and
    its ``.idx`` with its sha256 (``rmix verify`` reads every byte of the tars).
    The merged manifest's ``seconds`` is the longest part's. On success the part records and part
    locks are removed, leaving the layout of a single run. A merged job is a no-op to merge again.
    """
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"no dataset folder {root}: give OUT/<dataset>, where the parts wrote")
    with _exclusive(root):
        return _merge_locked(root)


def _merge_locked(root: Path) -> dict:
    parts = _part_files(root)
    mpath = manifest_path(root)
    if not parts:
        if mpath.is_file():
            print(f"rmix shards merge: {root} is already complete (manifest.json); nothing to do")
            return _load_json(mpath)
        raise ShardError(f"no parts under {root / PARTS}: run `rmix shards ... --part K/N` for every K first")
    counts = sorted({n for _, n in parts})
    if len(counts) > 1:
        raise ShardError(f"{root / PARTS} mixes jobs split {' and '.join(map(str, counts))} ways; "
                         f"remove the records of the one you do not want")
    n = counts[0]
    missing = [k for k in range(n) if (k, n) not in parts]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ShardError(f"part(s) {shown} of {n} not complete (no {root / PARTS}/part-{missing[0]}-of-{n}.json): "
                         f"run or resume them with the same arguments and --part K/{n}")
    records = [_load_json(parts[(k, n)]) for k in range(n)]
    first = records[0]
    for k, rec in enumerate(records):
        name = parts[(k, n)].name
        for what in ("params", "tool", "dataset", "classes", "format_version"):
            if rec.get(what) != first.get(what):
                detail = (_param_diff(first.get("params") or {}, rec.get("params") or {}) if what == "params"
                          else f"{first.get(what)!r} vs {rec.get(what)!r}"[:200])
                raise ShardError(f"{name} and {parts[(0, n)].name} differ in {what} ({detail}); every part must "
                                 f"run the same `rmix shards` with the same arguments over the same source")
        if rec.get("part") != [k, n] or set(rec.get("splits", {})) != set(first["params"]["splits"]):
            raise ShardError(f"{parts[(k, n)]} is not a record of part {k}/{n} of this job")
    params = ShardParams(**first["params"])
    if mpath.is_file() and _load_json(mpath).get("params") != first["params"]:
        raise ShardError(f"{root} already holds a manifest made with other arguments than its parts")

    splits_out, rejects = {}, {}
    for split in params.splits:
        recs = [r["splits"][split] for r in records]
        num_source = recs[0]["num_source"]
        shards, split_rejects, seen, position = [], [], set(), 0
        for k, r in enumerate(recs):
            if r["num_source"] != num_source or r["ext"] != recs[0]["ext"]:
                raise ShardError(f"[{split}] part {k} saw {r['num_source']} source samples, part 0 saw {num_source}: "
                                 f"the parts read different sources")
            expected = part_span(num_source, params.samples_per_shard, (k, n))
            if list(r["positions"]) != list(expected[2:]) or r["positions"][0] != position:
                raise ShardError(f"[{split}] part {k} covers plan positions {r['positions']}, expected "
                                 f"{list(expected[2:])}")
            position = r["positions"][1]
            for s in r["shards"]:
                if s["tar"] in seen:
                    raise ShardError(f"[{split}] shard {s['tar']} listed twice (part {k})")
                seen.add(s["tar"])
                # the tar's size and its small index's sha256 (the member offsets): `rmix verify` reads every byte
                tar, idx = root / s["tar"], root / s["idx"]
                if not (tar.is_file() and os.path.getsize(tar) == s["bytes"] and idx.is_file()
                        and sha256_file(idx) == s["idx_sha256"]):
                    raise ShardError(f"shard {tar} of part {k}/{n} (or its .idx) is missing or differs from what "
                                     f"the part recorded; copy every part's wds/ folder here before merging")
            shards.extend(r["shards"])
            split_rejects.extend(r["rejects"])
        if position != num_source:
            raise ShardError(f"[{split}] the parts cover plan positions 0..{position} of {num_source}")
        splits_out[split] = _split_entry(split, num_source, recs[0]["ext"], params.formats, shards, split_rejects)
        rejects[split] = split_rejects
        _summary(split, splits_out[split])

    manifest = _manifest(params, first["classes"], splits_out, first["tool"])
    manifest["seconds"] = max(r.get("seconds", 0) for r in records)
    _write_rejects(root, rejects)
    write_json_atomic(mpath, manifest)
    for path in parts.values():
        path.unlink()
    try:
        (root / PARTS).rmdir()
    except OSError:  # something else was put there: leave it
        pass
    for lock in root.glob(f"{LOCK}.part-*-of-*"):
        lock.unlink()
    return manifest
