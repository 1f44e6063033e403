"""Datasets in their real on-disk formats, as indexable sources of encoded samples.

* CIFAR-10 ``cifar-10-batches-py/`` (pickled ``data_batch_1..5``, ``test_batch``, ``batches.meta``) and
  CIFAR-100 ``cifar-100-python/`` (``train``, ``test``, ``meta``): keys ``b'data'`` (N, 3072) uint8
  as R, G, B planes of 32x32 row-major, ``b'labels'`` / ``b'fine_labels'``, ``b'filenames'``.
* ImageNet in ImageFolder layout ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` (files in folders nested
  inside a class folder belong to that class, as in torchvision's ImageFolder); class index = sorted
  wnid order of ``train/`` (torchvision's convention) for every split; a val class missing from train,
  or a class folder without images, is an error. Sample keys are the percent-encoded ``<wnid>/<path in
  the class folder>`` (:func:`image_key`). The files are listed once (no ``stat`` per file) into a
  packed :class:`FileIndex`, ~22 bytes a file.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from urllib.parse import quote

import numpy as np
from PIL import Image, UnidentifiedImageError

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


CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}


def _cifar_classes(path: Path, names_key: bytes, expected: int) -> list[str]:
    meta = _unpickle(path)
    if not isinstance(meta, dict) or names_key not in meta:
        raise ShardError(f"{path} has no {names_key!r}: not a CIFAR meta file")
    names = _decode_names(meta[names_key])
    if len(names) != expected:
        raise ShardError(f"{path}: {names_key!r} lists {len(names)} classes, expected {expected}")
    return names


def _cifar_batch(path: Path, dataset: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(data (N, 3072) uint8, labels (N,) int64)`` of one CIFAR batch file, checked."""
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ShardError(f"{path} has no {b'data'!r}/{label_key!r} keys: not a {dataset} batch")
    try:
        raw = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key])
    except (ValueError, TypeError) as e:
        raise ShardError(f"{path}: unreadable data or labels ({e})") from None
    if raw.ndim != 2 or raw.shape[1] != 3072:
        raise ShardError(f"{path}: data has shape {raw.shape}, expected (N, 3072) (R, G, B planes of 32x32)")
    if raw.dtype != np.uint8:
        if not np.issubdtype(raw.dtype, np.integer) or (raw.size and (raw.min() < 0 or raw.max() > 255)):
            raise ShardError(f"{path}: data must be uint8 pixels 0..255, got {raw.dtype}")
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ShardError(f"{path}: {label_key!r} must be a list of integers, got {labels.dtype} {labels.shape}")
    if len(labels) != len(raw):
        raise ShardError(f"{path}: {len(raw)} images but {len(labels)} labels")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ShardError(f"{path}: label {int(bad[0])} outside 0..{num_classes - 1} ({len(bad)} such labels)")
    return raw.astype(np.uint8, copy=False), labels.astype(np.int64)


def find_cifar_dir(dataset: str, src: Path) -> Path:
    """Accept the CIFAR directory itself or its parent."""
    dirname, splits, meta, _, _ = CIFAR_LAYOUT[dataset]
    for cand in (src, src / dirname):
        if (cand / meta).is_file():
            return cand
    raise ShardError(f"{src} is not a {dataset} directory: expected {meta} in it or in {src / dirname}")


class CifarSource(Source):
    """A CIFAR split held in memory as (N, 32, 32, 3) uint8; stored losslessly as PNG.

    Every file is checked while it is read: ``data`` a (N, 3072) array of 0..255, as many labels as
    rows, labels in ``0..len(label_names)-1``, and the meta file's label names as many as the dataset
    has classes. A mismatch is one :class:`ShardError` naming the file, never a shifted label.
    """

    ext = "png"

    def __init__(self, dataset: str, src: Path, split: str):
        root = find_cifar_dir(dataset, Path(src))
        _, files, meta, label_key, names_key = CIFAR_LAYOUT[dataset]
        self.classes = _cifar_classes(root / meta, names_key, CIFAR_CLASSES[dataset])
        datas, labels = [], []
        for fname in files[split]:
            data, lab = _cifar_batch(root / fname, dataset, label_key, len(self.classes))
            datas.append(data)
            labels.append(lab)
        data = np.concatenate(datas)
        # rows are R, G, B planes of 32x32: (N, 3, 32, 32) -> (N, 32, 32, 3)
        self.images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        self.labels = np.concatenate(labels)
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


def _listdir(path: Path) -> list[os.DirEntry]:
    """The entries of ``path`` sorted by name; unreadable folders are one clear error."""
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise ShardError(f"cannot read folder {path}: {e.strerror}") from None


def _class_dirs(root: Path) -> list[str]:
    """Names of the class folders under ``root`` (symlinks to folders count; a symlink loop is an error)."""
    names = []
    for entry in _listdir(root):
        try:
            if entry.is_dir():
                names.append(entry.name)
        except OSError as e:  # a symlink loop or a folder that vanished
            raise ShardError(f"cannot read {entry.path}: {e.strerror}") from None
    return names


def imagefolder_classes(src: Path) -> list[str]:
    """The class index of an ImageFolder tree: the sorted folder names of ``<src>/train``, for every
    split (torchvision's convention, with train as the one source of truth)."""
    train = Path(src) / "train"
    if not train.is_dir():
        raise ShardError(f"missing ImageNet train directory {train}: the class index comes from "
                         f"train/<wnid>/ for every split (also with --split val)")
    classes = _class_dirs(train)
    if not classes:
        raise ShardError(f"{train} has no class directories (expected train/<wnid>/*.JPEG)")
    return classes


def image_key(rel: str) -> str:
    """Sample key of a file at ``rel`` (``<wnid>/<file name>``), unique by construction.

    webdataset and DALI cut a member name at its first dot, and DALI's ``.idx`` is space-separated,
    so a key may hold neither. Percent-encoding the whole relative path (``/``, ``%``, spaces and
    non-ASCII included) and then ``.`` as ``%2E`` is injective: ``a.b.JPEG`` and ``a_b.JPEG``, or
    ``x.JPEG`` / ``x.jpeg`` / ``x.png``, stay distinct, and ``urllib.parse.unquote`` gives the path back.
    """
    return quote(rel, safe="").replace(".", "%2E")


def _list_images(folder: str) -> tuple[list[str], Optional[str]]:
    """The image files under ``folder``, nested folders included, as paths relative to it (``x.JPEG``,
    ``sub/y.JPEG``) in torchvision's ``ImageFolder`` order: folders in sorted path order (the class
    folder first), names sorted within each; or ``([], reason)`` when a folder cannot be read.

    One ``scandir`` pass per folder and no ``stat`` per file: ``DirEntry.is_file()`` / ``is_dir()``
    answer from the entry's type (``d_type``); only symlinks, and entries of file systems that leave the
    type unknown, cost a ``stat``, and one ``stat`` per folder finds symlink loops.
    Symlinked folders are followed (as torchvision's ``os.walk(followlinks=True)``); one that leads
    back to a folder above it is a loop and the reason."""
    listed = []  # (relative folder, [names]) of every folder under ``folder``

    def walk(path: str, rel: str, above: tuple) -> Optional[str]:
        names, subdirs = [], []
        try:
            with os.scandir(path) as it:
                for entry in it:
                    image = entry.name.lower().endswith(IMAGE_EXTENSIONS)
                    try:  # a dangling or looping symlink is listed too: encode() rejects it with its reason
                        if image and (entry.is_file() or (entry.is_symlink() and not entry.is_dir())):
                            names.append(entry.name)
                        elif entry.is_dir():
                            subdirs.append(entry.name)
                    except OSError:
                        if image:
                            names.append(entry.name)
        except OSError as e:
            return f"cannot read folder {path}: {e.strerror}"
        listed.append((rel, sorted(names)))
        for name in subdirs:
            sub = os.path.join(path, name)
            try:
                st = os.stat(sub)
            except OSError as e:
                return f"cannot read folder {sub}: {e.strerror}"
            if (st.st_dev, st.st_ino) in above:
                return f"cannot read folder {sub}: it leads back to a folder above it (a symlink loop)"
            error = walk(sub, f"{rel}/{name}" if rel else name, above + ((st.st_dev, st.st_ino),))
            if error:
                return error
        return None

    try:
        top = os.stat(folder)
    except OSError as e:
        return [], f"cannot read folder {folder}: {e.strerror}"
    error = walk(folder, "", ((top.st_dev, top.st_ino),))
    if error:
        return [], error
    listed.sort(key=lambda x: x[0])  # torchvision: sorted(os.walk(...)), i.e. by folder path
    return [f"{rel}/{n}" if rel else n for rel, names in listed for n in names], None


class FileIndex:
    """The files of one split, compact: a few bytes per file however many there are.

    File ``i`` is ``<root>/<folders[f]>/<name i>`` where ``f`` is the folder whose range ``starts[f] <=
    i < starts[f + 1]`` holds it (a name holds ``/`` for a file in a nested folder). Names are packed,
    file-system encoded, in one ``bytes`` buffer with their end offsets in a numpy array, so the index
    costs the names' bytes plus 4 (8 past 4 GiB of names) per file, instead of a Python ``str`` of the
    full path (~100 bytes more) per file. Numpy buffers also hold no per-object reference counts, so the
    encode workers forked from the main process share these pages instead of copying them as they read.
    """

    def __init__(self, root: str, folders: list[str], threads: int = 2):
        self.root, self.folders = root, list(folders)
        counts, chunks, lengths = [], [], []

        def one(folder: str):
            names, error = _list_images(os.path.join(root, folder))
            encoded = [os.fsencode(n) for n in names]
            return error, len(encoded), b"".join(encoded), np.fromiter(map(len, encoded), np.int64, len(encoded))

        # two threads: one folder's wait on the file system (scandir waits without the GIL: most of
        # the time on a network file system or a cold cache) overlaps another's Python work. More only
        # fight over the GIL: 8 threads listed a warm 1.28M-file tree 1.7x slower than 1 or 2 here.
        # The result keeps folder order.
        with ThreadPoolExecutor(max(1, min(threads, len(self.folders)))) as pool:
            for error, count, chunk, lens in pool.map(one, self.folders):
                if error:
                    raise ShardError(error)
                counts.append(count)
                chunks.append(chunk)
                lengths.append(lens)
        self.starts = np.zeros(len(self.folders) + 1, np.int64)
        np.cumsum(counts, out=self.starts[1:])
        self.names = b"".join(chunks)
        del chunks
        ends = np.cumsum(np.concatenate(lengths) if lengths else np.zeros(0, np.int64))
        self.offsets = np.zeros(len(ends) + 1, np.uint32 if len(self.names) < 2**32 else np.int64)
        self.offsets[1:] = ends

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def folder(self, i: int) -> int:
        """Index in ``folders`` of file ``i``'s folder."""
        if not 0 <= i < len(self):
            raise IndexError(f"file {i} of {len(self)}")
        return int(np.searchsorted(self.starts, i, side="right")) - 1

    def name(self, i: int) -> str:
        return os.fsdecode(self.names[int(self.offsets[i]) : int(self.offsets[i + 1])])

    def rel(self, i: int) -> str:
        """``<folder>/<name>``, with ``/`` whatever the OS."""
        return f"{self.folders[self.folder(i)]}/{self.name(i)}"

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.folders[self.folder(i)], self.name(i))

    def nbytes(self) -> int:
        return len(self.names) + self.offsets.nbytes + self.starts.nbytes


class ImageFolderSource(Source):
    """``<src>/<split>/<wnid>/<file>`` (and ``<wnid>/<folders>/<file>``, as torchvision's ImageFolder):
    JPEG bytes copied when already an RGB baseline JPEG (and no resize is asked for), else decoded,
    converted to RGB and re-encoded. Corrupt or truncated files (and file symlinks that loop or dangle)
    become :class:`Reject`s.

    ``classes`` is the class index (:func:`imagefolder_classes`, from train); a class folder of this
    split that is not in it is an error, since its images would have no label, and so is a class
    folder without images (torchvision's ImageFolder raises for one too). Files are numbered in sorted
    class order, then torchvision's order within a class (:func:`_list_images`), and held in a
    :class:`FileIndex`.
    """

    ext = "jpg"

    def __init__(self, src: Path, split: str, classes: list[str], max_side: Optional[int] = None,
                 quality: int = 90):
        root = Path(src) / split
        if not root.is_dir():
            raise ShardError(f"missing ImageNet split directory {root} (expected <src>/{split}/<wnid>/*.JPEG)")
        here = _class_dirs(root)
        index = {wnid: i for i, wnid in enumerate(classes)}
        unknown = [w for w in here if w not in index]
        if unknown:
            raise ShardError(f"{root}: class folder(s) {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                             f"not in {Path(src) / 'train'} (the class index comes from train)")
        self.classes = list(classes)
        self.files = FileIndex(str(root), here)
        looked = f"looked for {', '.join(IMAGE_EXTENSIONS)}, any case, nested folders included"
        if not len(self.files):
            raise ShardError(f"{root}: no images in any of its {len(here)} class folders ({looked})")
        empty = [w for w, n in zip(here, np.diff(self.files.starts)) if not n]
        if empty:  # torchvision's ImageFolder refuses these too (FileNotFoundError)
            raise ShardError(f"{root}: no images in class folder(s) {', '.join(empty[:5])}"
                             f"{' ...' if len(empty) > 5 else ''} ({looked}): add its images, or remove the folder")
        self.folder_labels = np.asarray([index[w] for w in here], dtype=np.int64)
        self.root, self.max_side, self.quality, self.split = root, max_side, quality, split

    def __len__(self):
        return len(self.files)

    def key(self, i: int) -> str:
        return image_key(self.files.rel(i))

    def label(self, i: int) -> int:
        return int(self.folder_labels[self.files.folder(i)])

    def _load(self, i: int):
        path = self.files.path(i)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            img = Image.open(io.BytesIO(raw))
        except UnidentifiedImageError:  # PIL names the in-memory file by its address: name the file
            raise UnidentifiedImageError(f"cannot identify image file {self.files.rel(i)!r}") from None
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
            return Reject(self.files.path(i), f"{type(e).__name__}: {e}".replace("\t", " ").replace("\n", " "))
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
        return ImageFolderSource(src, split, imagefolder_classes(src), max_side=max_side, quality=quality)
    raise ShardError(f"unknown dataset {dataset!r}; choose from cifar10, cifar100, imagenet, digits")
