"""Lean DDP classification trainer with the seed's command line.

    torchrun --nproc_per_node=N -m trainers.classify <the seed's flags>
    rmix train <the seed's flags>                       # one process

Reads top to bottom, as torchvision's classification reference: ``run`` sets up the process group,
the loaders (which own the mix), the model, optimizer and resume, then loops over epochs calling
``train_one_epoch`` and ``evaluate``; ``trainers.checkpoint`` saves and loads. Only rank 0 writes logs
and checkpoints; metrics are reduced across ranks. The learning rate follows the seed's per-epoch
schedule (linear warm-up, then step or cosine). With ``--aug recursive_mix`` the loss is the
soft-target CE plus ``omega * (1 - lam) * CE(roi_logits, softmax(history logits))`` and the logits of
every step go back to the loader (``record_logits``) as the next step's history.

Exit status: 0 when the run finished (or stopped at ``--stop_after_steps``), 1 with one line on bad
input, ``EXIT_PREEMPTED`` (143) after SIGTERM once ``latest.pth`` is saved, so a scheduler requeues
the job instead of counting it as done, ``EXIT_INTERRUPTED`` (130) after Ctrl-C (SIGINT), handled as
SIGTERM is (a second Ctrl-C stops at once, without the save), ``EXIT_PEER_LOST`` (75) with one line
naming the lost rank when a peer died or hung for ``--dist_timeout`` seconds (``trainers.peers``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipelines import build_loader
from pipelines.seeds import derive_seed
from rmix import build_mix, soft_target_cross_entropy
from rmix.losses import roi_consistency_loss
from shards.errors import ShardError
from shards.manifest import load_manifest

from .checkpoint import (CheckpointError, check_resume_flags, load_checkpoint, load_model_state, resolve_path,
                         rng_state, save_checkpoint, set_rng_state)
from .config import ConfigError, TrainConfig, parse_or_exit
from .models import build_model
from .peers import EXIT_PEER_LOST, announce, is_peer_failure, lost_line, restart_warning, roll_call

EXIT_PREEMPTED = 143  # 128 + SIGTERM: the shell's code for "terminated", after latest.pth is saved
EXIT_INTERRUPTED = 130  # 128 + SIGINT: the shell's code for Ctrl-C, after latest.pth is saved
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # each asks for a save of latest.pth at the next step


class Stop(Exception):
    """Raised inside the epoch loop when the run must save ``latest`` and exit (a signal, a step budget)."""


#: the running sums of an epoch on one rank, in this order: loss * n, roi * n, top-1 hits, top-5 hits, n
METERS = ("loss_sum", "roi_sum", "top1", "top5", "samples")


@dataclass
class RunState:
    """What the epoch loop advances: the global step, the best validation metrics, the stop signal received
    (its name, "" for none), and the running sums of the epoch in progress (``METERS``, on the device).

    ``meters`` is set by :func:`train_one_epoch` while an epoch runs (and cleared at its end), so a mid-epoch
    checkpoint can save it; a run resumed mid-epoch sets it from the checkpoint, and the interrupted epoch's
    metrics then count every step of the epoch, as the uninterrupted run's do.
    """

    step: int = 0
    best: dict = field(default_factory=lambda: {"acc1": 0.0, "acc5": 0.0, "epoch": 0})
    stop_signal: str = ""
    meters: Optional[torch.Tensor] = None


# -- distributed -------------------------------------------------------------------------------------
def resolve_device(spec: str, local_rank: int, world: int) -> torch.device:
    """``auto`` / ``cuda`` -> this rank's GPU (``cuda:LOCAL_RANK``) or, for auto without CUDA, the CPU;
    ``cuda:N`` -> that GPU (one process only); ``cpu``. Anything unusable is a one-line ConfigError."""
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec} asked for, but CUDA is not available (use --device auto or cpu)")
    if spec in ("auto", "cuda"):
        index = local_rank
    else:
        index = int(spec.split(":")[1])
        if world > 1:
            raise ConfigError(f"--device {spec} with {world} processes: use --device cuda (each rank takes cuda:LOCAL_RANK)")
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: GPU {index} does not exist ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


#: flags that may differ between nodes, and why; every other flag must be the same on every rank
PER_NODE_FLAGS = {
    "save_dir": "only rank 0 writes; on resume each node reads latest.pth from its own copy",
    "data_dir": "each node may read its own local copy of the shards",
    "shard_cache": "the shard cache is node-local",
    "shard_cache_max_gb": "the shard cache is node-local",
    "progress": "display only (rank 0's terminal)",
    "local_rank": "set per process by the seed's launcher, and ignored",
    "ddp": "accepted for the seed's launcher, and ignored",
}


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'."""
    spans, start = [], ranks[0]
    for prev, r in zip(ranks, ranks[1:] + [None]):
        if r is None or r != prev + 1:  # a span ends at prev
            spans.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = r
    return ("ranks " if len(ranks) > 1 else "rank ") + ", ".join(spans)


def differing_flags(configs: list[dict]) -> Optional[str]:
    """The one line naming the flags on which the ranks' resolved configs (one per rank, in rank order) differ,
    ``PER_NODE_FLAGS`` left out; None when they agree."""
    keys = [k for k in dict.fromkeys(k for c in configs for k in c) if k not in PER_NODE_FLAGS]
    parts = []
    for k in keys:
        values: dict[str, list[int]] = {}  # the value as the command line spells it -> the ranks given it
        for rank, c in enumerate(configs):
            v = c.get(k, "(unknown flag)")
            shown = " ".join(map(str, v)) if isinstance(v, list) else str(v)
            values.setdefault(shown, []).append(rank)
        if len(values) > 1:
            parts.append(f"--{k} " + ", ".join(f"{v} on {_ranks(rs)}" for v, rs in values.items()))
    if not parts:
        return None
    return f"the ranks were launched with different flags: {'; '.join(parts)}; launch every node with the same flags"


def check_same_flags(cfg: TrainConfig, world: int) -> None:
    """Every rank's resolved config against every other's, right after the process group forms: ranks that
    disagree would issue different collectives and wait on each other until ``--dist_timeout``. Raises the
    same :class:`ConfigError` on every rank."""
    configs: list = [None] * world
    dist.all_gather_object(configs, cfg.to_dict())
    line = differing_flags(configs)
    if line:
        raise ConfigError(line)


def setup_distributed(cfg: TrainConfig):
    """Rank, world size and device from the torchrun environment; NCCL on GPU, gloo on CPU. Collectives
    wait at most ``--dist_timeout`` seconds for a peer (gloo's default is 30 minutes, NCCL's 10). Ranks
    launched with different flags end at once, on every rank, with one line naming them."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)), world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.dist_timeout))
        where = announce(rank)  # for the roll call that names a lost peer (trainers.peers)
        print(f"rank {rank} of {world}: {where}, local rank {os.environ.get('LOCAL_RANK', 0)}", flush=True)
        if rank == 0 and restart_warning():
            print(restart_warning(), flush=True)
        check_same_flags(cfg, world)
    return rank, world, device


def reduce_sum(values: list[float], device, world: int) -> list[float]:
    """Sum across ranks; identity on one process."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def reduce_mean(values: list[float], device, world: int) -> list[float]:
    return [v / world for v in reduce_sum(values, device, world)]


# -- schedule, metrics, timing ------------------------------------------------------------------------
def seed_lr(cfg: TrainConfig, epoch: int) -> float:
    """The seed's ``adjust_learning_rate`` (epochs count from 1)."""
    if epoch <= cfg.warmup:
        return cfg.lr * epoch / (cfg.warmup + 1)
    if cfg.scheduler == "step":
        return cfg.lr * cfg.lr_decay ** sum(epoch > m for m in cfg.schedule)
    return cfg.lr * 0.5 * (1 + math.cos((epoch - 1) * math.pi / cfg.epoch))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Counts of top-k hits, as a tensor on the logits' device (no host sync)."""
    k = min(max(ks), logits.shape[1])
    hit = logits.topk(k, 1).indices.eq(labels[:, None])
    return torch.stack([hit[:, : min(kk, k)].any(1).sum() for kk in ks]).double()


class StepTimer:
    """Wall time of the epoch split into waiting for data and computing.

    On the CPU the host clock is the truth. On CUDA the step only *launches* work, so host clocks would
    call everything "compute": there each step's GPU time is taken with CUDA events (as airbench does),
    read once per log line, and waiting is the rest of the wall time.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = self.last = time.perf_counter()
        self.host_wait = 0.0
        self.gpu_ms = 0.0
        self._events: list = []

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.host_wait += now - self.last
        if self.cuda:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            self._events.append([begin, None])

    def step_done(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1][1] = end
        self.last = time.perf_counter()

    def read(self) -> tuple[float, float]:
        """(wall seconds, fraction of it spent waiting for data); on CUDA this synchronises once."""
        if self.cuda and self._events:
            self._events[-1][1].synchronize()  # the one sync, per log line
            self.gpu_ms += sum(b.elapsed_time(e) for b, e in self._events)
            self._events.clear()
        wall = max(time.perf_counter() - self.start, 1e-9)
        if self.cuda:
            return wall, min(1.0, max(0.0, 1.0 - self.gpu_ms / 1e3 / wall))
        return wall, min(1.0, self.host_wait / wall)


def progress_bar(cfg: TrainConfig, master: bool, **kw):
    """A tqdm bar on a terminal; off a terminal (CI, ``> log.txt``, a cluster job) none: carriage-return
    frames would pile up in one endless line, and the periodic log lines say the same."""
    enabled = cfg.progress and master and sys.stderr.isatty()
    return tqdm(dynamic_ncols=True, leave=False, unit="step", **kw) if enabled else None


# -- one step, one epoch, evaluation ----------------------------------------------------------------
def forward_loss(ddp_model, b, cfg: TrainConfig):
    """Logits and the loss of one batch: soft-target CE, plus RecursiveMix's ROI consistency term.

    With RecursiveMix the ROI head runs on every batch: where nothing was pasted (the first batch of an
    epoch) on the whole image with weight ``1 - lam = 0``. Its gradient is then zero, but every
    parameter takes part in every step, so DDP needs no ``find_unused_parameters`` search.
    """
    if cfg.aug != "recursive_mix":
        logits = ddp_model(b.images)
        loss = soft_target_cross_entropy(logits, b.targets)
        return logits, loss, loss.new_zeros(())
    boxes = b.boxes
    if boxes is None:
        h, w = b.images.shape[-2:]
        boxes = b.images.new_tensor([0.0, 0.0, w, h], dtype=torch.float32).expand(b.images.shape[0], 4)
    logits, roi_logits = ddp_model(b.images, boxes, share_fc=cfg.share_fc)
    loss = soft_target_cross_entropy(logits, b.targets)
    if b.history_logits is None:
        roi = roi_logits.sum() * 0.0
    else:
        roi = roi_consistency_loss(roi_logits, b.history_logits, b.lam, cfg.aug_omega)
    return logits, loss + roi, roi


def mixed_precision(amp: str, device: torch.device):
    """``(autocast, scaler)`` for ``--amp`` off / fp16 / bf16: a context factory for the forward pass and the
    gradient scaler (enabled for fp16 only). The CPU trains in full precision whatever ``amp`` says."""
    amp = amp if device.type == "cuda" else "off"
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16))
                if amp != "off" else nullcontext)
    return autocast, torch.amp.GradScaler("cuda", enabled=amp == "fp16")


def train_one_epoch(ddp_model, loader, optimizer, scaler, cfg: TrainConfig, epoch: int, state: RunState, *,
                    device: torch.device, world: int = 1, autocast=nullcontext, log: Callable = print,
                    should_stop: Optional[Callable[[], bool]] = None, master: bool = True) -> dict:
    """Train over ``loader`` (any iterable of :class:`rmix.MixedBatch`; ``loader.record_logits`` receives
    each step's logits when it has one) and return the epoch's reduced metrics.

    Metrics accumulate on the device (``state.meters``, continued when a resume set them) and are read once
    per ``print_freq`` steps. Raises :class:`Stop` when ``should_stop()`` says so (a signal, a step budget),
    with ``state.meters`` still holding the epoch's sums.
    """
    record = getattr(loader, "record_logits", None)
    ddp_model.train()
    lr = optimizer.param_groups[0]["lr"]
    if state.meters is None:
        state.meters = torch.zeros(len(METERS), dtype=torch.float64, device=device)
    sums_dev = state.meters
    counted_before = sums_dev[4].item()  # samples of a resumed epoch before this run: not in its img/s
    timer = StepTimer(device)
    total = len(loader) if hasattr(loader, "__len__") else None
    start = getattr(loader, "position", 0)
    bar = progress_bar(cfg, master, total=total, initial=start, desc=f"epoch {epoch}/{cfg.epoch}")
    for b in loader:
        timer.data_ready()
        with autocast():
            logits, loss, roi = forward_loss(ddp_model, b, cfg)
        if record is not None:
            record(logits.detach())  # the history triplet's prediction
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        n = b.labels.shape[0]
        sums_dev += torch.cat([torch.stack([loss.detach(), roi.detach()]).double() * n,
                               topk_correct(logits.detach(), b.labels), sums_dev.new_tensor([n])])
        timer.step_done()
        if bar is not None:
            bar.update(1)
        if state.step % cfg.print_freq == 0:
            s = sums_dev.tolist()  # the one host sync, every print_freq steps
            wall, wait = timer.read()
            pos = getattr(loader, "position", "?")
            log(f"Epoch [{epoch}/{cfg.epoch}][{pos}/{total}]\tlr {lr:.6f}\tLoss {s[0] / s[4]:.4f}\t"
                f"ROI {s[1] / s[4]:.4f}\tAcc@1 {100 * s[2] / s[4]:.2f}\tAcc@5 {100 * s[3] / s[4]:.2f}\t"
                f"{(s[4] - counted_before) * world / wall:.0f} img/s\tdata-wait {100 * wait:.1f}%")
        if should_stop is not None and should_stop():
            if bar is not None:
                bar.close()
            raise Stop()
    if bar is not None:
        bar.close()
    s = sums_dev.tolist()
    state.meters = None
    wall, wait = timer.read()
    n = max(s[4], 1)
    loss, roi, acc1, acc5, img_s, wait = reduce_mean(
        [s[0] / n, s[1] / n, 100 * s[2] / n, 100 * s[3] / n, (s[4] - counted_before) * world / wall, wait],
        device, world)
    return dict(lr=lr, train_loss=loss, roi_loss=roi, train_acc1=acc1, train_acc5=acc5, img_per_s=img_s,
                data_wait=wait)


@torch.no_grad()
def evaluate(ddp_model, loader, device: torch.device, world: int = 1, autocast=nullcontext) -> tuple[float, float, int]:
    """Top-1 / top-5 accuracy in percent over the whole split, and the number of samples counted: each
    sample counts once across ranks, so it is the split's size."""
    ddp_model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with autocast():
        for b in loader:
            sums[:2] += topk_correct(ddp_model(b.images), b.labels)
            sums[2] += b.labels.shape[0]
    c1, c5, n = reduce_sum(sums.tolist(), device, world)
    return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1), int(n)


# -- building blocks of run() -----------------------------------------------------------------------
def build_train_mix(cfg: TrainConfig, num_classes: int, rank: int):
    """The ``--aug`` mix with the seed's arguments and this rank's own generator."""
    kw = dict(num_classes=num_classes, smoothing=cfg.smoothing, seed=derive_seed(cfg.random_seed, rank, 0, "mix"))
    if cfg.aug == "recursive_mix":
        kw.update(alpha=cfg.aug_alpha, interpolation=cfg.interpolate_mode, box=cfg.rm_box,
                  keep_history_across_epochs=cfg.keep_history)
    elif cfg.aug != "none":
        kw.update(alpha=cfg.aug_alpha)
    return build_mix(cfg.aug, **kw)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


#: what a run leaves in its folder: a fresh run into a folder holding any of them is refused
RUN_FILES = ("latest.pth", "best.pth", "metrics.csv")


def resolve_resume(cfg: TrainConfig, out_dir: Path, world: int) -> str:
    """``--resume`` as given, except ``auto``: ``latest`` when the run folder holds one, else "" (a fresh
    start). A fresh start into a folder that holds a run (``RUN_FILES``) is a :class:`ConfigError`: it would
    replace that run's checkpoints and log. Rank 0 looks (only it writes there) and every rank follows, so
    the ranks never disagree on whether they resume, or all refuse together."""
    decided = [cfg.resume, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        if cfg.resume == "auto":
            decided[0] = "latest" if cfg.evaluate or resolve_path(out_dir, "latest").is_file() else ""
        held = [name for name in RUN_FILES if (out_dir / name).exists()]
        if not decided[0] and held:
            decided[1] = (f"{out_dir} holds a run ({', '.join(held)}): continue it with --resume latest, "
                          "or start another with another --name")
    if world > 1:
        dist.broadcast_object_list(decided, src=0)
    if decided[1]:
        raise ConfigError(decided[1])
    return decided[0]


#: decimals of each metrics.csv column (lr: significant digits instead); the values stay those the run
#: computed, rounded once here, so a resumed run's rows equal the uninterrupted run's
CSV_DECIMALS = {"train_loss": 6, "roi_loss": 6, "train_acc1": 4, "train_acc5": 4, "img_per_s": 1, "data_wait": 4,
                "val_acc1": 4, "val_acc5": 4}


def metrics_row(row: dict) -> dict:
    """``row`` as metrics.csv holds it: percentages to 4 decimals, losses to 6, lr to 8 significant digits
    (float32 noise such as 0.05999999865889549 does not reach the file)."""
    out = {}
    for k, v in row.items():
        if k == "lr":
            v = float(f"{v:.8g}")
        elif k in CSV_DECIMALS:
            v = round(v, CSV_DECIMALS[k])
        out[k] = v
    return out


def append_metrics(path: Path, row: dict) -> None:
    row = metrics_row(row)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv=None, cfg: Optional[TrainConfig] = None) -> None:
    """``rmix train`` / ``python -m trainers.classify``: parse ``argv`` (unless ``cfg`` is given), train, and
    exit with the status the module header lists."""
    if cfg is None:
        cfg = parse_or_exit(argv)
    try:
        result = run(cfg)
    except KeyboardInterrupt:  # Ctrl-C before training began (nothing to save) or a second one during it
        print("rmix train: interrupted; latest.pth was not saved by this run", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except (ConfigError, ShardError, CheckpointError) as e:
        if dist.is_initialized():
            dist.destroy_process_group()  # before the interpreter's exit tears gloo's threads down
        exit_line(f"rmix train: {e}")
    except Exception as e:
        if not (dist.is_initialized() and is_peer_failure(e)):
            raise
        # a peer died or hung: name it and leave (SIGTERM's default action is back, so torchrun can stop us)
        rank, grace = dist.get_rank(), min(5.0, cfg.dist_timeout)
        silent = roll_call(rank, dist.get_world_size(), grace)
        if silent == {}:
            raise  # every rank is alive: a failure of the collective itself, with its traceback
        print(lost_line(rank, e, silent, grace), file=sys.stderr, flush=True)
        sys.exit(EXIT_PEER_LOST)
    if result.get("preempted"):
        sys.exit(EXIT_INTERRUPTED if result["preempted"] == "SIGINT" else EXIT_PREEMPTED)


def exit_line(message: str) -> None:
    """``sys.exit(message)``; under DDP the line is written in one piece first, then status 1: the interpreter
    writes an exit message and its newline apart, and another rank's line sharing stderr can land between."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.write(2, f"{message}\n".encode())
        sys.exit(1)
    sys.exit(message)


def run(cfg: TrainConfig) -> dict:
    # -- distributed, seeds, output folder ------------------------------------------------------
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    random.seed(cfg.random_seed)
    np.random.seed(cfg.random_seed)
    torch.manual_seed(cfg.random_seed)
    log = (lambda msg: print(msg, flush=True)) if master else (lambda msg: None)
    log(f"rmix train: {json.dumps(cfg.to_dict())}")  # the resolved config, as torchvision's print(args)
    out_dir = Path(cfg.save_dir) / cfg.data / cfg.name
    resume = resolve_resume(cfg, out_dir, world)

    # -- data: the loaders own the mix and its history ------------------------------------------
    manifest = load_manifest(cfg.data_dir, cfg.remote())  # a folder, or a URL (shards/remote.py)
    if manifest["dataset"] != cfg.data:
        raise ConfigError(f"--data {cfg.data} but {cfg.data_dir} holds {manifest['dataset']}")
    num_classes = manifest["num_classes"]
    if cfg.batch_size % world:
        raise ConfigError(f"--batch_size {cfg.batch_size} is not divisible by the world size {world}")
    per_rank = cfg.batch_size // world
    n_train = int(manifest["splits"].get("train", {}).get("num_samples", 0))
    if n_train // world < per_rank:  # before a loader is built: DALI's own message names neither flag nor split
        raise ConfigError(f"--batch_size {cfg.batch_size} is larger than the train split ({n_train} samples over "
                          f"{world} rank(s)): no training step would run")
    preset = ("imagenet_train_plus" if cfg.aug_plus else "imagenet_train") if cfg.data == "imagenet" else None
    common = dict(backend=cfg.loader, device=device, rank=rank, world_size=world, seed=cfg.random_seed,
                  channels_last=cfg.channels_last, num_workers=max(1, -(-cfg.num_workers // world)),
                  remote=cfg.remote())
    try:  # a loader's ValueError is its one line on what it cannot read (pipelines.loader)
        train_loader = build_loader(manifest, "train", batch_size=per_rank, train=True, preset=preset,
                                    mix=build_train_mix(cfg, num_classes, rank), **common)
        val_loader = build_loader(manifest, "val", batch_size=per_rank, train=False, **common)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    # -- model, optimizer, precision -------------------------------------------------------------
    try:
        model = build_model(cfg.model_file, cfg.model_name, num_classes, imagenet=cfg.data == "imagenet").to(device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.aug != "recursive_mix" or cfg.share_fc:
        model.fc_roi.requires_grad_(False)  # never used: out of the optimizer and of DDP's reduction
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    optimizer = build_optimizer(cfg, model)
    autocast, scaler = mixed_precision(cfg.amp, device)

    # -- resume ----------------------------------------------------------------------------------
    state, start_epoch, mid_epoch = RunState(), 1, False
    # torchrun --max-restarts restarted this node's workers (counted per node: the other nodes' agents restart
    # theirs too, with their count unchanged, so each rank says it for itself)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if restart and not resume:
        print(f"rank {rank}: torchrun restart {restart} without --resume: training starts over "
              f"(--resume auto continues from {out_dir / 'latest.pth'})", flush=True)
    if resume:
        path = resolve_path(out_dir, resume)
        ckpt = load_checkpoint(path, map_location=device)
        load_model_state(model, ckpt, path, cfg.to_dict())
        if cfg.evaluate:  # weights are all an evaluation needs
            acc1, acc5, _ = evaluate(ddp_model, val_loader, device, world, autocast)
            log(f"Epoch(val) [{ckpt['epoch']}]\tTest Acc@1: {acc1:.4f}\tTest Acc@5: {acc5:.4f}")
            return {"acc1": acc1, "acc5": acc5}
        check_resume_flags(ckpt, path, cfg.to_dict())
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state.step, state.best = ckpt["step"], ckpt["best"]
        loader_state = ckpt["loader"][rank] if len(ckpt["loader"]) == world else None
        mid_epoch = ckpt["mid_epoch"] and loader_state is not None
        if ckpt["mid_epoch"] and not mid_epoch:  # loader states are per rank: another world size cannot use them
            log(f"=> {path} was saved mid-epoch {ckpt['epoch']} by {len(ckpt['loader'])} rank(s), this run has "
                f"{world}: the rest of epoch {ckpt['epoch']} is skipped, training continues with epoch "
                f"{ckpt['epoch'] + 1}")
        if loader_state is not None:
            train_loader.load_state_dict(loader_state)
        if mid_epoch and ckpt.get("meters"):
            state.meters = torch.tensor(ckpt["meters"][rank], dtype=torch.float64, device=device)
        set_rng_state(ckpt["rng"])
        start_epoch = ckpt["epoch"] if mid_epoch else ckpt["epoch"] + 1
        log(f"=> resumed {path} (epoch {ckpt['epoch']}{', mid-epoch' if mid_epoch else ''}, step {state.step})")

    # the run folder is written once the run is known to train: a refused resume or an evaluation leaves it as it was
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    def save(name: str, epoch: int, in_epoch: bool) -> None:
        """Rank 0 writes; every rank's loader state (reader position, mix history) goes in, and mid-epoch
        every rank's running sums of the epoch (``meters``)."""
        mine = (train_loader.state_dict(), state.meters.tolist() if in_epoch and state.meters is not None else None)
        ranks = [mine]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        if master:
            save_checkpoint(out_dir / f"{name}.pth", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": state.step, "mid_epoch": in_epoch, "best": state.best,
                "loader": [r[0] for r in ranks], "meters": [r[1] for r in ranks] if in_epoch else None,
                "rng": rng_state(), "config": cfg.to_dict()})

    # SIGTERM or Ctrl-C asks for a save at the next step; the caller's handlers come back when run() returns (a
    # handler left behind would be inherited by every process forked later and make it unkillable)
    def on_signal(signum, frame) -> None:
        if signum == signal.SIGINT and state.stop_signal:
            raise KeyboardInterrupt  # a second Ctrl-C: the user will not wait for the save
        state.stop_signal = state.stop_signal or signal.Signals(signum).name

    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}

    def should_stop() -> bool:
        """A stop signal or the step budget. With DDP every rank must stop at the same step (the save
        gathers every rank's loader state), so ranks agree on the flag every 20 steps."""
        if cfg.stop_after_steps and state.step >= cfg.stop_after_steps:
            return True
        if world == 1:
            return bool(state.stop_signal)
        if state.step % 20:
            return False
        flag = torch.tensor([float(bool(state.stop_signal))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not state.stop_signal:
            state.stop_signal = "a signal to another rank"  # this rank saves and exits as preempted too
        return bool(flag.item())

    metrics_path = out_dir / "metrics.csv"  # a fresh run finds none (resolve_resume); a resumed run appends
    tb = None
    if master:
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: only when tensorboard is installed
            tb = SummaryWriter(str(out_dir / "tb"))
        except ImportError:
            pass

    # -- epochs ----------------------------------------------------------------------------------
    result: dict = {}
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epoch + 1):
            if not (mid_epoch and epoch == start_epoch):
                train_loader.set_epoch(epoch)
            for g in optimizer.param_groups:
                g["lr"] = seed_lr(cfg, epoch)
            row = train_one_epoch(ddp_model, train_loader, optimizer, scaler, cfg, epoch, state, device=device,
                                  world=world, autocast=autocast, log=log, should_stop=should_stop, master=master)
            mid_epoch = False
            save("latest", epoch, in_epoch=False)
            acc1, acc5, n_val = evaluate(ddp_model, val_loader, device, world, autocast)
            if acc1 >= state.best["acc1"]:
                state.best = {"acc1": acc1, "acc5": acc5, "epoch": epoch}
                if cfg.save_model:
                    save("best", epoch, in_epoch=False)
            row = dict(epoch=epoch, **row, val_acc1=acc1, val_acc5=acc5, val_samples=n_val)
            result = dict(row, best_acc1=state.best["acc1"], best_acc5=state.best["acc5"], step=state.step)
            if master:
                append_metrics(metrics_path, row)
                for k, v in row.items():
                    if tb is not None:
                        tb.add_scalar(k, v, epoch)
            log(f"Epoch(val) [{epoch}]\tTest Acc@1: {acc1:.4f}\tTest Acc@5: {acc5:.4f}\t"
                f"Best Acc@1: {state.best['acc1']:.4f}\tBest Acc@5: {state.best['acc5']:.4f}\t"
                f"loss {row['train_loss']:.4f}\t{row['img_per_s']:.0f} img/s\tdata-wait {100 * row['data_wait']:.1f}%")
    except Stop:
        save("latest", epoch, in_epoch=train_loader.position > 0)
        how = state.stop_signal or f"--stop_after_steps {cfg.stop_after_steps}"
        log(f"=> stopped at step {state.step} ({how}); saved {out_dir / 'latest.pth'} (resume with --resume latest)")
        result = {"stopped_at_step": state.step, **({"preempted": state.stop_signal} if state.stop_signal else {})}
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if world > 1:
        print(f"rank {rank}: final {json.dumps({k: round(v, 6) for k, v in result.items()})}", flush=True)
        dist.destroy_process_group()
    log(f"Exp path: {out_dir}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
