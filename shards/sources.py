"""Datasets in their real on-disk formats, as indexable sources of encoded samples.

* CIFAR-10 ``cifar-10-batches-py/`` (pickled ``data_batch_1..5``, ``test_batch``, ``batches.meta``) and
  CIFAR-100 ``cifar-100-python/`` (``train``, ``test``, ``meta``): keys ``b'data'`` (N, 3072) uint8
  as R, G, B planes of 32x32 row-major, ``b'labels'`` / ``b'fine_labels'``, ``b'filenames'``.
* ImageNet in ImageFolder layout ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``; class index = sorted
  wnid order (torchvision's convention).
* ``digits``: scikit-learn's bundled 8x8 digits written once as a CIFAR-10-format pickle directory
  and then read by the CIFAR code path.

A source's ``encode(i)`` returns the bytes stored in the shards (PNG for CIFAR, JPEG for ImageNet) or a
:class:`Reject` with the reason; ``array(i)`` returns the decoded RGB uint8 (H, W, 3) image for FFCV.
Splits are called ``train`` and ``val`` everywhere (CIFAR's ``test_batch`` is its ``val``).
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image

from .errors import ShardError

SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Reject:
    """A sample that could not be read; listed in ``rejects.tsv`` with its reason."""

    path: str
    reason: str


@dataclass
class Encoded:
    key: str
    ext: str
    data: bytes
    label: int


class Source:
    """One split of a dataset: ``len()``, ``key(i)``, ``label(i)``, ``encode(i)``, ``array(i)``."""

    ext = "png"
    classes: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def encode(self, i: int) -> Union[Encoded, Reject]:
        raise NotImplementedError

    def array(self, i: int) -> np.ndarray:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# CIFAR


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise ShardError(f"missing CIFAR file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ShardError(f"corrupt CIFAR pickle {path}: {e}") from None


def _decode_names(names) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


CIFAR_LAYOUT = {
    # dataset: (directory name, {split: files}, meta file, label key, names key)
    "cifar10": (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]},
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": ("cifar-100-python", {"train": ["train"], "val": ["test"]}, "meta", b"fine_labels", b"fine_label_names"),
}


def find_cifar_dir(dataset: str, src: Path) -> Path:
    """Accept the CIFAR directory itself or its parent."""
    dirname, splits, meta, _, _ = CIFAR_LAYOUT[dataset]
    for cand in (src, src / dirname):
        if (cand / meta).is_file():
            return cand
    raise ShardError(f"{src} is not a {dataset} directory: expected {meta} in it or in {src / dirname}")


class CifarSource(Source):
    """A CIFAR split held in memory as (N, 32, 32, 3) uint8; stored losslessly as PNG."""

    ext = "png"

    def __init__(self, dataset: str, src: Path, split: str):
        root = find_cifar_dir(dataset, Path(src))
        _, files, meta, label_key, names_key = CIFAR_LAYOUT[dataset]
        datas, labels, names = [], [], []
        for fname in files[split]:
            batch = _unpickle(root / fname)
            if b"data" not in batch or label_key not in batch:
                raise ShardError(f"{root / fname} has no {b'data'!r}/{label_key!r} keys: not a {dataset} batch")
            datas.append(np.asarray(batch[b"data"], dtype=np.uint8))
            labels.extend(batch[label_key])
            names.extend(_decode_names(batch.get(b"filenames", [])))
        data = np.concatenate(datas)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ShardError(f"{root}: CIFAR data must be (N, 3072), got {data.shape}")
        # rows are R, G, B planes of 32x32: (N, 3, 32, 32) -> (N, 32, 32, 3)
        self.images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        self.labels = np.asarray(labels, dtype=np.int64)
        self.filenames = names if len(names) == len(self.labels) else [f"{split}_{i:06d}" for i in range(len(self.labels))]
        self.classes = _decode_names(_unpickle(root / meta)[names_key])
        self.split = split

    def __len__(self):
        return len(self.labels)

    def key(self, i: int) -> str:
        return f"{self.split}_{i:06d}"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def encode(self, i):
        buf = io.BytesIO()
        Image.fromarray(self.images[i]).save(buf, format="PNG", compress_level=1)
        return Encoded(self.key(i), "png", buf.getvalue(), self.label(i))

    def array(self, i):
        return self.images[i]


# ---------------------------------------------------------------------------------------------
# ImageNet


class ImageFolderSource(Source):
    """``<src>/<split>/<wnid>/<file>``: JPEG bytes copied when already an RGB baseline JPEG (and no
    resize is asked for), else decoded, converted to RGB and re-encoded. Corrupt or truncated files
    become :class:`Reject`s."""

    ext = "jpg"

    def __init__(self, src: Path, split: str, max_side: Optional[int] = None, quality: int = 90):
        root = Path(src) / split
        if not root.is_dir():
            raise ShardError(f"missing ImageNet split directory {root} (expected <src>/{split}/<wnid>/*.JPEG)")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise ShardError(f"{root} has no class directories")
        self.paths: list[str] = []
        labels = []
        for idx, wnid in enumerate(self.classes):
            for entry in sorted(os.scandir(root / wnid), key=lambda e: e.name):
                if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    self.paths.append(entry.path)
                    labels.append(idx)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.root, self.max_side, self.quality, self.split = root, max_side, quality, split

    def __len__(self):
        return len(self.paths)

    def key(self, i: int) -> str:
        rel = os.path.relpath(self.paths[i], self.root)
        # webdataset and DALI split a member name at its first dot: keys carry no dots or slashes
        return os.path.splitext(rel)[0].replace(os.sep, "_").replace(".", "_")

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def _load(self, i: int):
        path = self.paths[i]
        with open(path, "rb") as f:
            raw = f.read()
        img = Image.open(io.BytesIO(raw))
        img.load()  # full decode: truncated or corrupt data raises here, not in the trainer
        return raw, img

    def _needs_resize(self, img: Image.Image) -> bool:
        return self.max_side is not None and max(img.size) > self.max_side

    def _to_rgb(self, img: Image.Image) -> Image.Image:
        if img.mode != "RGB":
            img = img.convert("RGB")  # CMYK, grayscale, palette, RGBA (PNG named .JPEG) all end here
        if self._needs_resize(img):
            scale = self.max_side / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.BICUBIC)
        return img

    def encode(self, i):
        try:
            raw, img = self._load(i)
            baseline_rgb_jpeg = (
                img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
                and not img.info.get("progression")
            )
            if not (baseline_rgb_jpeg and not self._needs_resize(img)):
                buf = io.BytesIO()
                self._to_rgb(img).save(buf, format="JPEG", quality=self.quality)
                raw = buf.getvalue()
        except Exception as e:  # any decoder failure is a reject with its reason, never a crash
            return Reject(self.paths[i], f"{type(e).__name__}: {e}".replace("\t", " ").replace("\n", " "))
        return Encoded(self.key(i), "jpg", raw, self.label(i))

    def array(self, i):
        _, img = self._load(i)
        return np.asarray(self._to_rgb(img))


# ---------------------------------------------------------------------------------------------
# digits (the embedded default)

DIGITS_VAL = 297  # fixed split: 1500 train / 297 val, chosen once with a fixed seed


def write_digits_as_cifar(dest: Path) -> Path:
    """Write scikit-learn's digits as a CIFAR-10-format directory (RGB 32x32) and return it.

    Idempotent: an existing complete directory is reused.
    """
    from sklearn.datasets import load_digits

    root = Path(dest) / CIFAR_LAYOUT["cifar10"][0]
    if (root / "batches.meta").is_file():
        return root
    tmp = root.with_name(root.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), values 0..16
    big = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BILINEAR)) for g in gray])
    rgb = np.repeat(big[:, None], 3, axis=1)  # (N, 3, 32, 32): planes R, G, B
    order = np.random.default_rng(0).permutation(len(gray))
    parts = {"data_batch_1": order[:-DIGITS_VAL], "test_batch": order[-DIGITS_VAL:]}
    for name, idx in parts.items():
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in digits.target[idx]],
            b"data": rgb[idx].reshape(len(idx), 3072),
            b"filenames": [f"digit_{j:04d}.png".encode() for j in idx],
        }
        with open(tmp / name, "wb") as f:
            pickle.dump(batch, f)
    for j in range(2, 6):  # CIFAR-10 has five train batches; the rest are empty
        with open(tmp / f"data_batch_{j}", "wb") as f:
            pickle.dump({b"labels": [], b"data": np.zeros((0, 3072), np.uint8), b"filenames": []}, f)
    with open(tmp / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [str(d).encode() for d in range(10)], b"num_vis": 3072}, f)
    os.replace(tmp, root)
    return root


def open_source(dataset: str, src: Optional[Path], split: str, out: Path, max_side=None, quality=90) -> Source:
    """The source for one split of ``dataset``; ``digits`` materialises itself under ``out``."""
    if split not in SPLITS:
        raise ShardError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if dataset == "digits":
        return CifarSource("cifar10", write_digits_as_cifar(Path(out) / "source"), split)
    if src is None:
        raise ShardError(f"--src is required for {dataset}")
    src = Path(src)
    if not src.exists():
        raise ShardError(f"source path {src} does not exist")
    if dataset in CIFAR_LAYOUT:
        return CifarSource(dataset, src, split)
    if dataset == "imagenet":
        return ImageFolderSource(src, split, max_side=max_side, quality=quality)
    raise ShardError(f"unknown dataset {dataset!r}; choose from cifar10, cifar100, imagenet, digits")
