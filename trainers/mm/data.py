"""The data a config names, checked before either loader (mmengine's DataLoader or ``--loader dali``) is built.

mmdet and mmseg find bad data late and say it with a traceback: an annotation file that is not JSON, a
listed image that is not on disk, an empty validation set, a label map of another size than its image, a
label above the classes (mmseg's metrics then print NaN), a COCO file whose categories do not cover the
labels the model predicts (mmdet's ``CocoMetric`` raises ``IndexError`` after a whole epoch). Each is one
line here (:class:`DataError`), said before any work:

- every dataset's data root, annotation file and image / label folders exist, and the evaluators' files;
- COCO (``CocoDataset`` and its subclasses): the annotation file is JSON with an ``images`` list, the list
  is not empty, every listed image is on disk, and its categories hold every class of the config's
  ``metainfo`` with at least as many as the model's ``num_classes`` (mmdet labels class *i* by the *i*-th
  category named in ``classes``, training and ``CocoMetric`` alike);
- ADE20K (``ADE20KDataset``): the set is not empty, every image has its label map, single-channel 8-bit, of
  the image's size (image width and height after EXIF orientation, as OpenCV decodes it), holding 0..150
  (0 = "other") or 255 (ignored) with ``reduce_zero_label``, 0..149 or 255 without.

Cost: one JSON parse per annotation file (mmdet parses it again when it builds its dataset), one directory
listing per image folder, and for ADE20K a header read per image and one decode per label map (the values
need the pixels), in a thread pool; under ``torchrun`` each rank checks its share of the label maps
(``RANK`` / ``WORLD_SIZE``), so the whole set is read once per job.
"""

from __future__ import annotations

import json
import os
import os.path as osp
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
ADE_IGNORE = 255  # mmseg's ignore_index: padding, and "other" after reduce_zero_label
EXIF_ORIENTATION = 0x0112  # values 5..8: rotated by 90 degrees, width and height swap when decoded


class DataError(ValueError):
    """Data that mmdet / mmseg would fail on; its message is the one line the user sees."""


def datasets(cfg, loaders) -> Iterator[tuple[str, dict]]:
    """(loader name, dataset config) for each of ``loaders`` the config has, inside any wrapper dataset."""
    for name in loaders:
        loader = cfg.get(name)
        if not loader:
            continue
        ds = loader.get("dataset")
        while ds is not None and "dataset" in ds and "data_root" not in ds:  # RepeatDataset, ClassBalanced...
            ds = ds["dataset"]
        if ds is not None:
            yield name, ds


def evaluators(cfg, loader: str) -> list:
    """The evaluator configs that score ``loader``'s dataset (``val_dataloader`` -> ``val_evaluator``)."""
    found = cfg.get(loader.split("_")[0] + "_evaluator")
    return found if isinstance(found, list) else [found] if found else []


def set_data_root(cfg, root: str) -> None:
    """Point every dataloader, and the COCO evaluator's ``ann_file``, at ``root``."""
    root = root.rstrip("/") + "/"
    old_roots = set()
    for _, ds in datasets(cfg, LOADERS):
        if ds.get("data_root"):
            old_roots.add(ds["data_root"].rstrip("/"))
        ds["data_root"] = root
    for name in ("val_dataloader", "test_dataloader"):
        for ev in evaluators(cfg, name):
            ann = ev.get("ann_file")
            if ann:
                for old in old_roots:
                    if ann.startswith(old):
                        ev["ann_file"] = osp.join(root, ann[len(old):].lstrip("/"))
                        break


def check_data(cfg, loaders) -> None:
    """Raise :class:`DataError` (one line) for the first problem in the data of ``loaders``."""
    check_paths(cfg, loaders)
    check_contents(cfg, loaders)


def check_paths(cfg, loaders) -> None:
    """Every dataset's ``data_root``, annotation file and image/label folders exist, and the evaluators' files."""
    for name, ds in datasets(cfg, loaders):
        root = ds.get("data_root") or ""
        if root and not osp.isdir(root):
            raise DataError(f"{name}: data root {root} does not exist (pass --data-root DIR; the layout is in "
                            "the README's 'Detection and segmentation' section)")
        ann = ds.get("ann_file")
        if ann and not osp.isfile(osp.join(root, ann)):
            raise DataError(f"{name}: no annotation file {osp.join(root, ann)}")
        for key, sub in (ds.get("data_prefix") or {}).items():
            if sub and not osp.isdir(osp.join(root, sub)):
                raise DataError(f"{name}: no {key} folder {osp.join(root, sub)}")
    for name in loaders:
        for ev in evaluators(cfg, name):
            if ev.get("ann_file") and not osp.isfile(ev["ann_file"]):
                raise DataError(f"{name.split('_')[0]}_evaluator: no annotation file {ev['ann_file']}")


def check_contents(cfg, loaders) -> None:
    """The COCO and ADE20K checks of the module docstring, for the datasets of ``loaders``."""
    coco_files: dict[str, dict] = {}  # one parse per file: a split's file is often its evaluator's too
    for name, ds in datasets(cfg, loaders):
        kind = dataset_kind(cfg, ds.get("type"))
        if kind == "coco" and ds.get("ann_file"):
            cls = dataset_class(cfg, ds["type"])
            classes = list((ds.get("metainfo") or {}).get("classes") or cls.METAINFO["classes"])
            num_classes = head_classes(cfg.get("model") or {})
            root = ds.get("data_root") or ""
            path = osp.join(root, ds["ann_file"])
            doc = _coco_file(path, coco_files)
            _check_coco_images(name, path, doc, osp.join(root, (ds.get("data_prefix") or {}).get("img", "")))
            _check_coco_categories(name, path, doc, classes, num_classes)
            for ev in evaluators(cfg, name):
                if ev.get("ann_file") and ev["ann_file"] != path:
                    _check_coco_categories(name.split("_")[0] + "_evaluator", ev["ann_file"],
                                           _coco_file(ev["ann_file"], coco_files), classes, num_classes)
        elif kind == "ade20k":
            _check_ade(name, ds, len(dataset_class(cfg, ds["type"]).METAINFO["classes"]))


# -- which dataset, which classes ------------------------------------------------------------------

def dataset_class(cfg, kind) -> Optional[type]:
    """The dataset class a config's ``type`` names, from mmdet's or mmseg's registry (by ``default_scope``);
    None for a scope or type we do not check."""
    if not isinstance(kind, str):
        return kind if isinstance(kind, type) else None
    scope = cfg.get("default_scope")
    if scope == "mmdet":
        from mmdet.registry import DATASETS
    elif scope == "mmseg":
        from mmseg.registry import DATASETS
    else:
        return None
    try:
        return DATASETS.get(kind)
    except (KeyError, ImportError):  # an unknown type: mmengine says so when it builds the dataset
        return None


def dataset_kind(cfg, kind) -> Optional[str]:
    """"coco" for mmdet's ``CocoDataset`` (and subclasses), "ade20k" for mmseg's ``ADE20KDataset``, else None."""
    cls = dataset_class(cfg, kind)
    if cls is None:
        return None
    if cfg.get("default_scope") == "mmdet":
        from mmdet.datasets import CocoDataset

        return "coco" if issubclass(cls, CocoDataset) else None
    from mmseg.datasets import ADE20KDataset

    return "ade20k" if issubclass(cls, ADE20KDataset) else None


def head_classes(model) -> Optional[int]:
    """The largest ``num_classes`` among the model's heads (the labels it predicts are 0..n-1); None if none."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            n = node.get("num_classes")
            if isinstance(n, int) and not isinstance(n, bool):
                found.append(n)
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(model)
    return max(found) if found else None


# -- COCO ------------------------------------------------------------------------------------------

def _coco_file(path: str, cache: dict) -> dict:
    """``{"file_names": [...], "categories": [names]}`` of a COCO annotation file, or :class:`DataError`."""
    if path in cache:
        return cache[path]
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}): a COCO "
                        "annotation file is one JSON object with images, annotations and categories") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.reason} at byte {e.start}): a COCO annotation file is "
                        "UTF-8 JSON") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path} is not a COCO annotation file: it has no 'images' list (is it a results file "
                        "or another dataset's annotations?)")
    names = []
    for i, img in enumerate(images):
        name = img.get("file_name") if isinstance(img, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: images[{i}] has no file_name")
        names.append(name)
    cats = doc.get("categories")
    cats = [c.get("name") for c in cats if isinstance(c, dict)] if isinstance(cats, list) else []
    cache[path] = {"file_names": names, "categories": cats}
    return cache[path]


def _check_coco_images(name: str, path: str, doc: dict, img_dir: str) -> None:
    names = doc["file_names"]
    if not names:
        raise DataError(f"{name}: {path} lists no images: the {name.split('_')[0]} set is empty")
    listed: dict[str, set] = {}  # one listing per folder instead of a stat per image

    def present(file_name: str) -> bool:
        folder, base = osp.split(osp.join(img_dir, file_name))
        if folder not in listed:
            try:
                listed[folder] = set(os.listdir(folder))
            except OSError:
                listed[folder] = set()
        return base in listed[folder]

    missing = [n for n in names if not present(n)]
    if missing:
        raise DataError(f"{name}: {len(missing)} of the {len(names)} images {path} lists are not in {img_dir} "
                        f"(first: {missing[0]})")


def _check_coco_categories(name: str, path: str, doc: dict, classes: list, num_classes: Optional[int]) -> None:
    present = set(doc["categories"])
    covered = sum(1 for c in doc["categories"] if c in classes)  # mmdet's cat_ids: the file's categories named
    missing = [c for c in classes if c not in present]
    needed = max(len(classes), num_classes or 0)
    if missing or covered < needed:
        what = f"(missing: {', '.join(map(repr, missing[:3]))}{' ...' if len(missing) > 3 else ''})" if missing \
            else f"(the head's num_classes is {num_classes}, the config names {len(classes)} classes)"
        raise DataError(f"{name}: {path} has categories for {covered} of the {needed} classes the model predicts "
                        f"{what}: mmdet labels class i by the i-th of them (CocoMetric fails with IndexError after "
                        "the epoch); use the full annotation file, or set the dataset's metainfo=dict(classes=...) "
                        "and the head's num_classes to the file's categories")


# -- ADE20K ----------------------------------------------------------------------------------------

def _ade_pairs(name: str, ds: dict) -> list[tuple[str, str]]:
    """(image, label map) paths as mmseg's ``BaseSegDataset.load_data_list`` forms them."""
    root = ds.get("data_root") or ""
    prefix = ds.get("data_prefix") or {}
    img_dir, seg_dir = osp.join(root, prefix.get("img_path", "")), osp.join(root, prefix.get("seg_map_path", ""))
    img_suffix, seg_suffix = ds.get("img_suffix", ".jpg"), ds.get("seg_map_suffix", ".png")
    if ds.get("ann_file"):  # a split file: one image name (no suffix) per line
        with open(osp.join(root, ds["ann_file"])) as f:
            stems = [line.strip() for line in f if line.strip()]
    else:
        stems = sorted(osp.relpath(osp.join(d, f), img_dir)[:-len(img_suffix)]
                       for d, _, files in os.walk(img_dir, followlinks=True) for f in files if f.endswith(img_suffix))
    if not stems:
        raise DataError(f"{name}: no *{img_suffix} images in {img_dir}: the {name.split('_')[0]} set is empty")
    pairs = [(osp.join(img_dir, s + img_suffix), osp.join(seg_dir, s + seg_suffix)) for s in stems]
    for kind, i in (("image", 0), ("label map", 1)):
        missing = [p[i] for p in pairs if not osp.isfile(p[i])]
        if missing:
            raise DataError(f"{name}: {len(missing)} of the {len(pairs)} {kind}s are missing (first: {missing[0]})")
    return pairs


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) as OpenCV decodes the file (EXIF orientation applied), from its header."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_ade_pair(pair: tuple[str, str], top: int) -> Optional[str]:
    """What is wrong with one (image, label map), or None."""
    import numpy as np
    from PIL import Image

    img, seg = pair
    try:
        size = _image_size(img)
        with Image.open(seg) as im:
            if im.mode not in ("L", "P"):
                return f"label map {seg} is mode {im.mode}; ADE20K's are 8-bit single-channel (mode L) class indices"
            if im.size != size:
                return (f"label map {seg} is {im.size[0]}x{im.size[1]}, its image {img} {size[0]}x{size[1]}: "
                        "they must have the same size")
            labels = np.asarray(im)
    except OSError as e:
        return f"cannot read {img} / {seg}: {e}"
    high = labels.max(initial=0)
    if high > top and (high != ADE_IGNORE or ((labels > top) & (labels != ADE_IGNORE)).any()):
        bad = int(labels[(labels > top) & (labels != ADE_IGNORE)].max())
        return (f"label map {seg} holds {bad}: ADE20K's labels are 0..{top} and {ADE_IGNORE} (ignored); "
                "is it another dataset's label map?")
    return None


def _check_ade(name: str, ds: dict, num_classes: int) -> None:
    pairs = _ade_pairs(name, ds)
    reduce = ds.get("reduce_zero_label", True)
    for t in ds.get("pipeline") or []:
        if t.get("type") == "LoadAnnotations" and t.get("reduce_zero_label") is not None:
            reduce = t["reduce_zero_label"]  # mmseg's LoadAnnotations overrides the dataset's
    top = num_classes if reduce else num_classes - 1
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mine = pairs[rank::world] if 0 <= rank < world else pairs
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))  # PIL decodes without the GIL
    try:
        for problem in pool.map(lambda p: _check_ade_pair(p, top), mine):
            if problem:
                raise DataError(f"{name}: {problem}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on the first problem, the rest is not read
