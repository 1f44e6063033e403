"""``rmix bench train``: does the loader keep the trainer fed?

Trains a model with RecursiveMix using the trainer's own ``train_one_epoch``, side by side in each repeat:
once fed by the real loader (decode, augment, normalise and mix inside it), once fed by pre-made batches in
memory on the device that went through the same loader pipeline (normalised, augmented) and are mixed per
step by the same RecursiveMix, so only the loading differs. Reports images/s of both, their ratio (goal
>= 0.95: the loader hides behind compute), the median and spread over repeats.

By default the demo model (small_cnn) on the digits shards on the CPU; ``--data cifar10 --model
resnet/resnet18 --device cuda`` is the GPU check (CIFAR-size photograph crops, written with
:mod:`tools.photos` when the shards are missing).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from pipelines import BACKENDS, build_loader
from pipelines.loader import DEVICE_FORMS, resolve_device
from rmix import RecursiveMix
from shards.build import ShardParams, build
from tools.photos import write_photo_cifar
from tools.timing import Timing, compare, measure
from trainers.classify import RunState, mixed_precision, train_one_epoch
from trainers.config import TrainConfig
from trainers.models import build_model


class PremadeBatches:
    """Batches captured from a loader without a mix, replayed from memory and mixed per step.

    Each step mixes a fresh copy (the loader, too, hands the mix a fresh tensor), with the mix
    borrowing it as inside the loader.
    """

    def __init__(self, batches: list, mix: RecursiveMix):
        self.batches, self.mix, self.position = batches, mix, 0
        mix.borrow_batches()

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.position = 0
        self.mix.set_epoch(0)
        for images, labels in self.batches:
            self.position += 1
            b = self.mix(images.clone(), labels)
            b.labels = labels
            yield b

    def record_logits(self, logits: torch.Tensor) -> None:
        self.mix.record_logits(logits)


def loader_vs_premade(loader, plain, make_model, cfg: TrainConfig, device, *, epochs: int = 1, repeats: int = 3,
                      channels_last: bool = False) -> dict:
    """The trainer fed by ``loader`` (which mixes with its own RecursiveMix) against the same trainer fed by the
    batches of ``plain`` (the same loader without a mix) replayed from memory and mixed per step by a fresh
    RecursiveMix, so only the loading differs. One run of each per repeat, interleaved, so drifting machine
    load hits both alike; each run is one warm-up pass of ``epochs`` epochs, then ``epochs`` timed ones.

    ``make_model()`` returns a fresh model on ``device`` (built under ``torch.manual_seed(0)``); ``cfg`` gives
    the loss (``aug``, ``aug_omega``), ``batch_size`` and ``amp``. Returns ``{"loader": Timing, "in-memory":
    Timing, "ratios": [loader img/s over in-memory img/s, one per repeat]}``.
    """
    def trainer(source):
        torch.manual_seed(0)
        model = make_model()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        autocast, scaler = mixed_precision(cfg.amp, device)
        state = RunState()

        def job() -> int:
            for _ in range(epochs):
                train_one_epoch(model, source, opt, scaler, cfg, 1, state, device=device, autocast=autocast,
                                log=lambda m: None)
            return epochs * len(source) * cfg.batch_size
        return job

    made = [(b.images.clone(), b.labels.clone()) for b in plain]  # normalised and augmented, unmixed
    premade = PremadeBatches(made, RecursiveMix(0.5, seed=0, num_classes=loader.num_classes))
    runs = {"loader": [], "in-memory": []}
    for _ in range(repeats):
        runs["loader"].append(measure(trainer(loader), 1, device))
        runs["in-memory"].append(measure(trainer(premade), 1, device))
    fed = {k: Timing([t.walls[0] for t in v], [t.cpus[0] for t in v], v[0].items) for k, v in runs.items()}
    fed["ratios"] = [a.per_s / b.per_s for a, b in zip(runs["loader"], runs["in-memory"])]
    return fed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix bench train", description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=Path, default=Path("data/shards"), help="where the digits shards are (made if missing)")
    p.add_argument("--loader", default="dali", choices=tuple(BACKENDS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", choices=["digits", "cifar10"], default="digits",
                   help="digits (bundled) or cifar10 (photograph crops in the CIFAR pickle format, made if missing)")
    p.add_argument("--cifar-n", type=int, default=50_000, help="training images when the cifar10 set is made")
    p.add_argument("--model", default=None, metavar="FAMILY/NAME",
                   help="a CIFAR-size model of trainers.models (default small/small_cnn; e.g. resnet/resnet18)")
    p.add_argument("--device", default="cpu", help=f"{DEVICE_FORMS} (default cpu)")
    p.add_argument("--amp", choices=["off", "fp16", "bf16"], default="off", help="mixed precision on CUDA")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    root = args.shards / args.data
    if args.data == "digits":
        build(ShardParams(dataset="digits"), None, args.shards, progress=False)
    elif not (root / "manifest.json").is_file():
        src = write_photo_cifar(args.shards / "cifar-src", n_train=args.cifar_n, n_val=1000)
        formats = ["wds", "ffcv"] if args.loader == "ffcv" else ["wds"]
        build(ShardParams(dataset="cifar10", samples_per_shard=8192, formats=formats), src, args.shards,
              progress=False)
    family, _, name = (args.model or "small/small_cnn").partition("/")
    cfg = TrainConfig(data=args.data, data_dir=str(root), model_file=family, model_name=name, epoch=1,
                      batch_size=args.batch_size, lr=0.05, aug="recursive_mix", aug_omega=0.5, print_freq=10**9,
                      amp=args.amp, progress=False).validate()
    amp = args.amp if device.type == "cuda" else "off"
    loader = build_loader(root, "train", backend=args.loader, batch_size=args.batch_size, train=True,
                          device=device, mix=RecursiveMix(0.5, seed=0), num_workers=args.workers)
    plain = build_loader(root, "train", backend=args.loader, batch_size=args.batch_size, train=True,
                         device=device, num_workers=args.workers)
    fed = loader_vs_premade(loader, plain, lambda: build_model(family, name, 10, imagenet=False).to(device), cfg,
                            device, epochs=args.epochs, repeats=args.repeats)
    merged, ratios = {k: fed[k] for k in ("loader", "in-memory")}, fed["ratios"]
    for k, t in merged.items():
        lo, hi = t.spread
        print(f"{k:<10} {t.per_s:8.0f} img/s  (min {lo:.0f}, max {hi:.0f})  {t.per_cpu_s:8.0f} img/cpu-s")
    print(f"loader / in-memory: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}; "
          f"goal >= 0.95) = {compare(merged['loader'], merged['in-memory'])}"
          f"  [{args.loader} loader, {args.data}, {family}/{name}, batch {args.batch_size}, {device}, amp {amp}, "
          f"{torch.get_num_threads()} threads]")


if __name__ == "__main__":
    main()
