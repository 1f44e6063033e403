"""Re-read every shard and beton against the manifest (``rmix verify OUT/<dataset>``).

For each webdataset tar: size and sha256 against the manifest; its DALI ``.idx`` present, of the
manifest's size and sha256 (``idx_bytes`` / ``idx_sha256``) and equal to the index of the tar's own
headers; sample count; every sample has its image and ``.cls`` members, a label in
``0..num_classes-1`` and a key not seen before in the split. Images are decoded, all of them or ``--sample
K`` per file picked by position before the tar is read; the tar is streamed sample by sample either way
(:func:`shards.reader.iter_tar`), so a 1 GB shard never sits in memory. For each beton: size, sha256,
sample count, and the decoded samples' labels. Raises :class:`ShardError` naming the first bad file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .dali_index import index_lines
from .errors import ShardError
from .manifest import load_manifest, sha256_file
from .progress import Progress
from .reader import iter_tar, missing_index_message


def _check_file(path: Path, nbytes, sha: str, what: str) -> None:
    if not path.is_file():
        raise ShardError(f"missing {what} {path}")
    size = os.path.getsize(path)
    if nbytes is not None and size != nbytes:
        raise ShardError(f"corrupt {what} {path}: {size} bytes, manifest says {nbytes}")
    if sha256_file(path) != sha:
        raise ShardError(f"corrupt {what} {path}: sha256 differs from the manifest")


def _label(tar: Path, key: str, data: bytes, num_classes: int) -> int:
    try:
        label = int(data)
    except ValueError:
        raise ShardError(f"{tar}: sample {key} has a .cls that is not an integer: {data[:20]!r}") from None
    if not 0 <= label < num_classes:
        raise ShardError(f"{tar}: sample {key} has label {label}, outside 0..{num_classes - 1}")
    return label


def _decode(tar: Path, key: str, data: bytes) -> None:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # any decoder failure is the shard's fault
        raise ShardError(f"{tar}: sample {key} does not decode: {e}") from None
    if img.mode != "RGB":
        raise ShardError(f"{tar}: sample {key} is {img.mode}, not RGB")


def verify_tar(tar: Path, idx: Path, shard: dict, ext: str, num_classes: int, sample: int, rng,
               seen: set) -> int:
    """Check one tar and its index; return its sample count. ``seen`` collects the split's keys."""
    _check_file(tar, shard["bytes"], shard["sha256"], "shard")
    if not idx.is_file():
        raise ShardError(missing_index_message(idx, tar))
    _check_file(idx, shard.get("idx_bytes"), shard["idx_sha256"], "DALI index")
    with open(idx) as f:
        lines = f.read().splitlines()
    if lines != index_lines(str(tar)):
        raise ShardError(f"{idx}: does not match the contents of {tar.name}")
    n = len(lines) - 1
    if n != shard["num_samples"]:
        raise ShardError(f"{tar}: {n} samples, manifest says {shard['num_samples']}")
    decode = None if not sample or sample >= n else set(rng.choice(n, sample, replace=False).tolist())
    count = 0
    for key, members in iter_tar(tar, only=decode, always=("cls",)):
        if key in seen:
            raise ShardError(f"{tar}: sample key {key} appears twice in the split")
        seen.add(key)
        if ext not in members or "cls" not in members:
            raise ShardError(f"{tar}: sample {key} lacks .{ext} or .cls")
        _label(tar, key, members["cls"], num_classes)
        if members[ext] is not None:
            _decode(tar, key, members[ext])
        count += 1
    if count != n:
        raise ShardError(f"{tar}: streamed {count} samples, its index lists {n}")
    return n


def verify_beton(path: Path, entry: dict, num_classes: int, sample: int, rng) -> int:
    _check_file(path, entry["bytes"], entry["sha256"], "beton")
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption

    n = entry["num_samples"]
    indices = np.arange(n) if not sample or sample >= n else np.sort(rng.choice(n, sample, replace=False))
    loader = Loader(str(path), batch_size=min(256, len(indices)), num_workers=1, order=OrderOption.SEQUENTIAL,
                    indices=indices, drop_last=False,
                    pipelines={"image": [CenterCropRGBImageDecoder((32, 32), 1.0)], "label": [IntDecoder()]})
    if loader.reader.num_samples != n:
        raise ShardError(f"{path}: {loader.reader.num_samples} samples, manifest says {n}")
    seen = 0
    try:
        for images, labels in loader:
            labels = np.asarray(labels).ravel()
            bad = labels[(labels < 0) | (labels >= num_classes)]
            if len(bad):
                raise ShardError(f"{path}: label {int(bad[0])} outside 0..{num_classes - 1}")
            seen += len(labels)
    except ShardError:
        raise
    except Exception as e:
        raise ShardError(f"{path}: does not decode: {e}") from None
    if seen != len(indices):
        raise ShardError(f"{path}: decoded {seen} of {len(indices)} samples")
    return n


def verify(root: Path, sample: int = 0, progress: bool = True) -> dict:
    """Check everything under ``root`` (``OUT/<dataset>``); return ``{"<split>/<format>": samples}``.

    ``sample`` > 0 decodes only that many images per file (picked at random, seed 0); every other
    check still covers every sample."""
    if sample < 0:
        raise ShardError(f"--sample must be >= 0 (0 decodes every image), got {sample}")
    manifest = load_manifest(root)
    base = Path(manifest["root"])
    num_classes = manifest["num_classes"]
    rng = np.random.default_rng(0)
    counts = {}
    for split, entry in manifest["splits"].items():
        if "wds" in entry:
            total, seen = 0, set()
            bar = Progress(len(entry["wds"]["shards"]), desc=f"verify {split} wds", unit="shard", enabled=progress)
            for shard in entry["wds"]["shards"]:
                total += verify_tar(base / shard["tar"], base / shard["idx"], shard, entry["wds"]["ext"],
                                    num_classes, sample, rng, seen)
                bar.update(1)
            bar.close()
            if total != entry["num_samples"]:
                raise ShardError(f"{split}: shards hold {total} samples, manifest says {entry['num_samples']}")
            counts[f"{split}/wds"] = total
        if "ffcv" in entry:
            counts[f"{split}/ffcv"] = verify_beton(base / entry["ffcv"]["path"], entry["ffcv"], num_classes,
                                                   sample, rng)
    return counts
