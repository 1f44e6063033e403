"""``rmix bench loaders`` / ``make bench``: loader throughput, every backend side by side on the same data,
beside the libraries a user would otherwise run.

Data (generated once under ``--work``): an ImageNet-like set of JPEGs cut from real photographs
(``tools.photos``: 300-500 px, quality 90) and a CIFAR-size set of photograph crops in the real pickle
format. Each is sharded by ``rmix shards`` (webdataset + DALI index + FFCV beton).

Rows, per dataset, each the median of ``--repeats`` timed epochs after a warm-up epoch (FFCV compiles
its pipeline then), with the min-max spread:

* anchors, the way their users run them: torchvision ``ImageFolder`` + PIL in a ``DataLoader`` (ImageNet;
  a per-sample CIFAR ``Dataset`` with torchvision transforms for CIFAR) and FFCV used directly (its own
  ``jpg`` beton written by its ``DatasetWriter``, the ffcv-imagenet train pipeline with ``NormalizeImage``);
* references: the decode-only limit (OpenCV/libjpeg-turbo on all cores, no augmentation);
* ours: each backend x mix off / RecursiveMix / CutMix, exactly as the trainer drives it (logits are
  handed back to the mix every step). A backend's three loaders run side by side, one epoch each per round
  (``tools.timing.measure_side_by_side``), and a mix's cost is the median of each round's own ratio, printed
  with its range over the rounds.

Images/s and images per CPU-second of the whole process tree (``tools.timing``: DataLoader and FFCV
workers included). Writes ``bench.json`` and ``bench.png`` and prints a table, then each comparison with
both measurements, their min-max over the repeats and the anchor they are compared with, saying plainly
when a difference is inside that spread. With CUDA the same command measures the GPU path (DALI
``mixed`` decode, device-side mixes; timed with a device sync).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipelines import BACKENDS, build_loader
from pipelines.loader import resolve_device
from pipelines.presets import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from rmix import CutMix, RecursiveMix
from shards.build import ShardParams, build
from shards.ffcv_writer import ffcv_progress
from shards.manifest import load_manifest
from shards.reader import iter_tar, split_files
from tools.photos import write_photo_cifar, write_photo_imagefolder
from tools.timing import Timing, compare, cost_in_words, measure, measure_side_by_side

MIXES = {"off": lambda: None, "recursive_mix": lambda: RecursiveMix(0.5, seed=0), "cutmix": lambda: CutMix(1.0, seed=0)}
ANCHOR_TV = "torchvision DataLoader"
ANCHOR_FFCV = "FFCV direct"
DECODE = "decode-only (cv2)"
DESCRIPTION = ("Loader throughput on photographs: every backend of this project (mix off, RecursiveMix, CutMix) "
               "side by side with torchvision's DataLoader, FFCV used directly and the decode-only limit, on the "
               "same generated data. Prints images/s and images per CPU-second (median and min-max of the "
               "repeats) and writes bench.json and bench.png.")


# -- jobs: each returns a callable that runs one epoch and returns the number of images --------------
def loader_epochs(loader):
    """One epoch of one of our loaders, as the trainer drives it (logits back to the mix)."""
    def run():
        n = 0
        for b in loader:
            loader.record_logits(torch.zeros(b.images.shape[0], loader.num_classes, device=b.images.device))
            n += b.images.shape[0]
        return n
    return run


def decode_only(manifest: dict, split: str, workers: int):
    """libjpeg-turbo / libpng decode of every image of the split, no augmentation, all cores."""
    import cv2

    ext = manifest["splits"][split]["wds"]["ext"]
    blobs = [s[ext] for path in split_files(manifest, split, "wds") for _, s in iter_tar(path, fields=(ext,))]

    def decode(b):
        return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) is not None

    def run():
        with ThreadPoolExecutor(workers) as pool:
            return sum(pool.map(decode, blobs, chunksize=64))
    return run


def torchvision_imagefolder(src: Path, batch: int, workers: int, device):
    """What most users run: ``ImageFolder`` + PIL + torchvision transforms in a ``DataLoader``."""
    from torchvision import datasets, transforms as T

    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD])])
    return _torch_epochs(datasets.ImageFolder(str(src / "train"), tf), batch, workers, device)


class _ArrayDataset(torch.utils.data.Dataset):
    """CIFAR the torchvision way: one PIL image per ``__getitem__`` through the transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def torchvision_cifar(cifar_dir: Path, batch: int, workers: int, device):
    import pickle

    from torchvision import transforms as T

    data, labels = [], []
    for i in range(1, 6):
        with open(cifar_dir / f"data_batch_{i}", "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += d[b"labels"]
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize([m / 255 for m in CIFAR_MEAN], [s / 255 for s in CIFAR_STD])])
    return _torch_epochs(_ArrayDataset(np.concatenate(data), np.asarray(labels), tf), batch, workers, device)


def _torch_epochs(dataset, batch: int, workers: int, device):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda")

    def run():
        n = 0
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            n += images.shape[0]
        return n
    return run


def ffcv_direct(src_root: Path, beton: Path, kind: str, batch: int, workers: int, device):
    """FFCV as its users run it: a beton written by FFCV's own writer from the source dataset, and
    the ffcv-imagenet / ffcv-cifar train pipeline including ``NormalizeImage``."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import (NormalizeImage, RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice,
                                 ToTensor, ToTorchImage)
    from ffcv.writer import DatasetWriter

    if kind == "imagenet":
        mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
        if not beton.is_file():
            from torchvision import datasets
            with ffcv_progress(f"{kind} FFCV direct beton"):  # plain lines off a terminal, not tqdm frames
                DatasetWriter(str(beton), {"image": RGBImageField(write_mode="jpg", max_resolution=512,
                                                                  jpeg_quality=90),
                                           "label": IntField()}, num_workers=workers).from_indexed_dataset(
                    datasets.ImageFolder(str(src_root / "train")))
        image = [RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip()]
    else:
        mean, std = np.array(CIFAR_MEAN), np.array(CIFAR_STD)
        if not beton.is_file():
            with ffcv_progress(f"{kind} FFCV direct beton"):
                DatasetWriter(str(beton), {"image": RGBImageField(), "label": IntField()},
                              num_workers=workers).from_indexed_dataset(_cifar_pairs(src_root))
        image = [SimpleRGBImageDecoder(), RandomHorizontalFlip(), RandomTranslate(padding=4)]
    if device.type == "cuda":  # ffcv-imagenet's order: normalise on the GPU
        image += [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(), NormalizeImage(mean, std, np.float32)]
    else:  # on the CPU NormalizeImage is a JIT-compiled stage on the HWC array, before ToTensor (FFCV
        # 1.0.2 never finishes building a pipeline that goes JIT -> torch -> JIT again)
        image += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
    label = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)]
    loader = Loader(str(beton), batch_size=batch, num_workers=workers, order=OrderOption.RANDOM, os_cache=True,
                    drop_last=True, pipelines={"image": image, "label": label})

    def run():
        n = 0
        for images, labels in loader:
            n += images.shape[0]
        return n
    return run


class _cifar_pairs:
    """The CIFAR train pickles as FFCV's indexable ``(PIL image, label)`` dataset."""

    def __init__(self, cifar_dir: Path):
        import pickle

        data, self.labels = [], []
        for i in range(1, 6):
            with open(cifar_dir / f"data_batch_{i}", "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            self.labels += d[b"labels"]
        self.data = np.concatenate(data)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.data[i], self.labels[i]


# -- the run -------------------------------------------------------------------------------------------
def prepare(work: Path, imagenet_n: int, cifar_n: int, workers: int) -> dict:
    """Photograph sets in their real layouts, and our shards of them (reused when already there)."""
    print(f"rmix bench loaders: preparing data under {work} (reused on the next run with --work)", flush=True)
    imnet_src = write_photo_imagefolder(work / "imagenet-src", n_train=imagenet_n, n_val=16)
    cifar_src = write_photo_cifar(work / "cifar-src", n_train=cifar_n, n_val=1000)
    out = work / "shards"
    build(ShardParams(dataset="imagenet", samples_per_shard=256, ffcv_write_mode="jpg", ffcv_max_resolution=512),
          imnet_src, out, workers=workers, progress=False)
    build(ShardParams(dataset="cifar10", samples_per_shard=8192), cifar_src, out, workers=workers, progress=False)
    return {"imagenet": (imnet_src, load_manifest(out / "imagenet")), "cifar": (cifar_src, load_manifest(out / "cifar10"))}


def run(args, device, workers: int) -> list:
    data = prepare(args.work, args.imagenet_n, args.cifar_n, workers)
    rows = []

    def record(dataset, backend, mix, job, kind="ours"):
        t = job if isinstance(job, Timing) else measure(job, args.repeats, device)
        row = dict(dataset=dataset, backend=backend, mix=mix, kind=kind, images=t.items, s_median=t.wall,
                   walls=t.walls, cpus=t.cpus, img_per_s=t.per_s, img_per_cpu_s=t.per_cpu_s, device=str(device))
        rows.append(row)
        print(fmt(row), flush=True)

    for dataset, (src, manifest) in data.items():
        if dataset not in args.datasets:
            continue
        batch = args.batch_size if dataset == "imagenet" else args.cifar_batch_size
        record(dataset, DECODE, "-", decode_only(manifest, "train", workers), "reference")
        if dataset == "imagenet":
            record(dataset, ANCHOR_TV, "-", torchvision_imagefolder(src, batch, workers, device), "anchor")
        else:
            record(dataset, ANCHOR_TV, "-", torchvision_cifar(src, batch, workers, device), "anchor")
        if "ffcv" in args.backends:
            record(dataset, ANCHOR_FFCV, "-", ffcv_direct(src, args.work /
                                                          f"ffcv-direct-{dataset}.beton", dataset, batch, workers,
                                                          device), "anchor")
        for backend in args.backends:
            if dataset == "imagenet" and backend == "memory":
                continue
            if dataset == "cifar" and backend == "torch" and not args.cifar_torch:
                continue  # webdataset PNG decode of 50k samples per epoch: minutes; --cifar-torch to include
            # a backend's mixes side by side, round by round: the cost of a mix is paired per round
            jobs = {mix_name: loader_epochs(build_loader(manifest, "train", backend=backend, batch_size=batch,
                                                         train=True, device=device, mix=make_mix(),
                                                         num_workers=workers))
                    for mix_name, make_mix in MIXES.items()}
            for mix_name, t in measure_side_by_side(jobs, args.repeats, device).items():
                record(dataset, backend, mix_name, t)
            del jobs
    return rows


def fmt(r: dict) -> str:
    lo, hi = r["images"] / max(r["walls"]), r["images"] / min(r["walls"])
    return (f"{r['dataset']:<9}{r['backend']:<24}{r['mix']:<14}{r['img_per_s']:>10.0f} img/s "
            f"({lo:.0f}-{hi:.0f}){r['img_per_cpu_s']:>10.0f} img/cpu-s   x{r['images']}")


def _rate(t: Timing) -> str:
    lo, hi = t.spread
    return f"{t.per_s:,.0f} img/s ({lo:,.0f}-{hi:,.0f})"


def _ratio(a: Timing, b: Timing) -> str:
    """``a`` over ``b`` per second, in words (:func:`tools.timing.compare`); with fewer than three
    repeats there is no spread to judge a difference by, and the line says so."""
    n = min(len(a.walls), len(b.walls))
    if n < 3:
        return f"{a.per_s / b.per_s:.3f}x ({n} repeat(s): too few to tell it from noise; use --repeats 3 or more)"
    return compare(a, b)


def summary(rows: list) -> list[str]:
    """Each comparison, measured in this run: both rates with their min-max over the repeats, the
    anchor named, the ratio per second (with whether it is outside the spread) and per CPU-second;
    a mix's cost from rounds paired side by side."""
    get = {(r["dataset"], r["backend"], r["mix"]): Timing(r["walls"], r["cpus"], r["images"]) for r in rows}
    lines = []

    def both(a, b, what):
        if a in get and b in get:
            ta, tb = get[a], get[b]
            lines.append(f"{what} vs {b[1]}: {_rate(ta)} vs {_rate(tb)} = {_ratio(ta, tb)}; per CPU-second "
                         f"{ta.per_cpu_s:,.0f} vs {tb.per_cpu_s:,.0f} = {ta.per_cpu_s / tb.per_cpu_s:.2f}x")

    for ds in ("imagenet", "cifar"):
        both((ds, "dali", "off"), (ds, ANCHOR_TV, "-"), f"{ds} dali")
        both((ds, "dali", "off"), (ds, ANCHOR_FFCV, "-"), f"{ds} dali")
        both((ds, "ffcv", "off"), (ds, ANCHOR_FFCV, "-"), f"{ds} ffcv")
        both((ds, "torch", "off"), (ds, ANCHOR_TV, "-"), f"{ds} torch")
        for be in ("dali", "memory", "ffcv", "torch"):
            on, off = get.get((ds, be, "recursive_mix")), get.get((ds, be, "off"))
            if on and off:
                lines.append(f"{ds} {be}: RecursiveMix {_rate(on)} vs mix off {_rate(off)}; its cost in img/s, "
                             f"paired round by round: {cost_in_words(on, off)}")
    return lines


# bars that are not our loaders: the libraries users would otherwise run, and the decode-only limit
OTHER_BARS = {
    "anchor": dict(color="0.6", hatch="//", edgecolor="black", label="the library itself (anchor)"),
    "reference": dict(color="0.88", hatch="..", edgecolor="0.35", label="decode only, no augmentation (limit)"),
}


def plot(rows: list, path: Path) -> None:
    """Bars grouped by backend, the mix as colour, anchors and the decode-only limit grey and hatched apart,
    the value on each bar; images/s on the left, images per CPU-second on the right, one row per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in ("imagenet", "cifar") if any(r["dataset"] == d for r in rows)]
    colours = {"off": "tab:blue", "recursive_mix": "tab:orange", "cutmix": "tab:green", "-": "0.6"}
    bars = max(sum(1 for r in rows if r["dataset"] == d) + len({r["backend"] for r in rows if r["dataset"] == d})
               for d in datasets)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(max(12.0, 0.55 * bars * 2 + 2), 5 * len(datasets)),
                             squeeze=False)
    for row_axes, ds in zip(axes, datasets):
        sel = [r for r in rows if r["dataset"] == ds]
        groups = list(dict.fromkeys(r["backend"] for r in sel))
        for ax, key, label in zip(row_axes, ("img_per_s", "img_per_cpu_s"), ("images / s", "images / CPU-second")):
            ticks = []
            x = 0.0
            for g in groups:
                members = [r for r in sel if r["backend"] == g]
                start = x
                for r in members:
                    style = OTHER_BARS.get(r["kind"], dict(color=colours[r["mix"]], label=r["mix"]))
                    bar = ax.bar(x, r[key], width=0.8, **style)
                    ax.bar_label(bar, [f"{r[key]:,.0f}"], fontsize=7, rotation=90, padding=2)
                    x += 1
                ticks.append(((start + x - 1) / 2, g))
                x += 0.8
            # names wrapped onto lines, horizontal: long anchor names no longer run into their neighbours
            ax.set_xticks([t for t, _ in ticks], [textwrap.fill(g, 11) for _, g in ticks], fontsize=8)
            ax.set_ylabel(label)
            ax.set_ylim(0, max(r[key] for r in sel) * 1.25)
            ax.set_title(f"{ds}-like ({sel[0]['device']}): {label}")
            handles, labels = ax.get_legend_handles_labels()
            uniq = dict(zip(labels, handles))
            ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix bench loaders", description=DESCRIPTION)
    p.add_argument("--work", type=Path, help="scratch directory for data and shards (kept, so reruns reuse them)")
    p.add_argument("--imagenet-n", type=int, default=1024)
    p.add_argument("--cifar-n", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=64, help="ImageNet-like batch")
    p.add_argument("--cifar-batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="decode threads/processes (default: cores)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--datasets", nargs="+", default=["imagenet", "cifar"], choices=["imagenet", "cifar"])
    p.add_argument("--cifar-torch", action="store_true", help="also time the torch backend on CIFAR (slow)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for bench.json and bench.png")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.imagenet_n < args.batch_size or args.cifar_n < 5 * args.cifar_batch_size:
        p.error("--repeats must be >= 1 and each set must hold several batches")
    device = resolve_device(args.device)
    workers = args.workers or os.cpu_count() or 1
    print(f"rmix bench loaders: device={device} cores={os.cpu_count()} workers={workers} "
          f"batch={args.batch_size}/{args.cifar_batch_size} repeats={args.repeats} torch-threads={torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or Path(tmp)
        rows = run(args, device, workers)
    lines = summary(rows)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps({"rows": rows, "summary": lines}, indent=1))
    plot(rows, args.out / "bench.png")
    print(f"rmix bench loaders: wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")


if __name__ == "__main__":
    main()
