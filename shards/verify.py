"""``rmix verify OUT/<dataset>``: re-read every shard and beton against the manifest.

Checks file sizes and sha256, sample counts, the DALI index against the tar, and decodes every image
(or ``--sample K`` per file). Exits non-zero naming the first bad file.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .dali_index import index_lines
from .errors import ShardError
from .manifest import load_manifest, sha256_file


def _check_file(path: Path, nbytes: int, sha: str) -> None:
    if not path.is_file():
        raise ShardError(f"{path}: missing")
    if os.path.getsize(path) != nbytes:
        raise ShardError(f"{path}: {os.path.getsize(path)} bytes, manifest says {nbytes}")
    if sha256_file(path) != sha:
        raise ShardError(f"{path}: sha256 differs from the manifest")


def verify_tar(tar: Path, idx: Path, shard: dict, ext: str, sample: int, rng) -> int:
    _check_file(tar, shard["bytes"], shard["sha256"])
    _check_file(idx, os.path.getsize(idx), shard["idx_sha256"])
    with open(idx) as f:
        if f.read().splitlines() != index_lines(str(tar)):
            raise ShardError(f"{idx}: does not match the contents of {tar.name}")
    samples: dict = {}
    with tarfile.open(tar, "r:") as tf:
        for m in tf:
            key, _, e = m.name.partition(".")
            samples.setdefault(key, {})[e] = tf.extractfile(m).read()
    if len(samples) != shard["num_samples"]:
        raise ShardError(f"{tar}: {len(samples)} samples, manifest says {shard['num_samples']}")
    keys = list(samples)
    if sample and sample < len(keys):
        keys = [keys[i] for i in rng.choice(len(keys), sample, replace=False)]
    for key in keys:
        s = samples[key]
        if ext not in s or "cls" not in s:
            raise ShardError(f"{tar}: sample {key} lacks .{ext} or .cls")
        try:
            img = Image.open(io.BytesIO(s[ext]))
            img.load()
            int(s["cls"])
        except Exception as e:
            raise ShardError(f"{tar}: sample {key} does not decode: {e}") from None
        if img.mode != "RGB":
            raise ShardError(f"{tar}: sample {key} is {img.mode}, not RGB")
    return len(samples)


def verify_beton(path: Path, entry: dict, sample: int, rng) -> int:
    _check_file(path, entry["bytes"], entry["sha256"])
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
            seen += len(labels)
    except Exception as e:
        raise ShardError(f"{path}: does not decode: {e}") from None
    if seen != len(indices):
        raise ShardError(f"{path}: decoded {seen} of {len(indices)} samples")
    return n


def verify(root: Path, sample: int = 0, progress: bool = True) -> dict:
    manifest = load_manifest(root)
    base = Path(manifest["root"])
    rng = np.random.default_rng(0)
    counts = {}
    for split, entry in manifest["splits"].items():
        if "wds" in entry:
            total = 0
            for shard in tqdm(entry["wds"]["shards"], desc=f"{split} wds", disable=not progress, unit="shard"):
                total += verify_tar(base / shard["tar"], base / shard["idx"], shard, entry["wds"]["ext"], sample, rng)
            if total != entry["num_samples"]:
                raise ShardError(f"{split}: shards hold {total} samples, manifest says {entry['num_samples']}")
            counts[f"{split}/wds"] = total
        if "ffcv" in entry:
            counts[f"{split}/ffcv"] = verify_beton(base / entry["ffcv"]["path"], entry["ffcv"], sample, rng)
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix verify", description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path, help="OUT/<dataset> (the directory holding manifest.json)")
    p.add_argument("--sample", type=int, default=0, help="decode only K random images per file (default: all)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        counts = verify(args.path, args.sample, not args.no_progress)
    except ShardError as e:
        sys.exit(f"rmix verify: {e}")
    print("rmix verify: OK " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
