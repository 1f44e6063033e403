"""The ``rmix`` console script: the top floor, above ``trainers/``; every subcommand is a plain import.

    rmix shards           dataset -> webdataset (+ DALI index) and FFCV shards    (shards/)
    rmix shards merge     the parts of a job split with --part K/N -> one manifest  (shards/)
    rmix verify           re-read shards against their manifest                     (shards/)
    rmix train            train a classifier with the seed's flags                  (trainers/)
    rmix demo             shard the embedded digits, train with RecursiveMix        (make demo)
    rmix bench loaders    loader throughput, every backend side by side            (pipelines/)
    rmix bench mix        per-batch cost of each mix                                (rmix/)
    rmix bench shards     sharding throughput beside tar -cf                        (shards/)
    rmix bench shards-scale  time to first shard and memory vs file count           (shards/)
    rmix bench train      the trainer fed by the loader vs by pre-made batches      (trainers/)
    rmix bench dense      DALI detection/segmentation loaders vs mmdet/mmseg's       (pipelines/)
    rmix bench remote     shards over HTTP (streamed / node-local cache) vs from disk (shards/remote)
    rmix export-backbone  trainer checkpoint -> mmpretrain-layout ResNet-50         (trainers/mm)
    rmix mm train|test    mmdet / mmseg runs with our backbone                      (trainers/mm)

Imports happen inside each branch, so ``rmix --help`` stays fast (no torch or DALI import); ``rmix train``
parses its flags before it imports the trainer, so its ``--help`` and a bad flag answer at once too.
"""

from __future__ import annotations

import sys

COMMANDS = {
    "shards": "write webdataset/FFCV shards and a manifest from CIFAR, ImageNet or digits (merge: join --part jobs)",
    "verify": "re-read every shard against its manifest",
    "train": "train a classifier (the seed's flags)",
    "demo": "shard the embedded digits and train with RecursiveMix",
    "bench": "benchmarks: loaders | mix | shards | shards-scale | train | dense | remote",
    "export-backbone": "export a trainer checkpoint's ResNet-50 for mmdet/mmseg",
    "mm": "mmdet/mmseg: train | test a config with our backbone",
}
BENCHES = {
    "loaders": "loader throughput: every backend x mix, beside the libraries they wrap",
    "mix": "per-batch cost of each mix",
    "shards": "sharding throughput beside tar -cf",
    "shards-scale": "rmix shards on 50k-200k files: time to first shard, peak memory, shards/min",
    "train": "the trainer fed by the loader vs by pre-made batches",
    "dense": "detection / segmentation: our DALI loaders vs mmdet's / mmseg's own, RM off and on",
    "remote": "shards over HTTP (torch streamed, DALI via the node-local cache) vs from disk",
}


def _usage(commands: dict, head: str) -> str:
    width = max(map(len, commands)) + 2
    lines = [head, "", "commands:"] + [f"  {name:<{width}}{help_}" for name, help_ in commands.items()]
    return "\n".join(lines + ["", "add --help after a command for its options."])


def bench(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(BENCHES, "usage: rmix bench {loaders,mix,shards,shards-scale,train,dense,remote} [options]"))
        return
    name, rest = argv[0], argv[1:]
    if name == "loaders":
        from tools.bench import loaders
        loaders.main(rest)
    elif name == "mix":
        from tools.bench import mix
        mix.main(rest)
    elif name == "shards":
        from tools.bench import shards
        shards.main(rest)
    elif name == "shards-scale":
        from tools.bench import shards_scale
        shards_scale.main(rest)
    elif name == "train":
        from tools.bench import train
        train.main(rest)
    elif name == "dense":
        from tools.bench import dense
        dense.main(rest)
    elif name == "remote":
        from tools.bench import remote
        remote.main(rest)
    else:
        sys.exit(f"rmix bench: unknown benchmark {name!r}; choose one of: {', '.join(BENCHES)}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(COMMANDS, "usage: rmix <command> [options]"))
        return
    name, rest = argv[0], argv[1:]
    if name == "shards":
        from tools import shards
        shards.main(rest)
    elif name == "verify":
        from tools import verify
        verify.main(rest)
    elif name == "train":
        from trainers.config import parse_or_exit

        cfg = parse_or_exit(rest)  # before the trainer's imports (torch, the loaders: seconds): --help is instant
        from trainers import classify
        classify.main(cfg=cfg)
    elif name == "demo":
        from tools import demo
        demo.main(rest)
    elif name == "bench":
        bench(rest)
    elif name == "export-backbone":
        from tools import mm
        mm.export_main(rest)
    elif name == "mm":
        from tools import mm
        mm.main(rest)
    else:
        sys.exit(f"rmix: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")


if __name__ == "__main__":
    main()
