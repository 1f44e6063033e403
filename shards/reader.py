"""The reader beside the writers: what ``rmix shards`` wrote, checked and read back.

* :func:`split_files` -- the files of one split in one format, checked against the manifest with a
  stat per file (exists, size); for webdataset also the ``.idx`` beside each tar. Cheap enough for
  every loader to call at start.
* :func:`iter_tar` -- the samples of one tar, streamed member by member (never the whole shard in
  memory), grouped by key as webdataset and DALI group them (name up to the first dot after the last
  slash, :func:`sample_key`).
* :func:`iter_members` -- the tar's member headers only (name, data offset, size): what a DALI ``.idx``
  lists; reading them never touches the member data.

All raise :class:`shards.errors.ShardError` whose message names the file. This is the one place that
reads tars; ``dali_index`` and ``verify`` use it.
"""

from __future__ import annotations

import os
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .errors import ShardError

FORMATS = ("wds", "ffcv")


def split_entry(manifest: dict, split: str) -> dict:
    """The manifest entry of ``split``, or one clear error naming what the manifest has."""
    if split not in manifest["splits"]:
        raise ShardError(f"split {split!r} not in {manifest['root']}/manifest.json "
                         f"(has {', '.join(manifest['splits'])})")
    return manifest["splits"][split]


def _check_size(path: Path, nbytes: int, what: str) -> None:
    if not path.is_file():
        raise ShardError(f"missing {what} {path}")
    size = os.path.getsize(path)
    if size != nbytes:
        raise ShardError(f"corrupt {what} {path}: {size} bytes, manifest says {nbytes}")


def missing_index_message(idx: Path, tar: Path) -> str:
    return f"missing DALI index {idx} of {tar.name}; rerun `rmix shards` into a fresh --out, or `wds2idx {tar} {idx}`"


def split_files(manifest: dict, split: str, fmt: str) -> list[Path]:
    """The files of one split in one format (the wds tars, or the one FFCV beton), each checked to
    exist with the manifest's size; wds tars must also have their ``.idx`` (of the manifest's size
    where the manifest records it: ``idx_bytes``, written since manifests of this version)."""
    if fmt not in FORMATS:
        raise ShardError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    root = Path(manifest["root"])
    entry = split_entry(manifest, split)
    if fmt not in entry:
        raise ShardError(f"{root} has no {fmt} files for split {split!r}; rerun `rmix shards --formats {fmt}`")
    if fmt == "ffcv":
        path = root / entry["ffcv"]["path"]
        _check_size(path, entry["ffcv"]["bytes"], "beton")
        return [path]
    files = []
    for shard in entry["wds"]["shards"]:
        path = root / shard["tar"]
        _check_size(path, shard["bytes"], "shard")
        idx = root / shard["idx"]
        if not idx.is_file():
            raise ShardError(missing_index_message(idx, path))
        if "idx_bytes" in shard:
            _check_size(idx, shard["idx_bytes"], "DALI index")
        files.append(path)
    return files


def sample_key(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> ``('dir/key', 'ext.more')``: webdataset's and DALI's grouping rule."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def is_sample_name(name: str) -> bool:
    """A member name with a key (``wds2idx`` skips ``dir/.ext`` and names without one)."""
    key, _ = sample_key(name)
    return bool(key) and not key.endswith("/")


def _is_sample_member(m: tarfile.TarInfo) -> bool:
    """Regular files with a key: DALI's ``wds2idx`` skips the rest (directories, links, ``dir/.ext``)."""
    return m.isreg() and is_sample_name(m.name)


@contextmanager
def _open_tar(path):
    """``tarfile`` in streaming-safe mode; damaged or missing tars become one-line ShardErrors."""
    try:
        with tarfile.open(path, "r:") as tf:
            yield tf
    except (tarfile.TarError, EOFError) as e:
        raise ShardError(f"{path}: not a readable tar ({e})") from None
    except FileNotFoundError:
        raise ShardError(f"missing shard {path}") from None


def iter_members(path) -> Iterator[tuple[str, int, int]]:
    """Yield ``(member name, data offset, size)`` for each sample member of a tar, in archive order.

    Only headers are read (tarfile seeks over the data), so this costs a read per 512-byte header
    however large the shard.
    """
    with _open_tar(path) as tf:
        for m in tf:
            if _is_sample_member(m):
                yield m.name, m.offset_data, m.size


def iter_tar(path, fields=None, *, only: Optional[set] = None,
             always=()) -> Iterator[tuple[str, dict[str, Optional[bytes]]]]:
    """Yield ``(key, {ext: bytes})`` for each sample of a webdataset tar, in archive order.

    Members are read one at a time, so memory stays at one sample whatever the shard size. Only the
    extensions in ``fields`` are read when given (others are skipped without reading their data).
    ``only`` (a set of sample positions in the tar) reads member data for those samples alone, except
    the extensions in ``always``; the other members are still listed, as ``{ext: None}``, so a caller
    can count and check every sample while decoding a few. A damaged header or a truncated member
    raises :class:`ShardError` naming the tar.
    """
    key, sample, pos = None, {}, -1
    with _open_tar(path) as tf:
        for m in tf:
            if not _is_sample_member(m):
                continue
            k, ext = sample_key(m.name)
            if k != key:
                if key is not None:
                    yield key, sample
                key, sample, pos = k, {}, pos + 1
            if fields is not None and ext not in fields:
                continue
            if only is not None and pos not in only and ext not in always:
                sample[ext] = None
                continue
            data = tf.extractfile(m).read()
            if len(data) != m.size:
                raise ShardError(f"{path}: member {m.name} is truncated")
            sample[ext] = data
    if key is not None:
        yield key, sample
