"""Benchmark images cut from real photographs, in ImageNet's folder layout (no downloads here).

JPEG decode cost depends on content: smooth noise compresses and decodes unlike a photograph. The
photographs that pinned dependencies ship (scikit-learn's ``china.jpg`` and ``flower.jpg``,
matplotlib's ``grace_hopper.jpg``) are cut into random crops of random scale and aspect, flipped,
rescaled to 300-500 px on the longer side (ImageNet's typical size) and saved at JPEG quality 90.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tools.synthetic import write_cifar_batches


def source_photographs() -> list[np.ndarray]:
    """The RGB photographs shipped with scikit-learn and matplotlib, as uint8 (H, W, 3) arrays."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(img) for img in load_sample_images().images]
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if hopper.is_file():
        photos.append(np.asarray(Image.open(hopper).convert("RGB")))
    return photos


def photo_crop(rng: np.random.Generator, photos: list, side: tuple[int, int]) -> Image.Image:
    """A random crop (10-100 % of the area, aspect 3/4-4/3) of a random photograph, maybe flipped,
    rescaled so its longer side is in ``side``."""
    src = photos[int(rng.integers(len(photos)))]
    h, w = src.shape[:2]
    area = h * w * rng.uniform(0.1, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
    cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = Image.fromarray(src[y : y + ch, x : x + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    longer = int(rng.integers(side[0], side[1] + 1))
    scale = longer / max(ch, cw)
    return img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)


def write_photo_imagefolder(root: Path, n_train: int = 1024, n_val: int = 64, classes: int = 10,
                            side=(300, 500), quality: int = 90, seed: int = 0) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG`` of photograph crops; reused when already complete."""
    root = Path(root)
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{n_train} {n_val} {classes} {side} {quality} {seed}":
        return root
    rng = np.random.default_rng(seed)
    photos = source_photographs()
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            wnid = f"n{i % classes:08d}"
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            photo_crop(rng, photos, side).save(d / f"{wnid}_{i}.JPEG", quality=quality)
    done.write_text(f"{n_train} {n_val} {classes} {side} {quality} {seed}")
    return root


def write_photo_cifar(root: Path, n_train: int = 50_000, n_val: int = 10_000, seed: int = 0) -> Path:
    """A ``cifar-10-batches-py`` directory (the real pickle format) of 32x32 photograph crops."""
    d = Path(root) / "cifar-10-batches-py"
    if (d / "batches.meta").is_file():
        return d
    rng = np.random.default_rng(seed)
    photos = source_photographs()
    pool = np.stack([np.asarray(photo_crop(rng, photos, (32, 32)).resize((32, 32))) for _ in range(2048)])
    return write_cifar_batches(d, pool, n_train, n_val, rng)
