"""``rmix bench`` / ``make bench``: loader throughput, every backend side by side on the same shards.

For an ImageNet-like JPEG set and a CIFAR-like set it measures images/s and images per CPU-second of
dali / ffcv / torch (and the CIFAR fast path ``memory``) x mix off / RecursiveMix / CutMix, next to two
references: the decode-only limit (libjpeg-turbo / libpng through OpenCV, all cores, no augmentation)
and an in-memory tensor loop (slicing pre-made batches: what a loader costs at best). Each cell is the
median of ``--repeats`` timed epochs after a warm-up epoch (FFCV compiles its pipeline then), with
the min-max spread. Writes a JSON of all rows and a PNG bar chart, and prints a table. With CUDA the
same command measures the GPU path (DALI ``mixed`` decode, device-side mixes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from rmix import CutMix, RecursiveMix
from shards.build import ShardParams, build
from shards.manifest import load_manifest
from shards.synthetic import write_cifar_like, write_imagefolder_like

from . import build_loader
from .loader import resolve_device, split_files

MIXES = {"off": lambda: None, "recursive_mix": lambda: RecursiveMix(0.5, seed=0), "cutmix": lambda: CutMix(1.0, seed=0)}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epochs(make_iter, repeats: int, device) -> tuple[list, list, int]:
    """Warm up one epoch, then time ``repeats`` epochs: (walls, cpus, images per epoch)."""
    n = sum(make_iter())  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        _sync(device)
        c0, t0 = _cpu(), time.perf_counter()
        n = sum(make_iter())
        _sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(_cpu() - c0)
    return walls, cpus, n


def loader_epochs(loader):
    """One epoch of a loader, as the trainer drives it (recording logits for RecursiveMix)."""
    def run():
        for b in loader:
            if isinstance(loader.mix, RecursiveMix):
                loader.mix.record_logits(torch.zeros(b.images.shape[0], loader.num_classes, device=b.images.device))
            yield b.images.shape[0]
    return run


def decode_only(manifest: dict, split: str, workers: int):
    """libjpeg-turbo/libpng decode of every image of the split, no augmentation, all cores."""
    import cv2

    blobs = []
    for path in split_files(manifest, split, "wds"):
        with tarfile.open(path) as tf:
            blobs += [tf.extractfile(m).read() for m in tf if not m.name.endswith(".cls")]

    def decode(b):
        return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) is not None

    def run():
        with ThreadPoolExecutor(workers) as pool:
            yield sum(pool.map(decode, blobs, chunksize=64))
    return run


def tensor_loop(n: int, size: int, batch: int, device):
    """The in-memory reference: random batches gathered from normalised float images already on the
    device (one index_select per batch, no decode, no augmentation)."""
    data = torch.randn(min(n, 2048), 3, size, size, device=device)
    gen = torch.Generator().manual_seed(0)

    def run():
        for _ in range(n // batch):
            idx = torch.randint(0, data.shape[0], (batch,), generator=gen).to(device)
            yield data.index_select(0, idx).shape[0]
    return run


def prepare(work: Path, imagenet_n: int, cifar_n: int, workers: int) -> dict:
    imnet_src = write_imagefolder_like(work / "imagenet-src", n_train=imagenet_n, n_val=10)
    cifar_src = write_cifar_like(work / "cifar-src", n_train=cifar_n, n_val=1000)
    out = work / "shards"
    build(ShardParams(dataset="imagenet", samples_per_shard=256, ffcv_write_mode="jpg", ffcv_max_resolution=512),
          imnet_src, out, workers=workers, progress=False)
    build(ShardParams(dataset="cifar10", samples_per_shard=2048), cifar_src, out, workers=workers, progress=False)
    return {"imagenet": load_manifest(out / "imagenet"), "cifar": load_manifest(out / "cifar10")}


def run(work: Path, imagenet_n: int, cifar_n: int, batch: int, repeats: int, workers: int, backends, device) -> list:
    manifests = prepare(work, imagenet_n, cifar_n, workers)
    rows = []

    def record(dataset, backend, mix, fn, dev):
        walls, cpus, n = time_epochs(fn, repeats, dev)
        med, cpu = statistics.median(walls), statistics.median(cpus)
        row = dict(dataset=dataset, backend=backend, mix=mix, images=n, s_median=med, s_min=min(walls),
                   s_max=max(walls), img_per_s=n / med, img_per_cpu_s=n / max(cpu, 1e-9), device=str(dev))
        rows.append(row)
        print(fmt(row), flush=True)

    for dataset, manifest in manifests.items():
        size = 224 if dataset == "imagenet" else 32
        record(dataset, "decode-only (cv2)", "-", decode_only(manifest, "train", workers), torch.device("cpu"))
        record(dataset, "tensor-in-memory", "-", tensor_loop(manifest["splits"]["train"]["num_samples"], size, batch, device), device)
        for backend in backends:
            if backend == "memory" and dataset != "cifar":
                continue
            for mix_name, make_mix in MIXES.items():
                loader = build_loader(manifest, "train", backend=backend, batch_size=batch, train=True, device=device,
                                      mix=make_mix(), num_workers=workers)
                record(dataset, backend, mix_name, loader_epochs(loader), device)
                del loader
    return rows


def fmt(r: dict) -> str:
    return (f"{r['dataset']:<9}{r['backend']:<19}{r['mix']:<14}{r['img_per_s']:>10.0f} img/s"
            f"{r['img_per_cpu_s']:>10.0f} img/cpu-s   {r['s_median']:.3f}s ({r['s_min']:.3f}-{r['s_max']:.3f}) x{r['images']}")


def summary(rows: list) -> list[str]:
    """The ratios the design goals are stated in."""
    get = {(r["dataset"], r["backend"], r["mix"]): r for r in rows}
    lines = []

    def ratio(a, b, key):
        if a in get and b in get:
            return get[a][key] / get[b][key]
        return None

    for key, label in (("img_per_cpu_s", "per CPU-second"), ("img_per_s", "per second")):
        r1 = ratio(("imagenet", "dali", "off"), ("imagenet", "ffcv", "off"), key)
        r2 = ratio(("imagenet", "dali", "off"), ("imagenet", "torch", "off"), key)
        if r1:
            lines.append(f"ImageNet-like DALI / FFCV {label}: {r1:.2f}x (goal >= 1.3x)")
        if r2:
            lines.append(f"ImageNet-like DALI / torch {label}: {r2:.2f}x (goal >= 3x)")
    for ds in ("imagenet", "cifar"):
        for be in ("dali", "memory"):
            r = ratio((ds, be, "recursive_mix"), (ds, be, "off"), "img_per_s")
            if r:
                lines.append(f"{ds} {be}: RecursiveMix costs {100 * (1 - r):.1f}% of throughput (goal <= 3%)")
    if ("cifar", "memory", "recursive_mix") in get:
        lines.append(f"CIFAR fast path with RecursiveMix: {get[('cifar', 'memory', 'recursive_mix')]['img_per_s']:.0f} img/s (goal >= 100k)")
    return lines


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, ds in zip(axes, ("imagenet", "cifar")):
        sel = [r for r in rows if r["dataset"] == ds]
        labels = [f"{r['backend']}\n{r['mix']}" for r in sel]
        vals = [r["img_per_s"] for r in sel]
        errs = [[r["images"] / r["s_median"] - r["images"] / r["s_max"] for r in sel],
                [r["images"] / r["s_min"] - r["images"] / r["s_median"] for r in sel]]
        ax.bar(range(len(sel)), vals, yerr=errs, color="tab:blue")
        ax.set_xticks(range(len(sel)), labels, rotation=60, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("images / s (median, min-max)")
        ax.set_title(f"{ds}-like, {sel[0]['device'] if sel else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix bench", description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="scratch directory for data and shards (kept, so reruns reuse them)")
    p.add_argument("--imagenet-n", type=int, default=1024)
    p.add_argument("--cifar-n", type=int, default=10240)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="decode threads/processes (default: cores)")
    p.add_argument("--backends", nargs="+", default=["dali", "memory", "ffcv", "torch"])
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json and bench.png")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    workers = args.workers or os.cpu_count() or 1
    print(f"rmix bench: device={device} cores={os.cpu_count()} workers={workers} batch={args.batch_size} repeats={args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.work or Path(tmp), args.imagenet_n, args.cifar_n, args.batch_size, args.repeats, workers,
                   args.backends, device)
    lines = summary(rows)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps({"rows": rows, "summary": lines}, indent=1))
    plot(rows, args.out / "bench.png")
    print(f"rmix bench: wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")


if __name__ == "__main__":
    main()
