"""Lean DDP classification trainer with the seed's command line.

    torchrun --nproc_per_node=N -m trainers.classify <the seed's flags>
    rmix train <the seed's flags>                       # one process

Reads top to bottom: config -> distributed -> data (loaders own the mix) -> model -> optimizer ->
resume -> (evaluate) -> epochs of train / checkpoint / eval. Only rank 0 writes logs and checkpoints;
metrics are reduced across ranks. The learning rate follows the seed's per-epoch schedule (linear
warm-up, then step or cosine). With ``--aug recursive_mix`` the loss is the soft-target CE plus
``omega * (1 - lam) * CE(roi_logits, softmax(history logits))`` and the logits of every step are
recorded into the mix as the next step's history.
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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipelines import build_loader
from rmix import build_mix, soft_target_cross_entropy
from rmix.losses import roi_loss_or_zero
from shards.errors import ShardError
from shards.manifest import load_manifest

from .config import ConfigError, TrainConfig, parse_config
from .models import build_model


class Stop(Exception):
    """Raised inside the epoch loop when the run must save ``latest`` and exit (SIGTERM, a step budget)."""


def setup_distributed(cfg: TrainConfig):
    """Rank, world size and device from the torchrun environment; NCCL on GPU, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def reduce_mean(values: list[float], device, world: int) -> list[float]:
    """Average across ranks (sum then divide); identity on one process."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def reduce_sum(values: list[float], device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


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


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def main(argv=None) -> None:
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ConfigError, ShardError, FileNotFoundError) as e:
        sys.exit(f"rmix train: {e}")


def run(cfg: TrainConfig) -> dict:
    # -- distributed, seeds, output folder ------------------------------------------------------
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    random.seed(cfg.random_seed)
    np.random.seed(cfg.random_seed)
    torch.manual_seed(cfg.random_seed)
    out_dir = Path(cfg.save_dir) / cfg.data / cfg.name
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    log = (lambda msg: print(msg, flush=True)) if master else (lambda msg: None)

    # -- data: the loaders own the mix and its history ------------------------------------------
    manifest = load_manifest(cfg.data_dir)
    if manifest["dataset"] != cfg.data:
        raise ConfigError(f"--data {cfg.data} but {cfg.data_dir} holds {manifest['dataset']}")
    num_classes = manifest["num_classes"]
    if cfg.batch_size % world:
        raise ConfigError(f"--batch_size {cfg.batch_size} is not divisible by the world size {world}")
    per_rank_batch = cfg.batch_size // world
    workers = max(1, (cfg.num_workers + world - 1) // world)
    mix_kw = dict(num_classes=num_classes, smoothing=cfg.smoothing, seed=cfg.random_seed * 1000 + rank)
    if cfg.aug == "recursive_mix":
        mix_kw.update(alpha=cfg.aug_alpha, interpolation=cfg.interpolate_mode, box=cfg.rm_box,
                      keep_history_across_epochs=cfg.keep_history)
    elif cfg.aug != "none":
        mix_kw.update(alpha=cfg.aug_alpha)
    mix = build_mix(cfg.aug, **mix_kw)
    preset = ("imagenet_train_plus" if cfg.aug_plus else "imagenet_train") if cfg.data == "imagenet" else None
    dtype = "float32"
    common = dict(backend=cfg.loader, device=device, rank=rank, world_size=world, seed=cfg.random_seed,
                  channels_last=cfg.channels_last, dtype=dtype, num_workers=workers)
    train_loader = build_loader(manifest, "train", batch_size=per_rank_batch, train=True, mix=mix, preset=preset, **common)
    val_loader = build_loader(manifest, "val", batch_size=per_rank_batch, train=False, **common)

    # -- model, optimizer, precision -------------------------------------------------------------
    model = build_model(cfg.model_file, cfg.model_name, num_classes, imagenet=cfg.data == "imagenet").to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=True) if world > 1 else model  # fc_roi idles on batches without a box
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = cfg.amp if device.type == "cuda" else "off"  # CPU trains in full precision
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16 if amp == "fp16" else torch.bfloat16)) \
        if amp != "off" else nullcontext
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")

    def evaluate(epoch: int) -> tuple[float, float]:
        model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        with torch.no_grad(), autocast():
            for b in val_loader:
                sums[:2] += topk_correct(ddp_model(b.images), b.labels)
                sums[2] += b.labels.shape[0]
        c1, c5, n = reduce_sum(sums.tolist(), device, world)  # eval sees each sample once across ranks: exact
        return 100.0 * c1 / max(n, 1), 100.0 * c5 / max(n, 1)

    def evaluate_only(epoch: int) -> tuple[float, float]:
        acc1, acc5 = evaluate(epoch)
        log(f"Epoch(val) [{epoch}]\tTest Acc@1: {acc1:.4f}\tTest Acc@5: {acc5:.4f}")
        return acc1, acc5

    # -- resume ----------------------------------------------------------------------------------
    start_epoch, step, best = 1, 0, {"acc1": 0.0, "acc5": 0.0, "epoch": 0}
    mid_epoch = False
    if cfg.resume:
        path = out_dir / f"{cfg.resume}.pth" if cfg.resume in ("best", "latest") else Path(cfg.resume)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path} (--resume {cfg.resume})")
        ckpt = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        if cfg.evaluate:  # weights are all an evaluation needs
            acc1, acc5 = evaluate_only(ckpt["epoch"])
            return {"acc1": acc1, "acc5": acc5}
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, best = ckpt["step"], ckpt["best"]
        loader_state = ckpt["loader"][rank] if len(ckpt["loader"]) == world else None
        mid_epoch = ckpt["mid_epoch"] and loader_state is not None
        if loader_state is not None:
            train_loader.load_state_dict(loader_state)
        set_rng_state(ckpt["rng"])
        start_epoch = ckpt["epoch"] if mid_epoch else ckpt["epoch"] + 1
        log(f"=> resumed {path} (epoch {ckpt['epoch']}{', mid-epoch' if mid_epoch else ''}, step {step})")

    # -- checkpoints: the unwrapped model, and every rank's loader state -------------------------
    def save(name: str, epoch: int, in_epoch: bool) -> None:
        loader_states = [train_loader.state_dict()]
        if world > 1:  # each rank's loader (DALI reader position, mix history) is part of the run
            gathered = [None] * world
            dist.all_gather_object(gathered, loader_states[0])
            loader_states = gathered
        if not master:
            return
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "mid_epoch": in_epoch, "best": best, "loader": loader_states,
                "rng": rng_state(), "config": cfg.to_dict()}
        tmp = out_dir / f"{name}.pth.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, out_dir / f"{name}.pth")  # a kill during the write never leaves a torn file

    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))

    def should_stop() -> bool:
        """SIGTERM or the step budget. With DDP every rank must stop at the same step (the save
        gathers every rank's loader state), so ranks agree on the flag every 20 steps."""
        if cfg.stop_after_steps and step >= cfg.stop_after_steps:
            return True
        if world == 1:
            return stop["flag"]
        if step % 20:
            return False
        flag = torch.tensor([float(stop["flag"])], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    metrics_path = out_dir / "metrics.csv"
    if master and not cfg.resume and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: only when tensorboard is installed
        tb = SummaryWriter(str(out_dir / "tb")) if master else None
    except ImportError:
        tb = None

    # -- epochs ----------------------------------------------------------------------------------
    result = {}
    try:
        for epoch in range(start_epoch, cfg.epoch + 1):
            if not (mid_epoch and epoch == start_epoch):
                train_loader.set_epoch(epoch)
            lr = seed_lr(cfg, epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr
            model.train()
            # loss*n, roi loss*n, correct@1, correct@5, n: accumulated on the device, read at log time
            sums_dev = torch.zeros(5, dtype=torch.float64, device=device)
            wait = compute = 0.0
            t_last = time.perf_counter()
            bar = tqdm(total=len(train_loader), initial=train_loader.position, disable=not master,
                       desc=f"epoch {epoch}/{cfg.epoch}", unit="step", dynamic_ncols=True, leave=False)
            for b in train_loader:
                t_data = time.perf_counter()
                with autocast():
                    if b.boxes is not None and cfg.aug == "recursive_mix":
                        logits, roi_logits = ddp_model(b.images, b.boxes, share_fc=cfg.share_fc)
                    else:
                        logits, roi_logits = ddp_model(b.images), None
                    main_loss = soft_target_cross_entropy(logits, b.targets)
                    roi_loss = roi_loss_or_zero(roi_logits, b.history_logits, b.lam, cfg.aug_omega)
                    loss = main_loss + roi_loss
                train_loader.mix.record_logits(logits.detach())  # the history triplet's prediction
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                n = b.labels.shape[0]
                sums_dev += torch.cat([torch.stack([loss.detach(), roi_loss.detach()]).double() * n,
                                       topk_correct(logits.detach(), b.labels), sums_dev.new_tensor([n])])
                t_end = time.perf_counter()
                wait += t_data - t_last
                compute += t_end - t_data
                t_last = t_end
                bar.update(1)
                if step % cfg.print_freq == 0:
                    sums = sums_dev.tolist()  # the one host sync, every print_freq steps
                    log(f"Epoch [{epoch}/{cfg.epoch}][{train_loader.position}/{len(train_loader)}]\tlr {lr:.6f}\t"
                        f"Loss {sums[0] / sums[4]:.4f}\tROI {sums[1] / sums[4]:.4f}\tAcc@1 {100 * sums[2] / sums[4]:.2f}\t"
                        f"Acc@5 {100 * sums[3] / sums[4]:.2f}\t{sums[4] * world / max(wait + compute, 1e-9):.0f} img/s\t"
                        f"data-wait {100 * wait / max(wait + compute, 1e-9):.1f}%")
                if should_stop():
                    raise Stop()
            bar.close()
            sums = sums_dev.tolist()
            mid_epoch = False
            loss_avg, roi_avg, acc1_t, acc5_t, img_s, wait_frac = reduce_mean(
                [sums[0] / max(sums[4], 1), sums[1] / max(sums[4], 1), 100 * sums[2] / max(sums[4], 1),
                 100 * sums[3] / max(sums[4], 1), sums[4] * world / max(wait + compute, 1e-9),
                 wait / max(wait + compute, 1e-9)], device, world)
            save("latest", epoch, in_epoch=False)
            acc1, acc5 = evaluate(epoch)
            if acc1 >= best["acc1"]:
                best = {"acc1": acc1, "acc5": acc5, "epoch": epoch}
                if cfg.save_model:
                    save("best", epoch, in_epoch=False)
            row = dict(epoch=epoch, lr=lr, train_loss=loss_avg, roi_loss=roi_avg, train_acc1=acc1_t,
                       train_acc5=acc5_t, val_acc1=acc1, val_acc5=acc5, img_per_s=img_s, data_wait=wait_frac)
            result = dict(row, best_acc1=best["acc1"], best_acc5=best["acc5"])
            if master:
                new = not metrics_path.exists()
                with open(metrics_path, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        w.writeheader()
                    w.writerow(row)
                if tb is not None:
                    for k, v in row.items():
                        tb.add_scalar(k, v, epoch)
            log(f"Epoch(val) [{epoch}]\tTest Acc@1: {acc1:.4f}\tTest Acc@5: {acc5:.4f}\tBest Acc@1: {best['acc1']:.4f}\t"
                f"Best Acc@5: {best['acc5']:.4f}\tloss {loss_avg:.4f}\t{img_s:.0f} img/s\t"
                f"data-wait {100 * row['data_wait']:.1f}%")
    except Stop:
        save("latest", epoch, in_epoch=train_loader.position > 0)
        log(f"=> stopped at step {step}; saved {out_dir / 'latest.pth'} (resume with --resume latest)")
        result = {"stopped_at_step": step}
    if world > 1:
        print(f"rank {rank}: final {json.dumps({k: round(v, 6) for k, v in result.items()})}", flush=True)
        dist.destroy_process_group()
    log(f"Exp path: {out_dir}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
