"""``rmix bench shards-scale``: how ``rmix shards`` scales with the number of files in an ImageFolder tree.

For each file count (default 50k, 100k, 200k: 1000 classes of tiny JPEGs, written once under ``--work``)
it runs ``python -m tools.cli shards --dataset imagenet --split train --formats wds`` as a child
process, from ``--repo`` (default: this checkout; point it at an older checkout to compare), and samples
it every ``--every`` seconds:

* time to the first complete shard (the first ``wds/train-*.tar`` under its final name),
* peak memory of the process tree: the sum of RSS, and the sum of PSS (pages shared between the main
  process and its forked encoders counted once; RSS counts them once per process),
* total seconds, shards per minute, and images per CPU-second of the whole tree (the child's rusage,
  which counts the encode workers it reaped): less sensitive than wall time to a busy machine.

Each size runs ``--repeats`` times into a fresh output, the checkouts interleaved; the median and
min-max are printed.

``--index-only`` measures the listing alone, for trees past what is quick to shard here (e.g.
``--files 1281000``, ImageNet's size, of empty files): the seconds ``ImageFolderSource`` takes to list
the tree, then the bytes its index holds (``tracemalloc``, on a second listing), in a child process
per checkout. The page
cache is warm after the first run (the tree is small), so the numbers are listing and bookkeeping
cost, not disk reads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tools.synthetic import write_tiny_imagefolder


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes of ``proc`` and its live descendants."""
    rss = pss = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            m = p.memory_full_info()
        except psutil.Error:  # exited between listing and reading
            continue
        rss, pss = rss + m.rss, pss + m.pss
    return rss, pss


def run_once(repo: Path, src: Path, out: Path, samples_per_shard: int, workers: int, every: float) -> dict:
    """One ``rmix shards`` child process, sampled until it exits."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tools.cli", "shards", "--dataset", "imagenet", "--src", str(src), "--out", str(out),
           "--split", "train", "--formats", "wds", "--samples-per-shard", str(samples_per_shard),
           "--workers", str(workers), "--no-progress"]
    wds_dir = out / "imagenet" / "wds"
    t0 = time.monotonic()
    log = out.with_suffix(".log")
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the child
        child = subprocess.Popen(cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT)
    proc = psutil.Process(child.pid)
    first = None
    peak_rss = peak_pss = 0
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:  # reaped here, so its rusage counts the encode workers it reaped itself
            break
        rss, pss = _tree_memory(proc)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if first is None and wds_dir.is_dir() and any(e.name.endswith(".tar") for e in os.scandir(wds_dir)):
            first = time.monotonic() - t0
        time.sleep(every)
    total = time.monotonic() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"rmix bench shards-scale: `{' '.join(cmd)}` failed in {repo}:\n{log.read_text()[-2000:]}")
    manifest = json.loads((out / "imagenet" / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["wds"]["shards"]
    return dict(first_shard_s=first if first is not None else total, total_s=total, shards=len(shards),
                cpu_s=usage.ru_utime + usage.ru_stime,
                samples=manifest["splits"]["train"]["num_samples"], peak_rss_mb=peak_rss / 2**20,
                peak_pss_mb=peak_pss / 2**20)


_INDEX_PROBE = """
import sys, time, tracemalloc
from pathlib import Path
from shards.sources import ImageFolderSource, imagefolder_classes
src = Path(sys.argv[1])
classes = imagefolder_classes(src)
t = time.perf_counter()
n = len(ImageFolderSource(src, "train", classes))
seconds = time.perf_counter() - t
tracemalloc.start()  # a second listing, traced: tracemalloc slows allocation (and threads) too much to time
source = ImageFolderSource(src, "train", classes)
held, peak = tracemalloc.get_traced_memory()
print(n, seconds, held, peak)
"""


def index_once(repo: Path, src: Path) -> dict:
    """List ``src`` with the checkout at ``repo``: files, seconds, bytes held by the index and peak."""
    r = subprocess.run([sys.executable, "-c", _INDEX_PROBE, str(src)], cwd=repo, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(repo)})
    if r.returncode != 0:
        raise SystemExit(f"rmix bench shards-scale: listing {src} with {repo} failed:\n{r.stderr[-2000:]}")
    n, seconds, held, peak = r.stdout.split()
    return dict(files=int(n), list_s=float(seconds), held_mb=int(held) / 2**20, peak_mb=int(peak) / 2**20)


def _stat(values: list) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarise(files: int, label: str, runs: list[dict]) -> dict:
    row = dict(files=files, code=label, runs=runs)
    for key in ("first_shard_s", "total_s", "cpu_s", "peak_rss_mb", "peak_pss_mb"):
        row[key], row[key + "_min"], row[key + "_max"] = _stat([r[key] for r in runs])
    row["shards_per_min"] = runs[0]["shards"] * 60 / row["total_s"]
    row["img_per_cpu_s"] = runs[0]["samples"] / row["cpu_s"]
    return row


def fmt(r: dict) -> str:
    return (f"{r['code']:<8}{r['files']:>9,}{r['first_shard_s']:>8.2f}s ({r['first_shard_s_min']:.2f}-"
            f"{r['first_shard_s_max']:.2f}){r['total_s']:>8.1f}s{r['shards_per_min']:>9.0f}{r['img_per_cpu_s']:>11.0f}"
            f"{r['peak_rss_mb']:>9.0f}{r['peak_pss_mb']:>9.0f} ({r['peak_pss_mb_min']:.0f}-{r['peak_pss_mb_max']:.0f})")


HEADER = (f"{'code':<8}{'files':>9}{'first shard (min-max)':>24}{'total':>9}{'shards/min':>11}{'img/cpu-s':>10}"
          f"{'RSS MB':>8}{'PSS MB (min-max)':>18}")


def index_rows(work: Path, counts: list[int], classes: int, repos: list, repeats: int) -> list[dict]:
    print(f"{'code':<8}{'files':>11}{'list s (min-max)':>22}{'index MB':>10}{'B/file':>8}{'peak MB':>9}", flush=True)
    rows = []
    for n in counts:
        src = write_tiny_imagefolder(work / f"names-{n}", classes=classes, per_class=n // classes, empty=True)
        runs = {label: [] for label, _ in repos}
        for _ in range(repeats):
            for label, repo in repos:
                runs[label].append(index_once(repo, src))
        for label, _ in repos:
            med, lo, hi = _stat([x["list_s"] for x in runs[label]])
            row = dict(files=n, code=label, list_s=med, list_s_min=lo, list_s_max=hi,
                       held_mb=runs[label][0]["held_mb"], peak_mb=max(x["peak_mb"] for x in runs[label]))
            rows.append(row)
            print(f"{label:<8}{n:>11,}{med:>9.2f}s ({lo:.2f}-{hi:.2f}){row['held_mb']:>10.1f}"
                  f"{row['held_mb'] * 2**20 / n:>8.0f}{row['peak_mb']:>9.1f}", flush=True)
    return rows


def shard_rows(work: Path, counts: list[int], args, repos: list) -> list[dict]:
    print(HEADER, flush=True)
    rows = []
    for n in counts:
        src = write_tiny_imagefolder(work / f"tree-{n}", classes=args.classes, per_class=n // args.classes)
        runs = {label: [] for label, _ in repos}
        for _ in range(args.repeats):  # interleaved, so a busy spell of the machine hits every checkout
            for label, repo in repos:
                runs[label].append(run_once(repo, src, work / "out", args.samples_per_shard, args.workers, args.every))
        for label, _ in repos:
            rows.append(summarise(n, label, runs[label]))
            print(fmt(rows[-1]), flush=True)
        shutil.rmtree(work / "out", ignore_errors=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix bench shards-scale", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="where the trees and outputs go (default: a temporary folder); "
                                              "trees are kept there and reused")
    p.add_argument("--files", default="50000,100000,200000", help="comma list of file counts")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--samples-per-shard", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--every", type=float, default=0.02, help="sampling period in seconds")
    p.add_argument("--repo", action="append", type=Path,
                   help="checkout to run `rmix shards` from (repeatable; LABEL=PATH names it; default: this one)")
    p.add_argument("--index-only", action="store_true", help="measure listing time and index memory alone "
                   "(trees of empty files), no shards")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    here = Path(__file__).resolve().parents[2]
    repos = []
    for r in args.repo or [Path(f"new={here}")]:
        label, _, path = str(r).rpartition("=")
        repos.append((label or Path(path).name, Path(path).resolve()))
    counts = [int(c) for c in args.files.split(",") if c.strip()]
    if any(c % args.classes for c in counts):
        raise SystemExit(f"rmix bench shards-scale: every --files count must be a multiple of --classes {args.classes}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.index_only:
            rows = index_rows(work, counts, args.classes, repos, args.repeats)
        else:
            rows = shard_rows(work, counts, args, repos)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
