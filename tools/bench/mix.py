"""``rmix bench mix``: the per-batch cost of each mix.

Times every mix on the same batches, side by side in one run, and reports the median and spread
(min-max) of several repeats, plus the mix's share of a batch's "budget" at a given loader rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rmix import CutMix, Mixup, NoMix, RecursiveMix, ResizeMix

SHAPES = {
    "imagenet-f32": ((256, 3, 224, 224), torch.float32),
    "cifar-u8": ((512, 3, 32, 32), torch.uint8),
}


def _mixes(num_classes: int):
    return {
        "none": NoMix(num_classes=num_classes),
        "mixup": Mixup(0.8, num_classes=num_classes),
        "cutmix": CutMix(1.0, num_classes=num_classes),
        "resizemix": ResizeMix(num_classes=num_classes),
        "rm-batch-nearest": RecursiveMix(0.5, num_classes=num_classes),
        "rm-batch-bilinear": RecursiveMix(0.5, interpolation="bilinear", num_classes=num_classes),
        "rm-sample-nearest": RecursiveMix(0.5, box="sample", num_classes=num_classes),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_mixes(device: str = "cpu", repeats: int = 7, iters: int = 5, shapes=None, num_classes: int = 1000):
    """Return rows ``{shape, mix, ms_median, ms_min, ms_max, img_per_s}``."""
    dev = torch.device(device)
    rows = []
    for shape_name in shapes or SHAPES:
        shape, dtype = SHAPES[shape_name]
        g = torch.Generator().manual_seed(0)
        if dtype == torch.uint8:
            images = torch.randint(0, 256, shape, dtype=dtype, generator=g).to(dev)
        else:
            images = torch.rand(shape, generator=g).to(dev)
        labels = torch.randint(0, num_classes, (shape[0],), generator=g).to(dev)
        for name, mix in _mixes(num_classes).items():
            mix(images, labels)  # warm-up; fills RecursiveMix's history
            times = []
            for _ in range(repeats):
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(iters):
                    mix(images, labels)
                    if mix.uses_logits:
                        mix.record_logits(torch.zeros(shape[0], num_classes, device=dev))
                _sync(dev)
                times.append((time.perf_counter() - t0) / iters * 1e3)
            med = statistics.median(times)
            rows.append(
                dict(shape=shape_name, mix=name, ms_median=med, ms_min=min(times), ms_max=max(times),
                     img_per_s=shape[0] / med * 1e3)
            )
    return rows


def print_table(rows) -> None:
    print(f"{'batch':<14}{'mix':<20}{'ms/batch (median)':>18}{'min-max':>18}{'img/s':>12}")
    for r in rows:
        spread = f"{r['ms_min']:.2f}-{r['ms_max']:.2f}"
        print(f"{r['shape']:<14}{r['mix']:<20}{r['ms_median']:>18.2f}{spread:>18}{r['img_per_s']:>12.0f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix bench mix", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows = bench_mixes(args.device, args.repeats, args.iters, args.shapes)
    print(f"device={args.device} threads={torch.get_num_threads()} repeats={args.repeats}x{args.iters}")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
