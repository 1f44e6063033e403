"""``rmix bench --train``: does the loader keep the trainer fed?

Trains the demo model (small_cnn, RecursiveMix) on the digits shards for a few epochs twice per
repeat, side by side: once through the real loader, once on the same number of pre-made batches
already in memory on the device (the same mix applied, so only the loading differs). Reports images/s
of both, their ratio (goal >= 0.95: the loader hides behind compute), median and spread of repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pipelines import build_loader
from rmix import RecursiveMix, soft_target_cross_entropy
from rmix.losses import roi_loss_or_zero
from shards.build import ShardParams, build

from .models import small_cnn


def train_steps(model, optimizer, batches, mix_record) -> int:
    n = 0
    model.train()
    for b in batches:
        if b.boxes is not None:
            logits, roi = model(b.images, b.boxes)
        else:
            logits, roi = model(b.images), None
        loss = soft_target_cross_entropy(logits, b.targets) + roi_loss_or_zero(roi, b.history_logits, b.lam, 0.5)
        mix_record(logits.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += b.images.shape[0]
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix bench --train", description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, default=Path("data/shards"))
    p.add_argument("--loader", default="dali", choices=("dali", "memory", "ffcv", "torch"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    build(ShardParams(dataset="digits"), None, args.shards, progress=False)
    root = args.shards / "digits"
    torch.manual_seed(0)
    rates = {"loader": [], "in-memory": []}
    for _ in range(args.repeats):
        # real loader, with RecursiveMix inside it
        loader = build_loader(root, "train", backend=args.loader, batch_size=args.batch_size, train=True,
                              mix=RecursiveMix(0.5, seed=0), num_workers=args.workers)
        model = small_cnn(10)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        train_steps(model, opt, loader, loader.mix.record_logits)  # warm-up epoch
        t0, n = time.perf_counter(), 0
        for _ in range(args.epochs):
            n += train_steps(model, opt, loader, loader.mix.record_logits)
        rates["loader"].append(n / (time.perf_counter() - t0))
        # the same batches, made beforehand and held in memory; the mix still runs per step
        made = [(b.images.clone(), b.labels.clone()) for b in loader]
        mix = RecursiveMix(0.5, seed=0, num_classes=10, copy_history=False)
        model = small_cnn(10)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def premade():
            for images, labels in made:
                yield mix(images.clone(), labels)
        train_steps(model, opt, premade(), mix.record_logits)
        t0, n = time.perf_counter(), 0
        for _ in range(args.epochs):
            n += train_steps(model, opt, premade(), mix.record_logits)
        rates["in-memory"].append(n / (time.perf_counter() - t0))
    ratios = [a / b for a, b in zip(rates["loader"], rates["in-memory"])]
    for k, v in rates.items():
        print(f"{k:<10} {statistics.median(v):8.0f} img/s  (min {min(v):.0f}, max {max(v):.0f})")
    print(f"loader / in-memory: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}; goal >= 0.95)"
          f"  [{args.loader} loader, small_cnn, batch {args.batch_size}, {torch.get_num_threads()} threads]")


if __name__ == "__main__":
    main()
