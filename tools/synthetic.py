"""Synthetic datasets in the real on-disk formats, for benchmarks (no downloads here).

``write_cifar_like`` writes a CIFAR-10 ``cifar-10-batches-py`` directory of any size;
``write_imagefolder_like`` writes an ImageNet ImageFolder tree of JPEGs with random sizes;
``write_tiny_imagefolder`` one of many tiny JPEGs (what grows with the file count, not decode time).
Images are smooth noise so PNG/JPEG sizes are realistic rather than trivially compressible.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def _smooth_noise(rng, h: int, w: int) -> np.ndarray:
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR)).astype(np.int16)
    return np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)


def write_cifar_batches(d: Path, pool: np.ndarray, n_train: int, n_val: int, rng, roll: bool = False) -> Path:
    """A ``cifar-10-batches-py`` directory (five train pickles, ``test_batch``, ``batches.meta``) of
    images drawn from ``pool`` (M, 32, 32, 3) with random labels."""
    d.mkdir(parents=True, exist_ok=True)
    per = n_train // 5
    for name, n in [(f"data_batch_{i}", per) for i in range(1, 6)] + [("test_batch", n_val)]:
        imgs = pool[rng.integers(0, len(pool), n)]
        if roll:
            imgs = np.roll(imgs, int(rng.integers(32)), axis=2)
        labels = rng.integers(0, 10, n)
        with open(d / name, "wb") as f:
            pickle.dump({b"labels": labels.tolist(), b"data": imgs.transpose(0, 3, 1, 2).reshape(n, 3072),
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return d


def write_cifar_like(root: Path, n_train: int = 50_000, n_val: int = 10_000, seed: int = 0) -> Path:
    d = Path(root) / "cifar-10-batches-py"
    if (d / "batches.meta").is_file():
        return d
    rng = np.random.default_rng(seed)
    # one pool of textures, tiled with random offsets: realistic PNG sizes without minutes of noise
    pool = np.stack([_smooth_noise(rng, 32, 32) for _ in range(512)])
    return write_cifar_batches(d, pool, n_train, n_val, rng, roll=True)


def write_imagefolder_like(root: Path, n_train: int = 2000, n_val: int = 200, classes: int = 10,
                           side=(300, 500), seed: int = 0) -> Path:
    root = Path(root)
    if (root / ".complete").is_file():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            c = i % classes
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(side[0], side[1] + 1, 2))
            Image.fromarray(_smooth_noise(rng, h, w)).save(d / f"n{c:08d}_{i}.JPEG", quality=90)
    (root / ".complete").write_text("ok")
    return root


def write_tiny_imagefolder(root: Path, classes: int = 1000, per_class: int = 200, side: int = 16,
                           seed: int = 0, empty: bool = False) -> Path:
    """``root/train/<wnid>/<wnid>_<i>.JPEG``: ``classes * per_class`` tiny valid JPEGs, for measuring
    what grows with the number of files (listing, the index, the plan) rather than decode time.
    One JPEG is encoded per class and written to each of its files (``empty``: zero-byte files, for
    listing alone); written once (``.complete``)."""
    root = Path(root)
    if (root / ".complete").is_file():
        return root
    rng = np.random.default_rng(seed)
    for c in range(classes):
        wnid = f"n{c:08d}"
        d = root / "train" / wnid
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(_smooth_noise(rng, side, side)).save(buf, format="JPEG", quality=90)
        data = b"" if empty else buf.getvalue()
        for i in range(per_class):
            with open(d / f"{wnid}_{i}.JPEG", "wb") as f:
                f.write(data)
    (root / ".complete").write_text("ok")
    return root
