"""``make demo`` / ``rmix demo``: the whole system on the embedded default data, in a few minutes on CPU.

1. ``rmix shards --dataset digits``: scikit-learn's bundled digits as a CIFAR-format dataset, sharded
   into webdataset (+ DALI index) and FFCV under ``data/shards/digits`` (reused when already there).
2. Train the small CNN with RecursiveMix through the DALI loader (GPU when present, else CPU).
3. Evaluate, and print the final accuracy, images/s and where the checkpoint and logs are.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from pipelines import BACKENDS
from shards.build import ShardParams, build

from trainers.classify import run
from trainers.config import TrainConfig


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("data/shards"), help="where the digits shards go")
    p.add_argument("--save-dir", default="runs", help="where logs and checkpoints go")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--loader", default="dali", choices=tuple(BACKENDS))
    args = p.parse_args(argv)

    t0 = time.time()
    print("== 1/3 shards: sklearn digits -> webdataset + DALI index + FFCV", flush=True)
    build(ShardParams(dataset="digits"), None, args.out, progress=sys.stderr.isatty())
    print(f"== 2/3 train: small_cnn + RecursiveMix, {args.loader} loader, {args.epochs} epochs", flush=True)
    cfg = TrainConfig(
        name="demo", data="digits", data_dir=str(args.out / "digits"), save_dir=args.save_dir,
        model_file="small", model_name="small_cnn", epoch=args.epochs, batch_size=64, lr=0.05,
        scheduler="cos", warmup=1, weight_decay=5e-4, nesterov=True, print_freq=50, num_workers=2,
        aug="recursive_mix", aug_alpha=0.5, aug_omega=0.5, loader=args.loader, save_model=True,
    ).validate()
    out_dir = Path(cfg.save_dir) / cfg.data / cfg.name
    if out_dir.exists():  # the demo's own folder: a second `make demo` trains anew (the trainer refuses to overwrite)
        print(f"== replacing the previous demo run in {out_dir}", flush=True)
        shutil.rmtree(out_dir)
    result = run(cfg)
    if "val_acc1" not in result:
        sys.exit(f"rmix demo: training stopped before the last epoch ({result}); see the log above")
    print("== 3/3 result", flush=True)
    print(f"digits val Acc@1 {result['val_acc1']:.2f}%  Acc@5 {result['val_acc5']:.2f}%  "
          f"(best {result['best_acc1']:.2f}%)  train {result['img_per_s']:.0f} img/s  "
          f"data-wait {100 * result['data_wait']:.1f}%  total {time.time() - t0:.0f} s")
    print(f"checkpoints: {out_dir / 'latest.pth'}, {out_dir / 'best.pth'}")
    print(f"logs: {out_dir / 'metrics.csv'}, {out_dir / 'config.json'}")
    print(f"evaluate again: rmix train --data digits --data_dir {cfg.data_dir} --name demo --save_dir "
          f"{cfg.save_dir} --model_file small --model_name small_cnn --evaluate --resume best")


if __name__ == "__main__":
    main()
