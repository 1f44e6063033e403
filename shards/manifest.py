"""``manifest.json``: the single file loaders open.

It names the dataset, its classes, and for each split the webdataset shards (with their DALI index,
sample counts and sha256) and the FFCV beton, plus the parameters that produced them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Union

from .errors import ShardError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Union[str, Path], obj: Any) -> None:
    path = str(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_path(path: Union[str, Path]) -> Path:
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def load_manifest(path: Union[str, Path]) -> dict:
    """Load ``manifest.json`` from a file path or the dataset directory that holds it.

    Relative file names in the manifest are resolved against its directory (stored as ``root``).
    """
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise ShardError(f"no {MANIFEST} at {path}: run `rmix shards` (make shards) first")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ShardError(f"corrupt manifest {mpath}: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{mpath} has format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    manifest["root"] = str(mpath.parent.resolve())
    return manifest
