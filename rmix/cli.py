"""The ``rmix`` console script: one entry point, one subcommand per stage of the data path.

    rmix shards   dataset -> webdataset (+ DALI index) and FFCV shards      (shards/)
    rmix verify   re-read shards against their manifest                       (shards/)
    rmix bench    loader / mix throughput benchmarks                          (pipelines/, rmix/)
    rmix train    single-process training (torchrun -m trainers.classify)    (trainers/)
    rmix demo     shard the embedded digits, train with RecursiveMix, report  (make demo)

Each subcommand lives in its own module with a ``main(argv)``; this file only dispatches, so
``rmix --help`` stays fast (no torch/DALI import).
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS = {
    "shards": ("shards.cli", "write webdataset/FFCV shards and a manifest from CIFAR, ImageNet or digits"),
    "verify": ("shards.verify", "re-read every shard against its manifest"),
    "bench": ("pipelines.bench", "loader throughput (--mix-only: mixes; --shards: sharding; --train: trainer fed by loader)"),
    "train": ("trainers.classify", "train a classifier (the seed's flags)"),
    "demo": ("trainers.demo", "shard the embedded digits and train with RecursiveMix"),
}


def _usage() -> str:
    lines = ["usage: rmix <command> [options]", "", "commands:"]
    lines += [f"  {name:<8}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "rmix <command> --help for the options of one command."]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.exit(f"rmix: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}")
    module = COMMANDS[name][0]
    for flag, target in (("--mix-only", "rmix.bench"), ("--shards", "shards.bench"), ("--train", "trainers.bench")):
        if name == "bench" and flag in rest:  # the narrower benchmarks live beside what they measure
            rest.remove(flag)
            module = target
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            sys.exit(f"rmix {name}: not available yet in this version (module {module} is missing)")
        raise
    mod.main(rest)


if __name__ == "__main__":
    main()
