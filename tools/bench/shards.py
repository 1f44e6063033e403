"""``rmix bench --shards``: sharding throughput per format, beside ``tar -cf`` of the same files.

Datasets: a CIFAR-10-sized synthetic set (60k, real pickle format) and an ImageNet-like JPEG folder
(a few thousand images of 300-500 px). Each job runs ``--repeats`` times into a fresh directory;
the median and min-max are reported, with images/s and images per CPU-second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from shards.build import ShardParams, build
from tools.synthetic import write_cifar_like, write_imagefolder_like
from tools.timing import measure


def _timed(fn, n: int, repeats: int):
    """(walls, cpus) of ``repeats`` runs of ``fn``; CPU time of the whole process tree (tools.timing),
    so sharding's encode workers and FFCV's writer processes are counted while they are alive."""
    def job():
        fn()
        return n
    t = measure(job, repeats, warmup=False)
    return t.walls, t.cpus


def run(work: Path, cifar_n: int, imagenet_n: int, repeats: int, workers: int) -> list[dict]:
    print(f"preparing synthetic data under {work} ...", flush=True)
    cifar = write_cifar_like(work / "cifar-src", n_train=cifar_n * 5 // 6, n_val=cifar_n // 6)
    imnet = write_imagefolder_like(work / "imagenet-src", n_train=imagenet_n, n_val=max(1, imagenet_n // 10))
    jobs = [
        ("cifar10", cifar, "wds", {}, cifar_n),
        ("cifar10", cifar, "ffcv", {}, cifar_n),
        ("imagenet", imnet, "wds", {}, imagenet_n + max(1, imagenet_n // 10)),
        ("imagenet", imnet, "ffcv", {"ffcv_max_resolution": 512}, imagenet_n + max(1, imagenet_n // 10)),
    ]
    rows = []
    for dataset, src, fmt, extra, n in jobs:
        def job():
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            build(ShardParams(dataset=dataset, formats=[fmt], **extra), src, out, workers=workers, progress=False)
        walls, cpus = _timed(job, n, repeats)
        rows.append(_row(dataset, fmt, n, walls, cpus))
        print(_fmt(rows[-1]), flush=True)
    for dataset, src, n in (("cifar10", cifar, cifar_n), ("imagenet", imnet, rows[2]["samples"])):
        def tar():
            subprocess.run(["tar", "-cf", str(work / "ref.tar"), "-C", str(src), "."], check=True)
        walls, cpus = _timed(tar, n, repeats)
        rows.append(_row(dataset, "tar -cf (I/O limit)", n, walls, cpus))
        print(_fmt(rows[-1]), flush=True)
    return rows


def _row(dataset, fmt, n, walls, cpus):
    med = statistics.median(walls)
    cpu = statistics.median(cpus)
    return dict(dataset=dataset, format=fmt, samples=n, s_median=med, s_min=min(walls), s_max=max(walls),
                img_per_s=n / med, img_per_cpu_s=n / max(cpu, 1e-9))


def _fmt(r):
    return (f"{r['dataset']:<10}{r['format']:<22}{r['samples']:>8}{r['s_median']:>10.2f}s"
            f"  ({r['s_min']:.2f}-{r['s_max']:.2f}){r['img_per_s']:>12.0f} img/s{r['img_per_cpu_s']:>12.0f} img/cpu-s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix bench --shards", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    p.add_argument("--cifar-n", type=int, default=60_000)
    p.add_argument("--imagenet-n", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        rows = run(work, args.cifar_n, args.imagenet_n, args.repeats, args.workers or os.cpu_count())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
