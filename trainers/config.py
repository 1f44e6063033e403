"""One typed configuration for training: the seed's flags verbatim, plus ours.

The dataclass is the single source of defaults; the argparse parser is generated from it, so
``--flag`` and the field share one name, type, help and default (shown by ``--help``). Invalid
combinations fail at start with one line (``ConfigError``).

This module imports neither torch nor a loader: ``rmix train --help`` and a bad flag answer before the
trainer's imports (seconds) start. The choices of ``--loader``, ``--aug``, ``--interpolate_mode`` and
``--rm_box`` are therefore spelled here; a test holds them equal to the registries they name
(``pipelines.BACKENDS``, ``rmix.MIXES``, ``rmix.recursive_mix.INTERPOLATIONS`` / ``BOX_MODES``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional

from shards.build import DATASETS


class ConfigError(ValueError):
    """A bad flag or combination; its message is the one line the user sees."""


DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
# the registries' names, without importing torch (module header)
BACKENDS = ("dali", "memory", "ffcv", "torch")                               # pipelines.BACKENDS
MIXES = ("none", "mixup", "cutmix", "resizemix", "recursive_mix")            # rmix.MIXES
INTERPOLATIONS = ("nearest", "bilinear")                                     # rmix.recursive_mix
BOX_MODES = ("batch", "sample")                                              # rmix.recursive_mix


def _f(default, help: str, choices=None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


@dataclass
class TrainConfig:
    # -- the seed's flags (implus/RecursiveMix-pytorch main.py) ------------------------------------
    name: str = _f("run", "experiment name: logs and checkpoints go to SAVE_DIR/DATA/NAME")
    data: str = _f("digits", "dataset", choices=DATASETS)
    data_dir: str = _f("data/shards/digits", "output of `make shards` for this dataset (holds manifest.json), or its "
                       "URL: http(s)://.../manifest.json, or 'pipe:CMD' with {} for each file's path")
    save_dir: str = _f("./logs", "root of logs and checkpoints")
    model_file: str = _f("resnet", "model family (resnet, pyramidnet, small)")
    model_name: str = _f("resnet18", "model in the family (resnet18, resnet50, pyramidnet_200_240, small_cnn, ...)")
    epoch: int = _f(200, "number of epochs")
    optimizer: str = _f("sgd", "optimizer", choices=("sgd", "adamw"))
    scheduler: str = _f("cos", "learning-rate schedule (per epoch, as the seed)", choices=("step", "cos"))
    schedule: list = _f((100, 150), "epochs at which the step schedule decays", nargs="+", type=int)
    batch_size: int = _f(128, "global batch size, divided by the world size as in the seed")
    warmup: int = _f(0, "linear warm-up epochs")
    lr: float = _f(0.1, "base learning rate")
    lr_decay: float = _f(0.1, "step schedule decay factor")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "weight decay")
    nesterov: bool = _f(False, "Nesterov momentum")
    smoothing: float = _f(0.0, "label smoothing (seed convention: smoothing / (K - 1) off the label)")
    save_model: bool = _f(False, "keep the best checkpoint as well as latest (latest is always written)")
    print_freq: int = _f(100, "log a line every N steps")
    random_seed: int = _f(27, "seed of model init, loaders and mixes")
    num_workers: int = _f(16, "decode workers in total, divided by the world size as in the seed")
    resume: str = _f("", "checkpoint to resume from: best, latest, a path, or auto (latest when the run folder "
                         "holds one, else start fresh: for requeued jobs and torchrun --max-restarts)")
    evaluate: bool = _f(False, "only evaluate (with --resume) and print Acc@1/Acc@5")
    aug: str = _f("none", "batch mix", choices=MIXES)
    aug_alpha: float = _f(0.5, "alpha of the mix (RM: box side = sqrt(U(0, alpha)))")
    aug_omega: float = _f(0.5, "weight of RecursiveMix's ROI consistency loss")
    aug_plus: bool = _f(False, "ImageNet: add ColorJitter 0.4 and PCA lighting 0.1")
    interpolate_mode: str = _f("nearest", "how RM resizes the history", choices=INTERPOLATIONS)
    share_fc: bool = _f(False, "ROI head shares the classifier fc")
    # -- ours --------------------------------------------------------------------------------------
    loader: str = _f("dali", "loader backend", choices=BACKENDS)
    device: str = _f("auto", "auto (CUDA when available), cpu, cuda (each rank its LOCAL_RANK GPU), cuda:N (one process)")
    channels_last: bool = _f(False, "channels_last memory format for images and model")
    amp: str = _f("off", "mixed precision on CUDA (CPU always runs fp32)", choices=("off", "fp16", "bf16"))
    rm_box: str = _f("batch", "RM box per batch (seed) or per sample", choices=BOX_MODES)
    keep_history: bool = _f(False, "RM: keep the history across epochs (seed resets it)")
    stop_after_steps: int = _f(0, "save latest and exit after this many steps in total (a scheduled preemption)")
    # shards by URL (shards/remote.py): retries, and the node-local cache of the dali/ffcv/memory loaders
    shard_retries: int = _f(3, "attempts after the first before a shard read by URL fails the run")
    shard_retry_wait: float = _f(1.0, "seconds before the first retry, doubled for each next (at most 60)")
    shard_timeout: float = _f(60.0, "shards by URL: an attempt fails after this many seconds waiting for data")
    skip_failed_shards: bool = _f(False, "log and skip a shard that still fails after its retries (default: stop)")
    shard_cache: str = _f("", "node-local cache of the dali/ffcv/memory loaders for shards by URL "
                              "(default: $RMIX_SHARD_CACHE, else ~/.cache/rmix/shards)")
    shard_cache_max_gb: float = _f(0.0, "evict other datasets from the shard cache above this size (0: no limit)")
    progress: bool = _f(True, "progress bar on a terminal (off a terminal only the log lines are printed)", type="bool")
    dist_timeout: float = _f(300.0, "DDP: seconds a collective waits for a peer before this rank gives up on it "
                                  "(a lost node ends the job within about this long)")
    # accepted for the seed's launcher, ignored: torchrun sets the environment instead
    local_rank: int = _f(-1, argparse.SUPPRESS)
    ddp: Optional[str] = _f(None, argparse.SUPPRESS)

    def validate(self) -> "TrainConfig":
        if self.batch_size < 1 or self.epoch < 1:
            raise ConfigError("--batch_size and --epoch must be >= 1")
        if not DEVICE_RE.fullmatch(self.device):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        for flag, value, ok, rule in (
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("aug_alpha", self.aug_alpha, self.aug_alpha > 0, "> 0"),
            ("aug_omega", self.aug_omega, self.aug_omega >= 0, ">= 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("lr_decay", self.lr_decay, 0 < self.lr_decay <= 1, "in (0, 1]"),
            ("warmup", self.warmup, self.warmup >= 0, ">= 0"),
            ("print_freq", self.print_freq, self.print_freq >= 1, ">= 1"),
            ("num_workers", self.num_workers, self.num_workers >= 0, ">= 0"),
            ("stop_after_steps", self.stop_after_steps, self.stop_after_steps >= 0, ">= 0"),
            ("shard_retries", self.shard_retries, self.shard_retries >= 0, ">= 0"),
            ("shard_retry_wait", self.shard_retry_wait, self.shard_retry_wait >= 0, ">= 0"),
            ("shard_timeout", self.shard_timeout, self.shard_timeout > 0, "> 0"),
            ("shard_cache_max_gb", self.shard_cache_max_gb, self.shard_cache_max_gb >= 0, ">= 0"),
        ):
            if not ok:
                raise ConfigError(f"--{flag} must be {rule}, got {value}")
        if self.evaluate and not self.resume:
            raise ConfigError("--evaluate needs --resume (best, latest or a checkpoint path)")
        if self.loader == "memory" and self.data == "imagenet":
            raise ConfigError("--loader memory is the CIFAR fast path; ImageNet needs dali, ffcv or torch")
        if self.aug_plus and self.data != "imagenet":
            raise ConfigError("--aug_plus is the ImageNet colour augmentation; it does not apply to " + self.data)
        if self.aug == "recursive_mix" and not 0 < self.aug_alpha <= 1:
            raise ConfigError(f"--aug_alpha for recursive_mix must be in (0, 1], got {self.aug_alpha}")
        if self.aug != "recursive_mix" and self.share_fc:
            raise ConfigError("--share_fc only applies to --aug recursive_mix")
        if self.dist_timeout <= 0:
            raise ConfigError(f"--dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if not 0 <= self.smoothing < 1:
            raise ConfigError(f"--smoothing must be in [0, 1), got {self.smoothing}")
        return self

    def remote(self):
        """How the loaders read a dataset named by URL (the ``--shard_*`` flags): a
        :class:`shards.remote.RemoteOptions`."""
        from shards.remote import RemoteOptions

        return RemoteOptions(retries=self.shard_retries, retry_wait=self.shard_retry_wait, timeout=self.shard_timeout,
                             skip_failed_shards=self.skip_failed_shards, cache_dir=self.shard_cache,
                             cache_max_gb=self.shard_cache_max_gb)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["schedule"] = list(d["schedule"])
        return d


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "t"):
        return True
    if v.lower() in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"boolean expected, got {v!r}")


def _shown(default) -> str:
    """A default as ``--help`` shows it: ``--schedule 100 150``; nothing for an off switch or an empty string."""
    if default is None or default is False or default == "":
        return ""
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return str(default)


def build_parser(prog: str = "rmix train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a classifier with RecursiveMix (the seed's flags).",
                                allow_abbrev=False)
    for f in dataclasses.fields(TrainConfig):
        meta, flag = f.metadata, "--" + f.name
        help_ = meta["help"]
        if help_ is not argparse.SUPPRESS and _shown(f.default):
            help_ = f"{help_} (default: {_shown(f.default)})".replace("%", "%%")
        kw = {"help": help_, "default": f.default}
        if f.type in ("bool", bool) and f.default is False:
            p.add_argument(flag, action="store_true", **kw)
            continue
        if meta.get("type") == "bool":  # on by default: --no-<flag> turns it off
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if meta.get("nargs"):
            kw.update(nargs=meta["nargs"], type=meta["type"])
        elif f.name == "ddp":
            kw.update(type=_str2bool)
        else:
            kw["type"] = {"int": int, "float": float, "str": str}.get(str(f.type), str) if isinstance(f.type, str) else f.type
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        p.add_argument(flag, **kw)
    return p


def parse_config(argv=None, prog: str = "rmix train") -> TrainConfig:
    """The validated config of a command line; a bad flag exits with argparse's usage line, a bad value or
    combination raises :class:`ConfigError`."""
    args = build_parser(prog).parse_args(argv)
    return TrainConfig(**vars(args)).validate()


def parse_or_exit(argv=None, prog: str = "rmix train") -> TrainConfig:
    """:func:`parse_config`, with a :class:`ConfigError` as one line on stderr and exit status 1."""
    try:
        return parse_config(argv, prog)
    except ConfigError as e:
        raise SystemExit(f"{prog}: {e}") from None
