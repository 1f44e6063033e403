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


def parse_manifest(data: Union[str, bytes], where: str) -> dict:
    """A manifest's JSON text, checked (valid JSON of this format version); ``where`` names it in errors."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"corrupt manifest {where}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ShardError(f"{where} has format_version {found}, expected {FORMAT_VERSION}")
    return manifest


def load_manifest(path: Union[str, Path], remote=None) -> dict:
    """Load ``manifest.json`` from a file path or the dataset directory that holds it, or from a URL
    (``http(s)://.../manifest.json``, ``pipe:CMD {}``; :mod:`shards.remote`, read with the retries of
    ``remote``, a :class:`shards.remote.RemoteOptions`).

    Relative file names in the manifest are resolved against its directory (stored as ``root``).
    """
    from .remote import is_url, load_manifest_url  # imported here: remote imports this module

    if is_url(path):
        return load_manifest_url(str(path), remote)
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise ShardError(f"no {MANIFEST} at {path}: run `rmix shards` (make shards) first")
    manifest = parse_manifest(mpath.read_bytes(), str(mpath))
    manifest["root"] = str(mpath.parent.resolve())
    return manifest
