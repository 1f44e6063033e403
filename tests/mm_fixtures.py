"""Tiny COCO and ADE20K datasets in exactly the real on-disk layouts, for the mmdet / mmseg tests.

COCO (what mmdet's ``CocoDataset`` and ``CocoMetric`` read)::

    ROOT/annotations/instances_train2017.json   # with an "info" key: pycocotools' loadRes copies it
    ROOT/annotations/instances_val2017.json
    ROOT/train2017/000000000001.jpg ...
    ROOT/val2017/...

ADE20K (what mmseg's ``ADE20KDataset`` reads; labels 0 = "other", 1..150 the classes)::

    ROOT/ADEChallengeData2016/images/{training,validation}/ADE_train_00000001.jpg ...
    ROOT/ADEChallengeData2016/annotations/{training,validation}/ADE_train_00000001.png ...

Objects are flat-coloured rectangles whose colour encodes the class, on a noisy background, so a model
could in principle learn them; the tests only need the formats and a few iterations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# COCO's 80 detection categories: real ids (1..90 with gaps) and names, in the file's order.
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
COCO_IDS = (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
            *range(84, 91))
COCO_NAME_OF = dict(zip(COCO_IDS, COCO_NAMES))


def coco_categories(*ids: int) -> list[dict]:
    """The ``categories`` entries of COCO's real category ``ids`` (real names), e.g. ``coco_categories(1, 18,
    44)`` = person, dog, bottle; no ids: all 80, as a real COCO file lists them. mmdet selects categories by
    name and labels each by its position among the selected ones in the file's order, so a file that lists
    all 80 gets the labels of real COCO (dog 16, bottle 39)."""
    return [{"id": i, "name": COCO_NAME_OF[i], "supercategory": "thing"} for i in (ids or COCO_IDS)]


# The categories of the fixtures' boxes: real COCO ids with gaps (person 1, dog 18, bottle 44), so a loader
# that renumbers ids to 1..N, or reads an index as an id, gives the wrong class.
BOX_IDS = (1, 18, 44)
COCO_CATEGORIES = coco_categories(*BOX_IDS)


def _background(rng, h, w) -> np.ndarray:
    return rng.integers(90, 140, size=(h, w, 3), dtype=np.uint8)


def _colour(label: int) -> np.ndarray:
    return np.array([label * 97 % 256, label * 53 % 256, 255 - label * 31 % 256], dtype=np.uint8)


def write_coco(root: Path, train: int = 4, val: int = 2, size=(320, 320), seed: int = 0, categories=None,
               use=BOX_IDS) -> Path:
    """COCO 2017 layout with ``train`` / ``val`` images of ``size`` (h, w), 1-3 boxes each (>= 40 px). The
    files list ``categories`` (:func:`coco_categories`; default COCO's 80, as the real files); the boxes
    are of those whose ids are in ``use`` (default :data:`BOX_IDS`; None: all listed)."""
    categories = coco_categories() if categories is None else categories
    drawn = [c for c in categories if use is None or c["id"] in use]
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_id, ann_id = 0, 0
    for split, n in (("train2017", train), ("val2017", val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for _ in range(n):
            image_id += 1
            h, w = size
            img = _background(rng, h, w)
            for _ in range(int(rng.integers(1, 4))):
                cat = drawn[int(rng.integers(len(drawn)))]
                bw, bh = int(rng.integers(40, w // 2)), int(rng.integers(40, h // 2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                img[y:y + bh, x:x + bw] = _colour(cat["id"])
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat["id"],
                                    "bbox": [x, y, bw, bh], "area": float(bw * bh), "iscrowd": 0,
                                    "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
            name = f"{image_id:012d}.jpg"
            Image.fromarray(img).save(root / split / name, quality=95)
            images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        doc = {"info": {"description": "rmix tiny COCO", "version": "1.0", "year": 2017},
               "licenses": [], "images": images, "annotations": annotations, "categories": list(categories)}
        kind = split.replace("2017", "")
        (root / "annotations" / f"instances_{kind}2017.json").write_text(json.dumps(doc))
    return root


def write_ade20k(root: Path, train: int = 4, val: int = 2, size=(256, 320), seed: int = 0) -> Path:
    """``root/ADEChallengeData2016`` with ``.jpg`` / ``.png`` pairs; label maps use 0..150. Returns the
    dataset root (the folder mmseg's ``data_root`` names)."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "ADEChallengeData2016"
    for split, prefix, n in (("training", "ADE_train", train), ("validation", "ADE_val", val)):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            h, w = size
            img = _background(rng, h, w)
            label = np.zeros((h, w), dtype=np.uint8)  # 0: "other", ignored after reduce_zero_label
            for _ in range(int(rng.integers(2, 5))):
                cls = int(rng.integers(1, 151))
                bw, bh = int(rng.integers(32, w // 2)), int(rng.integers(32, h // 2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                img[y:y + bh, x:x + bw] = _colour(cls)
                label[y:y + bh, x:x + bw] = cls
            name = f"{prefix}_{i:08d}"
            Image.fromarray(img).save(base / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(base / "annotations" / split / f"{name}.png")
    return base


def free_port() -> int:
    """A TCP port free on this machine now, for a torchrun rendezvous (no fixed port: parallel runs collide)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- is the OpenMMLab stack here? (under CI it must be: `make test` runs `make setup-mm`) ----------
def _have_mm() -> bool:
    try:
        import mmdet  # noqa: F401
        import mmseg  # noqa: F401
        from mmcv.ops import nms  # noqa: F401
        return True
    except ImportError:
        return False


HAVE_MM = _have_mm()
if not HAVE_MM and os.environ.get("CI"):
    raise RuntimeError("the OpenMMLab stack is missing under CI: `make test` runs `make setup-mm` first")
needs_mm = pytest.mark.skipif(not HAVE_MM, reason="OpenMMLab stack not installed: run `make setup-mm`")


def own_singletons(cfg) -> None:
    """Give an in-process mmengine Runner its own logger and visualizer.

    mmengine keeps them as process-wide singletons, named by the launch second and by the config's
    ``visualizer.name`` ('visualizer' in mmdet's and mmseg's runtime configs). A second Runner in the same
    process would get the first one's visualizer, which writes into the first run's folder: one pytest
    has already deleted when the first test passed.
    """
    import uuid

    name = f"rmix-test-{uuid.uuid4().hex}"
    cfg.experiment_name = name
    if cfg.get("visualizer") is not None:
        cfg.visualizer.name = name
