"""``rmix bench dense``: our DALI detection / segmentation loaders vs mmdet's / mmseg's own DataLoader pipelines.

Data (generated once under ``--work``): ``--images`` 640x480 JPEGs cut from real photographs
(``tools.photos``), written twice in the real layouts: COCO (``train2017/`` + ``instances_train2017.json``,
1-5 random boxes per image, 3 categories) and ADE20K (``images/training`` + ``annotations/training`` label
maps of random rectangles, 0 = "other").

Rows, per task, the median of ``--repeats`` timed epochs after a warm-up epoch, with the min-max spread; the
four loaders of a task run side by side, one epoch each per round (``tools.timing.measure_side_by_side``), and
RM's cost is the median over rounds of each round's own ratio, printed with its range:

* stock: mmdet's ``CocoDataset`` with ATSS's train pipeline (``Resize(1333, 800)``, ``RandomFlip``,
  ``PackDetInputs``) / mmseg's ``ADE20KDataset`` with UPerNet's (``RandomResize(2048x512, 0.5-2.0)``,
  ``RandomCrop(512)``, ``RandomFlip``, ``PhotoMetricDistortion``, ``PackSegInputs``), in mmengine's
  DataLoader as the configs build it (``DefaultSampler``, ``pseudo_collate``, ``--workers`` persistent
  workers; detection with ``AspectRatioBatchSampler``);
* ours: :class:`pipelines.dali_det.CocoDaliLoader` / :class:`pipelines.dali_seg.ADE20KDaliLoader` with the
  same parameters, ``--workers`` DALI threads;
* each with dense RecursiveMix off and on (alpha 0.5). The stock loader with RM pads and stacks each
  collated batch (as a data preprocessor would) and runs the same mix, so both rows pay for the mix alike.

Images/s and images per CPU-second of the whole process tree (``tools.timing.measure``: DataLoader workers
and DALI threads included). Prints a table and the two ratios the design goals are stated in (DALI /
stock per CPU-second, the cost of RM on our loader), and writes ``dense.json``. DALI runs ahead of its
consumer (``prefetch_queue_depth=2``), so at the end of an epoch it decodes two batches of the next one while
the next job is timed: a DALI row is that much faster, and the job after it that much slower and costlier,
than either would be alone (2 of 24 batches at the defaults). Training sees the same overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from tools.timing import cost_in_words, measure_side_by_side, paired

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}, {"id": 3, "name": "car"}]
CLASSES = tuple(c["name"] for c in CATEGORIES)
SIZE = (480, 640)  # h, w


def write_data(root: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """COCO and ADE20K layouts over the same ``n`` photograph crops; a finished set is reused."""
    from PIL import Image

    from tools.photos import photo_crop, source_photographs

    coco, ade = root / "coco", root / "ade" / "ADEChallengeData2016"
    done = root / f"done_{n}"
    if done.is_file():
        return coco, ade
    rng = np.random.default_rng(seed)
    photos = source_photographs()
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    (coco / "train2017").mkdir(parents=True, exist_ok=True)
    (ade / "images" / "training").mkdir(parents=True, exist_ok=True)
    (ade / "annotations" / "training").mkdir(parents=True, exist_ok=True)
    h, w = SIZE
    images, anns = [], []
    for i in range(1, n + 1):
        img = photo_crop(rng, photos, (640, 640)).resize((w, h))
        name = f"{i:012d}.jpg"
        img.save(coco / "train2017" / name, quality=90)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        label = np.zeros((h, w), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 6))):
            bw, bh = int(rng.integers(32, w // 2)), int(rng.integers(32, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 4)),
                         "bbox": [x, y, bw, bh], "area": float(bw * bh), "iscrowd": 0})
            label[y:y + bh, x:x + bw] = int(rng.integers(1, 151))
        stem = f"ADE_train_{i:08d}"
        img.save(ade / "images" / "training" / f"{stem}.jpg", quality=90)
        Image.fromarray(label).save(ade / "annotations" / "training" / f"{stem}.png")
    doc = {"info": {}, "licenses": [], "images": images, "annotations": anns,
           "categories": [dict(c, supercategory="none") for c in CATEGORIES]}
    (coco / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    done.write_text("ok\n")
    return coco, ade


# -- loaders ---------------------------------------------------------------------------------------

def stock_loader(task: str, root: Path, batch: int, workers: int):
    """mmdet's / mmseg's own train DataLoader, built by mmengine from the stock pipeline."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    if task == "det":
        init_default_scope("mmdet")
        pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                    dict(type="Resize", scale=(1333, 800), keep_ratio=True), dict(type="RandomFlip", prob=0.5),
                    dict(type="PackDetInputs")]
        dataset = dict(type="CocoDataset", data_root=str(root) + "/", ann_file="annotations/instances_train2017.json",
                       data_prefix=dict(img="train2017/"), metainfo=dict(classes=CLASSES),
                       filter_cfg=dict(filter_empty_gt=True, min_size=32), pipeline=pipeline)
        extra = dict(batch_sampler=dict(type="AspectRatioBatchSampler"))
    else:
        init_default_scope("mmseg")
        pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
                    dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
                    dict(type="RandomCrop", crop_size=(512, 512), cat_max_ratio=0.75),
                    dict(type="RandomFlip", prob=0.5), dict(type="PhotoMetricDistortion"), dict(type="PackSegInputs")]
        dataset = dict(type="ADE20KDataset", data_root=str(root),
                       data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
                       pipeline=pipeline)
        extra = {}
    cfg = dict(batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
               sampler=dict(type="DefaultSampler", shuffle=True), dataset=dataset, **extra)
    return Runner.build_dataloader(cfg, seed=0)


def dali_loader(task: str, root: Path, batch: int, workers: int, device, mix):
    if task == "det":
        from pipelines.dali_det import CocoDaliLoader

        return CocoDaliLoader(root / "train2017", root / "annotations" / "instances_train2017.json", CLASSES,
                              batch_size=batch, train=True, device=device, num_threads=workers, mix=mix)
    from pipelines.dali_seg import ADE20KDaliLoader

    return ADE20KDaliLoader(root / "images" / "training", root / "annotations" / "training", batch_size=batch,
                            train=True, device=device, num_threads=workers, mix=mix)


class TimedMix:
    """A mix that adds up the wall time of its calls (``seconds``, ``calls``); everything else is the mix's."""

    def __init__(self, mix):
        self.mix, self.seconds, self.calls = mix, 0.0, 0

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.mix(*args)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def __getattr__(self, name):
        return getattr(self.mix, name)


def make_mix(task: str, on: bool):
    if not on:
        return None
    from rmix.dense import DetRecursiveMix, SegRecursiveMix

    return TimedMix(DetRecursiveMix(alpha=0.5, seed=0) if task == "det" else SegRecursiveMix(alpha=0.5, seed=0))


def _pad_stack(tensors, fill, divisor: int = 1):
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    h, w = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    out = tensors[0].new_full((len(tensors), *tensors[0].shape[:-2], h, w), fill)
    for i, t in enumerate(tensors):
        out[i, ..., :t.shape[-2], :t.shape[-1]] = t
    return out


def stock_mix(task: str, batch: dict, mix, device) -> None:
    """The collated stock batch, padded and stacked on ``device`` as a preprocessor would, through ``mix``."""
    inputs = [x.to(device) for x in batch["inputs"]]
    if task == "det":
        images = _pad_stack(inputs, 0, 32)
        boxes = [s.gt_instances.bboxes.tensor.to(device) for s in batch["data_samples"]]
        labels = [s.gt_instances.labels.to(device) for s in batch["data_samples"]]
        mix(images, boxes, labels)
    else:
        images = _pad_stack(inputs, 0)
        seg = _pad_stack([s.gt_sem_seg.data[0].to(device) for s in batch["data_samples"]], 255)
        mix(images, seg)


def epoch_job(loader, task: str, mix=None, device="cpu"):
    def run():
        n = 0
        for batch in loader:
            if mix is not None:
                stock_mix(task, batch, mix, device)
            n += len(batch["inputs"])
        return n
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="rmix bench dense", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="bench-data/dense", help="where the benchmark images are written (reused)")
    p.add_argument("--out", default="bench-results", help="dense.json goes here")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="DataLoader workers of the stock loaders and DALI threads of ours")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--tasks", nargs="+", default=["det", "seg"], choices=["det", "seg"])
    args = p.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    from pipelines.loader import resolve_device

    device = resolve_device(args.device)
    coco, ade = write_data(Path(args.work), args.images)
    rows, summary = [], {}
    for task in args.tasks:
        root = coco if task == "det" else ade
        # all four loaders of a task side by side, round by round: RM's cost is paired per round
        jobs = {}
        for rm in (False, True):
            jobs["stock", rm] = epoch_job(stock_loader(task, root, args.batch, args.workers), task,
                                          make_mix(task, rm), device)
            ours_mix = make_mix(task, rm)
            jobs["dali", rm] = epoch_job(dali_loader(task, root, args.batch, args.workers, device, ours_mix), task)
        cells = measure_side_by_side(jobs, args.repeats, device)
        del jobs
        for (loader, rm), t in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0] == "dali")):
            lo, hi = t.spread
            rows.append(dict(task=task, loader=loader, rm=rm, img_s=t.per_s, img_s_min=lo, img_s_max=hi,
                             img_cpu_s=t.per_cpu_s, images=t.items, walls=t.walls, cpus=t.cpus))
            print(f"{task:3s}  {loader:5s}  RM {'on ' if rm else 'off'}  {t.per_s:8.1f} img/s "
                  f"[{lo:.1f}-{hi:.1f}]  {t.per_cpu_s:8.1f} img/CPU-s", flush=True)
        on, off, stock = cells["dali", True], cells["dali", False], cells["stock", False]
        mid, lo, hi = paired(on, off)
        # the mix's own time inside our loader, against a batch of the loader without it: a second view of
        # RM's cost, steadier than throughput on a shared host
        mix_ms = 1e3 * ours_mix.seconds / max(ours_mix.calls, 1)
        batch_ms = 1e3 * off.wall / max(off.items / args.batch, 1)
        summary[task] = dict(dali_vs_stock_per_cpu_s=off.per_cpu_s / stock.per_cpu_s,
                             dali_vs_stock_per_s=off.per_s / stock.per_s,
                             rm_cost_dali=1 - mid, rm_cost_dali_rounds=(1 - hi, 1 - lo),
                             mix_ms_per_batch=mix_ms, batch_ms_rm_off=batch_ms)
        s = summary[task]
        print(f"{task}: DALI / stock = {s['dali_vs_stock_per_cpu_s']:.2f}x per CPU-second, "
              f"{s['dali_vs_stock_per_s']:.2f}x per second", flush=True)
        print(f"{task}: RM's cost in DALI img/s {cost_in_words(on, off)} (goal <= 5%); the mix itself takes "
              f"{mix_ms:.2f} ms per batch in the loader, {100 * mix_ms / batch_ms:.1f}% of a {batch_ms:.1f} ms "
              f"batch without it", flush=True)
    result = dict(device=str(device), images=args.images, batch=args.batch, workers=args.workers,
                  repeats=args.repeats, rows=rows, summary=summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dense.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
