"""DALI detection / segmentation loaders (pipelines/dali_det.py, dali_seg.py) and their mmengine wiring
(trainers/mm/dali_loop.py), on tiny COCO / ADE20K datasets in the real layouts.

Fast: annotations follow their pixels through the augmentation (flat-coloured rectangles whose colour
encodes the class), mmdet's resize arithmetic, exact-once evaluation across 2 ranks, mid-epoch resume
(with dense RecursiveMix), our eval batches equal to the stock loader's. Slow: ATSS and UPerNet trained a
few iterations on CPU by mmengine's Runner fed by our loader with dense RM, and validated with the stock
loader and with ours (same metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")
mmdet = pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from mm_fixtures import (COCO_CATEGORIES, COCO_NAMES, _colour, coco_categories, own_singletons,  # noqa: E402
                         write_ade20k, write_coco)
from pipelines.dali_det import CocoDaliLoader  # noqa: E402
from pipelines.dali_seg import ADE20KDaliLoader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "trainers" / "mm" / "configs"
CLASSES = tuple(c["name"] for c in COCO_CATEGORIES)  # person, dog, bottle: ids 1, 18, 44


def write_coco_disjoint(root: Path, n: int = 6, size=(240, 320), seed: int = 0) -> Path:
    """COCO layout whose boxes never overlap (one per quadrant at most), so every box's pixels are its colour."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    h, w = size
    images, anns = [], []
    for i in range(1, n + 1):
        img = rng.integers(90, 140, size=(h, w, 3), dtype=np.uint8)
        quads = [int(q) for q in rng.permutation(4)[: int(rng.integers(1, 4))]]
        for q in quads:
            cat = COCO_CATEGORIES[int(rng.integers(3))]
            qy, qx = (q // 2) * h // 2, (q % 2) * w // 2
            bw, bh = int(rng.integers(40, w // 2 - 10)), int(rng.integers(40, h // 2 - 10))
            x, y = qx + int(rng.integers(0, w // 2 - bw)), qy + int(rng.integers(0, h // 2 - bh))
            img[y:y + bh, x:x + bw] = _colour(cat["id"])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat["id"], "bbox": [x, y, bw, bh],
                         "area": float(bw * bh), "iscrowd": 0})
        name = f"{i:012d}.jpg"
        Image.fromarray(img).save(root / "train2017" / name, quality=95)
        images.append({"id": i, "file_name": name, "height": h, "width": w})
    doc = {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": COCO_CATEGORIES}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    return {"coco": write_coco(tmp / "coco", train=5, val=3, size=(240, 320)),
            "disjoint": write_coco_disjoint(tmp / "disjoint"),
            "ade": write_ade20k(tmp / "ade", train=5, val=3)}


def coco_loader(root, split="train", classes=CLASSES, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("train", split == "train")
    return CocoDaliLoader(root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json", classes, **kw)


def ade_loader(base, split="training", **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("train", split == "training")
    kw.setdefault("scale", (512, 256))
    kw.setdefault("crop", (256, 256))
    return ADE20KDaliLoader(base / "images" / split, base / "annotations" / split, **kw)


# -- annotations follow their pixels ------------------------------------------------------------------

def test_boxes_follow_pixels_through_resize_and_flip(data):
    loader = coco_loader(data["disjoint"], batch_size=2, seed=3)
    flips, boxes_seen = set(), 0
    for _ in range(2):
        for batch in loader:
            for img, s in zip(batch["inputs"], batch["data_samples"]):
                h, w = s.img_shape
                assert img.dtype == torch.uint8 and tuple(img.shape) == (3, h, w)
                # mmcv rescale_size: short side 800, long side <= 1333, int(x * s + 0.5)
                assert (h, w) == (800, 1067) and s.ori_shape == (240, 320)
                assert s.scale_factor == pytest.approx((1067 / 320, 800 / 240))
                flips.add(s.flip)
                for (x1, y1, x2, y2), lab in zip(s.gt_instances.bboxes.tensor.tolist(), s.gt_instances.labels.tolist()):
                    cat_id = [c["id"] for c in COCO_CATEGORIES if c["name"] == CLASSES[lab]][0]
                    bgr = torch.tensor(_colour(cat_id)[::-1].copy(), dtype=torch.float32)
                    inner = img[:, int(y1) + 4:int(y2) - 4, int(x1) + 4:int(x2) - 4].float().mean((1, 2))
                    assert (inner - bgr).abs().max() < 12, (s.img_id, s.flip, inner, bgr)
                    # just outside the left and right edges: background, so a box flipped without its pixels fails
                    for xs in (slice(max(int(x1) - 8, 0), max(int(x1) - 3, 0)), slice(int(x2) + 3, int(x2) + 8)):
                        band = img[:, int(y1) + 4:int(y2) - 4, xs].float()
                        if band.numel():
                            assert (band.mean((1, 2)) - bgr).abs().max() > 12
                    boxes_seen += 1
    assert flips == {True, False} and boxes_seen > 10


def test_labels_and_boxes_match_mmdet_annotations(data):
    """Eval: every image once, boxes = the JSON's [x, y, x + w, y + h] x scale_factor, labels by class name."""
    root = data["coco"]
    doc = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    seen = {}
    for batch in coco_loader(root, "val", batch_size=2):
        for img, s in zip(batch["inputs"], batch["data_samples"]):
            seen[s.img_id] = s
            assert s.img_path.endswith(f"{s.img_id:012d}.jpg") and "flip" not in s
            sx, sy = s.scale_factor
            want = [[a["bbox"][0] * sx, a["bbox"][1] * sy, (a["bbox"][0] + a["bbox"][2]) * sx,
                     (a["bbox"][1] + a["bbox"][3]) * sy] for a in doc["annotations"] if a["image_id"] == s.img_id]
            names = {c["id"]: c["name"] for c in doc["categories"]}
            labels = [CLASSES.index(names[a["category_id"]]) for a in doc["annotations"] if a["image_id"] == s.img_id]
            assert torch.allclose(s.gt_instances.bboxes.tensor, torch.tensor(want), atol=1e-3)
            assert s.gt_instances.labels.tolist() == labels
    assert sorted(seen) == sorted(im["id"] for im in doc["images"])


# -- annotations are mmdet's ------------------------------------------------------------------------

SPARSE_IDS = (1, 3, 18, 44, 62)  # person, car, dog, bottle, chair: real COCO ids with gaps


def write_coco_oddities(root: Path) -> Path:
    """COCO layout (real ids 1, 3, 18, 44, 62) plus, in both splits, what mmdet's rules drop or keep:
    on the first image a box wholly outside it (x=5000), one under 1 px wide, one with area 0, one of a
    category the file does not list and one marked ``ignore``; and three more images: one whose only
    annotation is of that unlisted category, one whose only annotation is a crowd, one 24x24 (under
    ``min_size=32``) with a valid box."""
    root = write_coco(root, train=4, val=3, size=(240, 320), categories=coco_categories(*SPARSE_IDS), use=None)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}2017.json"
        doc = json.loads(path.read_text())
        first = doc["images"][0]["id"]
        next_img = 1000 * (1 + (split == "val"))

        def ann(image_id, category_id, bbox, **kw):
            a = {"id": len(doc["annotations"]) + 10_000, "image_id": image_id, "category_id": category_id,
                 "bbox": bbox, "area": float(bbox[2] * bbox[3]), "iscrowd": 0, **kw}
            doc["annotations"].append(a)

        ann(first, 18, [5000, 10, 40, 40])
        ann(first, 44, [10, 10, 0.5, 30])
        ann(first, 62, [10, 10, 40, 40], area=0.0)
        ann(first, 999, [20, 20, 40, 40])
        ann(first, 3, [30, 30, 40, 40], ignore=True)
        for k, (size, cat, kw) in enumerate([((240, 320), 999, {}), ((240, 320), 1, {"iscrowd": 1}),
                                             ((24, 24), 3, {})]):
            image_id = next_img + k
            name = f"{image_id:012d}.jpg"
            Image.fromarray(np.full((*size, 3), 120, np.uint8)).save(root / f"{split}2017" / name, quality=95)
            doc["images"].append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
            ann(image_id, cat, [2, 2, 20, 20], **kw)
        path.write_text(json.dumps(doc))
    return root


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return write_coco_oddities(tmp_path_factory.mktemp("odd") / "coco")


def stock_det_samples(root: Path, split: str, train: bool, classes=None) -> dict:
    """img_id -> the DetDataSample mmdet's own CocoDataset and transforms make (ATSS's filter in training)."""
    from mmdet.datasets import CocoDataset
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                dict(type="Resize", scale=(1333, 800), keep_ratio=True),
                dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]
    ds = CocoDataset(data_root=str(root), ann_file=f"annotations/instances_{split}2017.json",
                     data_prefix=dict(img=f"{split}2017/"), metainfo=None if classes is None else dict(classes=classes),
                     filter_cfg=dict(filter_empty_gt=True, min_size=32) if train else None, test_mode=not train,
                     pipeline=pipeline)
    return {d["data_samples"].img_id: d["data_samples"] for d in (ds[i] for i in range(len(ds)))}


def our_det_samples(root: Path, split: str, train: bool, classes=None) -> dict:
    """img_id -> our loader's DetDataSample (no flip, one epoch)."""
    loader = coco_loader(root, split, train=train, batch_size=1, flip_prob=0.0, classes=classes or COCO_NAMES)
    return {s.img_id: s for b in loader for s in b["data_samples"]}


def assert_same_annotations(ours: dict, stock: dict) -> None:
    assert sorted(ours) == sorted(stock)  # the same images (mmdet's training filter)
    for img_id, want in stock.items():
        got = ours[img_id]
        assert got.img_shape == want.img_shape and got.img_path == want.img_path
        for key in ("gt_instances", "ignored_instances"):
            a, b = got.get(key), want.get(key)
            assert torch.equal(a.labels, b.labels), (img_id, key, a.labels, b.labels)
            assert torch.allclose(a.bboxes.tensor, b.bboxes.tensor), (img_id, key)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("classes", [None, ("person", "dog", "chair")], ids=["coco80", "subset"])
def test_labels_are_mmdets_on_real_coco_ids(tmp_path, train, classes):
    """A file listing COCO's 80 categories, boxes of 1, 3, 18, 44, 62 (person, car, dog, bottle, chair): per
    image, our labels and boxes are what mmdet's own CocoDataset + pipeline give on the same file, with
    COCO's 80 classes and with a subset (the other categories dropped), in training and in evaluation."""
    root = write_coco(tmp_path / "coco", train=6, val=4, size=(240, 320), use=SPARSE_IDS)
    split = "train" if train else "val"
    stock = stock_det_samples(root, split, train, classes)
    ours = our_det_samples(root, split, train, classes)
    assert_same_annotations(ours, stock)
    labels = torch.cat([s.gt_instances.labels for s in ours.values()]).tolist()
    # COCO's 80: person 0, car 2, dog 16, bottle 39, chair 56; the subset: by its order in the file
    assert set(labels) <= ({0, 2, 16, 39, 56} if classes is None else {0, 1, 2}) and len(set(labels)) >= 3, labels


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_box_and_image_rules_are_mmdets(odd, train):
    """mmdet drops a box outside the image, one under 1 px, one of area 0, one of an unlisted category and one
    marked ignore; puts a crowd box in ignored_instances; in training skips an image whose only annotation is
    of an unlisted category and an image under min_size, and keeps a crowd-only image. Ours does the same."""
    split = "train" if train else "val"
    stock = stock_det_samples(odd, split, train)
    ours = our_det_samples(odd, split, train)
    assert_same_annotations(ours, stock)
    base = 1000 * (1 + (not train))
    first = min(ours)
    assert (base in ours) == (base + 2 in ours) == (not train)  # unlisted-category-only and 24x24 images
    crowd = ours[base + 1]
    assert len(crowd.gt_instances) == 0 and len(crowd.ignored_instances) == 1
    w = ours[first].img_shape[1]
    boxes = ours[first].gt_instances.bboxes.tensor
    assert ((boxes[:, 2] - boxes[:, 0]) > 1).all() and (boxes[:, 0] < w).all()  # no degenerate box kept


def test_annotation_without_bbox_is_refused_in_one_line(tmp_path):
    """mmdet's CocoDataset fails on an annotation without ``bbox`` (KeyError); ours refuses it in one line
    naming the annotation, directly and through the mmengine wiring."""
    from mmdet.datasets import CocoDataset

    from trainers.mm.dali_loop import DaliLoaderError, build_mm_loader

    root = write_coco(tmp_path / "coco", train=3, val=1, size=(240, 320), use=SPARSE_IDS)
    path = root / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    bad = doc["annotations"][1]
    del bad["bbox"]
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyError, match="bbox"):
        CocoDataset(data_root=str(root), ann_file="annotations/instances_train2017.json",
                    data_prefix=dict(img="train2017/"), pipeline=[])
    want = rf"instances_train2017.json: annotation {bad['id']} \(image {bad['image_id']}\) has no 'bbox'"
    with pytest.raises(ValueError, match=want) as e:
        coco_loader(root, "train", batch_size=1)
    assert "\n" not in str(e.value)
    cfg = dict(batch_size=1, dataset=dict(type="CocoDataset", data_root=str(root) + "/",
                                          ann_file="annotations/instances_train2017.json",
                                          data_prefix=dict(img="train2017/"),
                                          filter_cfg=dict(filter_empty_gt=True, min_size=32),
                                          pipeline=[dict(type="LoadImageFromFile"),
                                                    dict(type="LoadAnnotations", with_bbox=True),
                                                    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
                                                    dict(type="PackDetInputs")]))
    with pytest.raises(DaliLoaderError, match=want):
        build_mm_loader(cfg, train=True, device="cpu")


def _eroded_same(label: np.ndarray) -> np.ndarray:
    """Pixels whose 9x9 neighbourhood carries one label (away from resize-blurred edges)."""
    same = np.ones_like(label, dtype=bool)
    for dy in (-4, -2, 0, 2, 4):  # JPEG chroma subsampling bleeds ~2 px of colour, more once upscaled
        for dx in (-4, -2, 0, 2, 4):
            same &= np.roll(label, (dy, dx), (0, 1)) == label
    same[:4], same[-4:], same[:, :4], same[:, -4:] = False, False, False, False
    return same


def test_label_maps_follow_pixels_through_resize_crop_flip(data):
    loader = ade_loader(data["ade"], batch_size=2, seed=1, photometric=False)
    flips, checked = set(), 0
    for _ in range(3):
        for batch in loader:
            for img, s in zip(batch["inputs"], batch["data_samples"]):
                seg = s.gt_sem_seg.data[0].numpy()
                assert seg.shape == tuple(img.shape[1:]) == s.img_shape
                assert s.img_shape[0] <= 256 and s.img_shape[1] <= 256
                assert set(np.unique(seg)) <= set(range(150)) | {255}
                flips.add(s.flip)
                ok = _eroded_same(seg) & (seg != 255)
                if not ok.any():  # a small crop inside the background
                    continue
                pixels = img.permute(1, 2, 0).numpy().astype(int)[ok]
                want = np.stack([_colour(int(k) + 1)[::-1] for k in seg[ok]]).astype(int)  # reduce_zero_label: k+1
                err = np.abs(pixels - want)
                assert np.percentile(err, 99) < 16 and err.mean() < 3, (s.img_path, s.flip, err.mean())
                checked += ok.sum()
    assert flips == {True, False} and checked > 10_000


def test_photometric_distortion_keeps_label_regions_flat(data):
    """With photometric distortion the colours move (one transform per image), but every labelled
    rectangle is still one flat colour in the image: a label map out of step with its pixels would straddle
    two colours."""
    loader = ade_loader(data["ade"], batch_size=2, seed=5, photometric=True)
    moved, regions = 0, 0
    for _ in range(2):
        for batch in loader:
            for img, s in zip(batch["inputs"], batch["data_samples"]):
                seg = s.gt_sem_seg.data[0].numpy()
                ok = _eroded_same(seg) & (seg != 255)
                pixels = img.permute(1, 2, 0).numpy().astype(float)
                for k in np.unique(seg[ok]):
                    region = pixels[ok & (seg == k)]
                    if len(region) < 50:
                        continue
                    assert np.percentile(np.abs(region - np.median(region, 0)), 95) < 16, (s.img_path, k)
                    moved += np.abs(np.median(region, 0) - _colour(int(k) + 1)[::-1]).max() > 10
                    regions += 1
    assert regions > 5 and moved > 0


def test_eval_label_maps_are_the_original_reduced(data):
    for batch in ade_loader(data["ade"], "validation", batch_size=2):
        for s in batch["data_samples"]:
            ref = np.array(Image.open(s.seg_map_path)).astype(np.int64)
            ref = np.where(ref == 0, 255, ref - 1)
            assert s.gt_sem_seg.data.shape[1:] == s.ori_shape and (s.gt_sem_seg.data[0].numpy() == ref).all()
            assert s.img_shape == (256, 320) and s.scale_factor == (1.0, 1.0)


# -- DDP, resume ------------------------------------------------------------------------------------

def mmengine_gather(per_rank: list, size: int) -> list:
    """What mmengine's ``collect_results`` makes of the ranks' result lists: interleaved (each rank's first,
    then each rank's second, ...), cut at the shortest rank, then the first ``size`` (``len(dataset)``)."""
    return [r for group in zip(*per_rank) for r in group][:size]


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    """7 small validation images in each layout (and no training images)."""
    tmp = tmp_path_factory.mktemp("seven")
    return {"coco": write_coco(tmp / "coco", train=0, val=7, size=(96, 128)),
            "ade": write_ade20k(tmp / "ade", train=0, val=7, size=(96, 128))}


def _subset_splits(data, tmp: Path, n: int) -> tuple[Path, Path]:
    """(COCO annotation file, ADE20K folder root) holding the first ``n`` validation images of ``data``."""
    coco = data["coco"]
    doc = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    keep = doc["images"][:n]
    ids = {im["id"] for im in keep}
    sub = dict(doc, images=keep, annotations=[a for a in doc["annotations"] if a["image_id"] in ids])
    ann = tmp / f"instances_val_{n}.json"
    ann.write_text(json.dumps(sub))
    ade = tmp / f"ade_{n}"
    for kind, ext in (("images", ".jpg"), ("annotations", ".png")):
        (ade / kind / "validation").mkdir(parents=True)
        for src in sorted((data["ade"] / kind / "validation").glob("*" + ext))[:n]:
            (ade / kind / "validation" / src.name).symlink_to(src)
    return ann, ade


@pytest.mark.parametrize("n, world_size, batch_size", [(3, 2, 1), (3, 2, 2), (7, 3, 2), (4, 2, 2), (1, 2, 1),
                                                        (2, 4, 1), (7, 4, 3)])
def test_eval_counts_every_image_once_across_ranks(seven, tmp_path, n, world_size, batch_size):
    """Under DDP every rank yields the same number of batches and samples, and what mmengine's evaluator
    gathers from them is every validation image exactly once, for counts that do not divide by the world
    size and for fewer images than ranks (mmengine's DefaultSampler layout)."""
    ann, ade = _subset_splits(seven, tmp_path, n)
    makers = {"img_id": lambda r, w, b: CocoDaliLoader(seven["coco"] / "val2017", ann, CLASSES, batch_size=b,
                                                        train=False, device="cpu", rank=r, world_size=w),
              "img_path": lambda r, w, b: ade_loader(ade, "validation", batch_size=b, rank=r, world_size=w)}
    for key, make in makers.items():
        everything = sorted(s.metainfo[key] for b in make(0, 1, 1) for s in b["data_samples"])
        assert len(set(everything)) == n
        per_rank, lengths = [], set()
        for rank in range(world_size):
            loader = make(rank, world_size, batch_size)
            assert loader.num_samples == n
            epochs = [[s.metainfo[key] for b in loader for s in b["data_samples"]] for _ in range(2)]
            assert epochs[0] == epochs[1]  # the next epoch reads the same samples again
            per_rank.append(epochs[0])
            lengths.add((len(loader), len(epochs[0])))
        assert len(lengths) == 1, (key, lengths)  # same batch and sample counts on every rank
        assert sorted(mmengine_gather(per_rank, n)) == everything, (key, per_rank)


def _signature(batch):
    out = []
    for img, s in zip(batch["inputs"], batch["data_samples"]):
        ann = s.gt_instances.bboxes.tensor.clone() if "gt_instances" in s else s.gt_sem_seg.data.clone()
        out.append((s.img_path, img.clone(), ann))
    return out


@pytest.mark.parametrize("task", ["det", "seg"])
def test_resume_mid_epoch_with_dense_rm(data, task):
    from rmix.dense import DetRecursiveMix, SegRecursiveMix

    def make():
        if task == "det":
            return coco_loader(data["coco"], batch_size=2, seed=7, mix=DetRecursiveMix(alpha=0.5, seed=1))
        return ade_loader(data["ade"], batch_size=2, seed=7, mix=SegRecursiveMix(alpha=0.5, seed=1))

    ref = make()
    assert len(ref) == 2  # 5 images, batch 2, last partial batch dropped
    run, state = [], None
    for epoch in range(2):
        ref.set_epoch(epoch)
        for i, b in enumerate(ref):
            run.append(_signature(b))
            if epoch == 0 and i == 0:
                state = ref.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    again = [_signature(b) for b in resumed]
    resumed.set_epoch(1)
    again += [_signature(b) for b in resumed]
    assert len(again) == len(run) - 1
    for want, got in zip(run[1:], again):
        for (pa, ia, aa), (pb, ib, ab) in zip(want, got):
            assert pa == pb and torch.equal(ia, ib) and torch.equal(aa, ab)


@pytest.mark.parametrize("task", ["det", "seg"])
def test_reader_state_at_an_epoch_end_gives_the_next_epochs_order(data, task):
    """What an epoch-based mmengine resume restores (DaliReaderState): the reader state taken after an epoch
    gives a fresh loader the next epoch in the uninterrupted run's order, which a fresh reader does not."""
    key = "img_id" if task == "det" else "img_path"

    def make():
        if task == "det":
            return coco_loader(data["coco"], batch_size=1, seed=3)
        return ade_loader(data["ade"], batch_size=1, seed=3)

    def order(loader):
        return [s.metainfo[key] for b in loader for s in b["data_samples"]]

    ref = make()
    epochs = [order(ref)]
    state = ref.reader_state()
    assert state["epoch"] == 1 and state["position"] == 0 and "mix" not in state
    epochs += [order(ref), order(ref)]
    assert sorted(epochs[1]) == sorted(epochs[0]) and len(set(epochs[0])) == 5  # every image once per epoch
    assert epochs[1] != epochs[0]  # else a fresh reader would pass this test by chance
    resumed = make()
    resumed.load_reader_state(state)
    assert resumed.epoch == 1
    assert [order(resumed), order(resumed)] == epochs[1:]
    assert order(make()) == epochs[0]  # a fresh reader starts again at the first epoch's order


def test_dense_rm_pastes_history_into_the_padded_batch(data):
    from rmix.dense import DetRecursiveMix

    loader = coco_loader(data["coco"], batch_size=2, seed=2, mix=DetRecursiveMix(alpha=1.0, seed=0))
    batches = list(loader)
    first, second = batches
    for b in batches:
        shapes = {tuple(x.shape) for x in b["inputs"]}
        assert len(shapes) == 1 and all(d % 32 == 0 for d in next(iter(shapes))[1:])
        for s in b["data_samples"]:
            assert s.img_shape == next(iter(shapes))[1:]
    n_first = sum(len(s.gt_instances) for s in first["data_samples"])
    # pasted history boxes are appended after the current ones (unless too small)
    assert sum(len(s.gt_instances) for s in second["data_samples"]) >= 1 and n_first >= 1


# -- mmengine wiring --------------------------------------------------------------------------------

ATSS_TINY = """
_base_ = '{base}'
img_scale = (320, 320)
metainfo = dict(classes=('person', 'dog', 'bottle'))
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True), dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
data_root = '{root}/'
train_dataloader = dict(num_workers=0, persistent_workers=False,
                        dataset=dict(metainfo=metainfo, data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(metainfo=metainfo, data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
model = dict(backbone=dict(init_cfg=None), bbox_head=dict(num_classes=3), test_cfg=dict(score_thr=0.0))
custom_hooks = []
train_cfg = dict(max_epochs=1, val_interval=10)  # validated by the test, once per loader
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
default_hooks = dict(logger=dict(interval=1), visualization=dict(draw=False), checkpoint=dict(interval=100))
log_processor = dict(window_size=1)
work_dir = '{work_dir}'
"""

UPERNET_TINY = """
_base_ = '{base}'
crop_size = (128, 128)
# Narrow heads: the stock 512 channels cost several times the backbone's compute at these crops and
# hundreds of MB per checkpoint; the head's width is not what these tests check.
model = dict(backbone=dict(init_cfg=None), data_preprocessor=dict(size=crop_size),
             decode_head=dict(channels=64), auxiliary_head=dict(channels=64))
train_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(256, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75), dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'), dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'), dict(type='Resize', scale=(256, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True), dict(type='PackSegInputs')]
data_root = '{root}/'
train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
custom_hooks = []
train_cfg = dict(max_iters=2, val_interval=10)  # validated by the test, once per loader
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, end=3, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=100), visualization=dict(draw=False))
log_processor = dict(window_size=1)
work_dir = '{work_dir}'
"""


def _config(tmp: Path, template: str, base: Path, root: Path):
    from mmengine.config import Config

    from trainers.mm.launch import adapt_to_device

    path = tmp / f"{base.stem}_tiny.py"
    path.write_text(template.format(base=base, root=root, work_dir=tmp / "work"))
    cfg = Config.fromfile(str(path))
    adapt_to_device(cfg, cuda=False)
    return cfg


def _stock_batches(cfg, scope: str):
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    init_default_scope(scope)
    return list(Runner.build_dataloader(cfg.val_dataloader))


@pytest.mark.parametrize("task", ["det", "seg"])
def test_eval_batches_equal_the_stock_loader(data, tmp_path, task):
    """Our val batches are what mmdet's / mmseg's own val DataLoader gives: same pixels, metainfo, annotations."""
    from trainers.mm.dali_loop import build_mm_loader

    if task == "det":
        cfg, scope = _config(tmp_path, ATSS_TINY, CONFIGS / "atss_r50_fpn_1x_coco.py", data["coco"]), "mmdet"
    else:
        cfg, scope = _config(tmp_path, UPERNET_TINY, CONFIGS / "upernet_r50_8xb2-80k_ade20k-512x512.py",
                             data["ade"]), "mmseg"
    stock = _stock_batches(cfg, scope)
    ours = build_mm_loader(cfg.val_dataloader, train=False, device="cpu")
    assert len(ours.dataset) == 3 and len(ours) == len(stock) == 3
    assert ours.dataset.metainfo["classes"][:3] == (CLASSES if task == "det" else ("wall", "building", "sky"))
    for a, b in zip(stock, ours):
        for ia, ib, sa, sb in zip(a["inputs"], b["inputs"], a["data_samples"], b["data_samples"]):
            assert ia.shape == ib.shape and ia.dtype == ib.dtype
            # on the CPU both resize with OpenCV after a libjpeg-turbo decode: bit-identical
            assert torch.equal(ia, ib)
            for k in sa.metainfo:
                va, vb = sa.metainfo[k], sb.metainfo[k]
                assert np.allclose(va, vb) if k == "scale_factor" else va == vb, (k, va, vb)
            if task == "det":
                assert torch.allclose(sa.gt_instances.bboxes.tensor, sb.gt_instances.bboxes.tensor)
                assert torch.equal(sa.gt_instances.labels, sb.gt_instances.labels)
            else:
                assert sa.gt_sem_seg.data.dtype == sb.gt_sem_seg.data.dtype == torch.int64  # PackSegInputs' dtype
                assert torch.equal(sa.gt_sem_seg.data, sb.gt_sem_seg.data)


def test_fewer_training_images_than_ranks_is_one_line(data):
    """DALI's reader asserts in many lines when a training split has fewer images than ranks: ours is one line
    naming it. (Evaluation takes any count: test_eval_counts_every_image_once_across_ranks.)"""
    for make in (lambda: coco_loader(data["coco"], "train", batch_size=1, rank=0, world_size=8),
                 lambda: ade_loader(data["ade"], "training", batch_size=1, rank=0, world_size=8)):
        with pytest.raises(ValueError, match=r"(train2017|training): 5 sample\(s\) for 8 ranks.*at most 5 ranks") as e:
            len(make())
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("task", ["det", "seg"])
def test_undecodable_file_is_one_line_naming_it(tmp_path, task):
    """A file in the folder that is not an image (here text named .jpg / .png): one line naming it, not
    DALI's many lines that name neither the file nor the folder."""
    if task == "det":
        root = write_coco(tmp_path / "coco", train=0, val=3, size=(96, 128))
        bad = root / "val2017" / "000000000002.jpg"
        make = lambda: coco_loader(root, "val", batch_size=1)  # noqa: E731
    else:
        base = write_ade20k(tmp_path / "ade", train=0, val=3, size=(96, 128))
        bad = base / "annotations" / "validation" / "ADE_val_00000002.png"
        make = lambda: ade_loader(base, "validation", batch_size=1)  # noqa: E731
    bad.write_text("<html>not an image</html>\n")
    with pytest.raises(ValueError, match=rf"^{bad}: DALI cannot decode this file \(.+\); replace or remove it$") as e:
        for _ in make():
            pass
    assert "\n" not in str(e.value)


def test_unsupported_transform_is_one_line(data, tmp_path):
    from trainers.mm.dali_loop import DaliLoaderError, build_mm_loader

    cfg = _config(tmp_path, ATSS_TINY, CONFIGS / "atss_r50_fpn_1x_coco.py", data["coco"])
    cfg.train_dataloader.dataset.pipeline.insert(2, dict(type="PhotoMetricDistortion"))
    with pytest.raises(DaliLoaderError, match="does not implement the transform 'PhotoMetricDistortion'"):
        build_mm_loader(cfg.train_dataloader, train=True, device="cpu")


def test_segmentation_config_reaches_the_loader(data, tmp_path):
    """cat_max_ratio comes from the config's RandomCrop; a non-default PhotoMetricDistortion is one line."""
    from trainers.mm.dali_loop import DaliLoaderError, build_mm_loader

    cfg = _config(tmp_path, UPERNET_TINY, CONFIGS / "upernet_r50_8xb2-80k_ade20k-512x512.py", data["ade"])
    loader = build_mm_loader(cfg.train_dataloader, train=True, device="cpu").loader
    assert loader.cat_max_ratio == 0.75 and loader.photometric and loader.crop == (128, 128)
    cfg.train_dataloader.dataset.pipeline[3] = dict(type="RandomCrop", crop_size=(128, 128))
    assert build_mm_loader(cfg.train_dataloader, train=True, device="cpu").loader.cat_max_ratio == 1.0
    cfg.train_dataloader.dataset.pipeline[5] = dict(type="PhotoMetricDistortion", hue_delta=9)
    with pytest.raises(DaliLoaderError, match="PhotoMetricDistortion with mmseg's defaults"):
        build_mm_loader(cfg.train_dataloader, train=True, device="cpu")


def _train_and_compare(cfg, scope: str, metric: str):
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner, ValLoop

    from trainers.mm.dali_loop import attach_dali_loaders

    init_default_scope(scope)
    torch.manual_seed(0)
    own_singletons(cfg)
    runner = Runner.from_cfg(cfg)
    attach_dali_loaders(runner, rm_alpha=0.5, device="cpu", which=("train_dataloader",))
    runner.train()
    losses = {k: float(v.current()) for k, v in runner.message_hub.log_scalars.items() if k.startswith("train/loss")}
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
    stock = {k: float(v) for k, v in runner.val_loop.run().items()}
    assert metric in stock
    attach_dali_loaders(runner, device="cpu", which=("val_dataloader",))
    runner._val_loop = ValLoop(runner, runner._val_dataloader, cfg.val_evaluator)
    ours = {k: float(v) for k, v in runner.val_loop.run().items()}
    return stock, ours


@pytest.mark.slow
def test_atss_trains_with_dali_and_dense_rm_and_evaluates_like_stock(data, tmp_path):
    cfg = _config(tmp_path, ATSS_TINY, CONFIGS / "atss_r50_fpn_1x_coco.py", data["coco"])
    stock, ours = _train_and_compare(cfg, "mmdet", "coco/bbox_mAP")
    assert ours == stock  # same pixels (no resize at this scale), same model: the same mAP


@pytest.mark.slow
def test_upernet_trains_with_dali_and_dense_rm_and_evaluates_like_stock(data, tmp_path):
    cfg = _config(tmp_path, UPERNET_TINY, CONFIGS / "upernet_r50_8xb2-80k_ade20k-512x512.py", data["ade"])
    stock, ours = _train_and_compare(cfg, "mmseg", "mIoU")
    assert ours == stock  # on the CPU the eval pixels are the stock loader's bit for bit: the same mIoU


@pytest.mark.gpu
def test_gpu_graph_matches_cpu_graph(data):
    """GPU ``mixed`` decode: same samples, boxes, label maps and metainfo as the CPU graph; pixels within +-3."""
    for make in (lambda d: coco_loader(data["coco"], "val", batch_size=2, device=d),
                 lambda d: ade_loader(data["ade"], "validation", batch_size=2, device=d)):
        for a, b in zip(make("cpu"), make("cuda")):
            for ia, ib, sa, sb in zip(a["inputs"], b["inputs"], a["data_samples"], b["data_samples"]):
                assert ib.is_cuda and ia.shape == ib.shape
                assert (ia.float() - ib.cpu().float()).abs().mean() < 3
                assert sa.metainfo == sb.metainfo
                if "gt_instances" in sa:
                    assert torch.allclose(sa.gt_instances.bboxes.tensor, sb.gt_instances.bboxes.tensor.cpu())
                else:
                    assert torch.equal(sa.gt_sem_seg.data, sb.gt_sem_seg.data.cpu())


@pytest.mark.parametrize("args", [["--rm-alpha", "0.5"], ["--loader", "dali", "--rm-alpha", "1.5"]])
def test_rm_alpha_needs_the_dali_loader_one_line(args, capsys):
    from tools import mm

    with pytest.raises(SystemExit) as e:
        mm.main(["train", "atss_r50_fpn_1x_coco", *args])
    assert e.value.code == ("rmix mm train: --rm-alpha takes a value in (0, 1] and needs --loader dali "
                            "(with the stock loader use a *_densrm config)")


def test_host_resize_is_the_stock_resize_bit_for_bit(data):
    """CPU default: OpenCV resizes on the host, so pixels are mmcv's ``imrescale`` + ``imflip`` of the decoded image."""
    import mmcv

    root = data["coco"]
    files = {}
    for batch in coco_loader(root, "train", batch_size=2, seed=5):
        for img, s in zip(batch["inputs"], batch["data_samples"]):
            want = mmcv.imrescale(mmcv.imread(s.img_path), (1333, 800), interpolation="bilinear")
            if s.flip:
                want = mmcv.imflip(want)
            assert torch.equal(img, torch.from_numpy(want.copy()).permute(2, 0, 1)), s.img_path
            files[s.img_path] = s.flip
    assert len(files) >= 4


def test_crop_window_resize_equals_resize_then_crop():
    """The segmentation graph resizes only the crop window (``roi_start``/``roi_end``): the same pixels as
    resizing the whole image and slicing, labels (nearest) exactly, image (bilinear) within 1 grey level."""
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(img, 4, 0), 4, 1)  # 192x256, blocky so nearest boundaries matter
    lab = img[..., :1].copy()
    cases = [(384, 512, 37, 101, 256, 256), (300, 400, 0, 0, 200, 160), (150, 200, 5, 9, 128, 128)]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def both(new_h, new_w, oy, ox, ch, cw):
        im = fn.external_source(lambda: [img], batch=True, layout="HWC")
        lb = fn.external_source(lambda: [lab], batch=True, layout="HWC")
        whole = dict(resize_x=float(new_w), resize_y=float(new_h), antialias=False)
        sy, sx = 192 / new_h, 256 / new_w
        window = dict(roi_start=[oy * sy, ox * sx], roi_end=[(oy + ch) * sy, (ox + cw) * sx], roi_relative=False,
                      resize_x=float(cw), resize_y=float(ch), antialias=False)
        outs = []
        for x, interp in ((im, types.INTERP_LINEAR), (lb, types.INTERP_NN)):
            sliced = fn.slice(fn.resize(x, interp_type=interp, **whole), [oy, ox], [ch, cw], axes=[0, 1])
            outs += [sliced, fn.resize(x, interp_type=interp, **window)]
        return tuple(outs)

    for case in cases:
        pipe = both(*case)
        pipe.build()
        a, b, la, lb = (np.array(o.as_array()[0]) for o in pipe.run())
        assert a.shape == b.shape == (case[4], case[5], 3)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, case
        assert np.array_equal(la, lb), case


def test_host_segmentation_augment_is_mmseg_for_the_same_draws(data):
    """Train samples of the CPU path replayed through mmcv / mmseg with the draws they made: equal pixels and labels."""
    import mmcv
    import mmseg.datasets.transforms.transforms as mmseg_transforms
    from mmseg.datasets.transforms import PhotoMetricDistortion
    from pipelines.seg_host import REDUCE_ZERO_LABEL, HostSegAugment

    class Replay:  # mmseg's numpy.random calls, answered from a recorded list
        def __init__(self, log):
            self.log = list(log)

        def randint(self, *args):
            kind, value = self.log.pop(0)
            assert kind == "randint"
            return value

        def uniform(self, *args):
            kind, value = self.log.pop(0)
            assert kind == "uniform"
            return value

    base = data["ade"]
    aug = HostSegAugment(train=True, scale=(512, 256), crop=(256, 256))
    images = sorted((base / "images" / "training").glob("*.jpg"))
    changed = 0
    for k, path in enumerate(images):
        bgr = mmcv.imread(str(path))
        label = mmcv.imread(str(base / "annotations" / "training" / (path.stem + ".png")), flag="unchanged")
        rng = np.random.default_rng(k)
        img, lab, (nh, nw), d = aug(np.ascontiguousarray(bgr[:, :, ::-1]), label, rng)
        scale = (int(512 * d.ratio), int(256 * d.ratio))
        want = mmcv.imrescale(bgr, scale, interpolation="bilinear")
        want_lab = mmcv.imrescale(REDUCE_ZERO_LABEL[label], scale, interpolation="nearest")
        assert want.shape[:2] == (nh, nw)
        y1, y2, x1, x2 = d.crop
        want, want_lab = want[y1:y2, x1:x2], want_lab[y1:y2, x1:x2]
        if d.flip:
            want, want_lab = mmcv.imflip(want), mmcv.imflip(want_lab)
        orig = mmseg_transforms.random
        mmseg_transforms.random = Replay(d.photometric)
        try:
            want = PhotoMetricDistortion().transform({"img": np.ascontiguousarray(want)})["img"]
        finally:
            mmseg_transforms.random = orig
        assert np.array_equal(img, want) and np.array_equal(lab, want_lab), path
        changed += any(kind == "uniform" for kind, _ in d.photometric)
    assert changed >= 2  # photometric steps were taken, not only coins that said no


@pytest.mark.parametrize("task", ["det", "seg"])
def test_host_path_matches_the_dali_graph(data, task):
    """Eval through the graph the GPU runs (``host_resize`` / ``host_augment=False``) on the CPU: same samples,
    metainfo, boxes / labels as the host path; pixels within 1 grey level on average."""
    if task == "det":
        make = lambda **kw: coco_loader(data["coco"], "val", batch_size=2, **kw)  # noqa: E731
        graph = dict(host_resize=False)
    else:
        make = lambda **kw: ade_loader(data["ade"], "validation", batch_size=2, **kw)  # noqa: E731
        graph = dict(host_augment=False)
    for a, b in zip(make(), make(**graph)):
        for ia, ib, sa, sb in zip(a["inputs"], b["inputs"], a["data_samples"], b["data_samples"]):
            assert ia.shape == ib.shape and sa.metainfo == sb.metainfo
            assert (ia.int() - ib.int()).abs().float().mean() < 1.0
            if task == "det":
                assert torch.allclose(sa.gt_instances.bboxes.tensor, sb.gt_instances.bboxes.tensor)
            else:
                assert sa.gt_sem_seg.data.dtype == sb.gt_sem_seg.data.dtype == torch.int64  # PackSegInputs' dtype
                assert torch.equal(sa.gt_sem_seg.data, sb.gt_sem_seg.data)


def _resumable_runner(cfg, scope: str, resume=None):
    """A Runner for the resume tests: DenseMixState on, no schedule, the seed fixed as `rmix mm train` fixes it
    (the loaders are built before the resume), resumed from ``resume`` when given."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    cfg.custom_hooks = [dict(type="DenseMixState")]
    cfg.param_scheduler = []
    cfg.randomness = dict(seed=0)
    own_singletons(cfg)
    if resume is not None:
        cfg.resume, cfg.load_from = True, str(resume)
    init_default_scope(scope)
    torch.manual_seed(0)
    return Runner.from_cfg(cfg)


@pytest.mark.slow
def test_epoch_based_resume_reads_the_uninterrupted_runs_batches(data, tmp_path):
    """ATSS (epoch-based) fed by our DALI loader with dense RM, 3 epochs of 2 iterations: resumed from the
    epoch-1 checkpoint, epochs 2 and 3 train on the uninterrupted run's batches (images, order, flips and
    pastes, bit for bit) and end with its weights. Without DaliReaderState the fresh reader reads epoch 2 in
    the first epoch's order, which the run below shows differs."""
    from mmengine.hooks import Hook
    from trainers.mm.dali_loop import attach_dali_loaders
    from trainers.mm.loading import load_from_local_weights_only, mmengine_checkpoints

    class Record(Hook):
        def __init__(self):
            self.seen = []

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self.seen.append((runner.epoch, [s.img_id for s in data_batch["data_samples"]],
                              [float(i.double().sum()) for i in data_batch["inputs"]]))

    def run(work: Path, resume=None):
        work.mkdir()
        cfg = _config(work, ATSS_TINY, CONFIGS / "atss_r50_fpn_1x_coco.py", data["coco"])
        cfg.train_cfg.max_epochs = 3
        cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1)
        runner = _resumable_runner(cfg, "mmdet", resume)
        attach_dali_loaders(runner, rm_alpha=0.5, device="cpu", which=("train_dataloader",))
        record = Record()
        runner.register_hook(record)
        with mmengine_checkpoints():
            runner.train()
        return record.seen, load_from_local_weights_only(str(work / "work" / "epoch_3.pth"), map_location="cpu")

    whole, whole_ckpt = run(tmp_path / "whole")
    resumed, resumed_ckpt = run(tmp_path / "resumed", resume=tmp_path / "whole" / "work" / "epoch_1.pth")
    assert [e for e, _, _ in whole] == [0, 0, 1, 1, 2, 2]
    assert resumed == whole[2:]
    assert [ids for _, ids, _ in whole[2:4]] != [ids for _, ids, _ in whole[:2]]  # epoch 2 is not epoch 1's order
    assert len(whole_ckpt["rmix_dali_reader"]["ranks"]) == 1
    for k, v in whole_ckpt["state_dict"].items():
        assert torch.equal(v, resumed_ckpt["state_dict"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize("where", ["loader", "preprocessor"])
def test_resume_keeps_the_dense_mix_exact(data, tmp_path, where):
    """UPerNet with dense RM (inside our loader / in the *_densrm config's data preprocessor with the stock
    loader), 3 iterations: resumed from the iteration-2 checkpoint it ends with the mix state (generator,
    history = the last mixed batch) of the uninterrupted run. The preprocessor's mix needs DenseMixState:
    mmengine's resume re-reads the skipped batches but never runs the model on them."""
    from trainers.mm.dali_loop import attach_dali_loaders
    from trainers.mm.loading import load_from_local_weights_only, mmengine_checkpoints

    base = "upernet_r50_8xb2-80k_ade20k-512x512" + ("_densrm" if where == "preprocessor" else "")

    def run(work: Path, resume=None):
        work.mkdir()
        cfg = _config(work, UPERNET_TINY, CONFIGS / f"{base}.py", data["ade"])
        cfg.train_cfg.max_iters = 3
        cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=2, by_epoch=False)
        runner = _resumable_runner(cfg, "mmseg", resume)
        if where == "loader":
            attach_dali_loaders(runner, rm_alpha=0.5, device="cpu", which=("train_dataloader",))
        with mmengine_checkpoints():  # as `rmix mm train` runs it: resume loads with weights_only
            runner.train()
        return load_from_local_weights_only(str(work / "work" / "iter_3.pth"), map_location="cpu")

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed", resume=tmp_path / "whole" / "work" / "iter_2.pth")
    a, b = whole["rmix_dense_mix"]["ranks"][0][where], resumed["rmix_dense_mix"]["ranks"][0][where]
    assert a["rng"] == b["rng"]
    assert a["history"] is not None and b["history"] is not None
    for key in ("images", "seg"):
        assert torch.equal(a["history"][key], b["history"][key]), key
