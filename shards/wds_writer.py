"""Webdataset shard writer: tars cut by sample count or bytes, each written under a temporary name,
renamed when complete, then given its DALI index. Tars are byte-reproducible (fixed mtime, owner and
mode), so a resumed run writes exactly the shards an uninterrupted one would.

The tars are the bytes webdataset's ``TarWriter(encoder=False, mtime=0, user="rmix", group="rmix")``
writes (Python's ``tarfile`` in stream mode, PAX format, a sample's members in sorted extension
order); the writer drives ``tarfile`` itself so that it knows where each member's data lands: the
DALI index and the sha256 come out of the write, with no second read of the shard.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from .dali_index import lines_of_members, write_index
from .manifest import sha256_file
from .sources import Encoded

TAR_BLOCK = 512


@dataclass
class ShardInfo:
    tar: str  # file names relative to the dataset directory
    idx: str
    num_samples: int
    bytes: int
    sha256: str
    idx_sha256: str
    end: int  # position in the write plan just after this shard's last sample (by_position: its range's end)
    idx_bytes: int  # size of the .idx (older manifests lack it; readers then check its sha256 only)

    def to_dict(self) -> dict:
        return asdict(self)


def _pad(n: int) -> int:
    return (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def member_bytes(sample: Encoded) -> int:
    """Bytes a sample occupies in a tar: a header block per member plus data padded to blocks."""
    return 2 * TAR_BLOCK + _pad(len(sample.data)) + _pad(len(str(sample.label)))


class _HashingFile:
    """The file under ``tarfile``'s stream: every byte written is also hashed and counted."""

    def __init__(self, path: str):
        self.file = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


class WdsShardWriter:
    """Context manager writing ``<directory>/<split>-NNNNNN.tar`` (+ ``.idx``).

    Args:
        root: the dataset directory (names in :class:`ShardInfo` are relative to it).
        subdir: folder under ``root`` for the shards (``wds``).
        split: prefix of the shard names.
        max_count / max_bytes: cut a shard before it would exceed either (at least one sample each).
        start_shard: number of the first shard (resuming after ``start_shard`` complete ones).
        on_shard: called with each completed :class:`ShardInfo` (the build journal).
        by_position: with ``max_count`` alone, shard ``i`` holds the samples written at plan positions
            ``[i * max_count, (i + 1) * max_count)``: fewer when some were rejected, none (no file) when
            all were. Where a shard starts is then known without encoding anything before it, which is
            what lets a job be split into parts; ``start_shard`` is not used.
    """

    def __init__(self, root: str, subdir: str, split: str, max_count: Optional[int] = None,
                 max_bytes: Optional[int] = None, start_shard: int = 0,
                 on_shard: Optional[Callable[[ShardInfo], None]] = None, by_position: bool = False):
        if by_position and (not max_count or max_bytes):
            raise ValueError("by_position cuts by max_count alone")
        self.root, self.subdir, self.split = root, subdir, split
        self.max_count, self.max_bytes, self.by_position = max_count, max_bytes, by_position
        self.shard = start_shard
        self.on_shard = on_shard
        os.makedirs(os.path.join(root, subdir), exist_ok=True)
        self._tar = None
        self._count = self._bytes = 0
        self._last_pos = -1

    def _name(self, ext: str) -> str:
        return os.path.join(self.subdir, f"{self.split}-{self.shard:06d}.{ext}")

    def _open(self) -> None:
        self._tmp = os.path.join(self.root, self._name("tar") + ".tmp")
        self._file = _HashingFile(self._tmp)
        self._tar = tarfile.open(fileobj=self._file, mode="w|")  # webdataset's TarWriter, byte for byte
        self._members: list[tuple[str, int, int]] = []
        self._count = self._bytes = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "rmix", "rmix"
        self._tar.addfile(info, io.BytesIO(data))
        self._members.append((name, self._tar.offset - _pad(len(data)), len(data)))

    def write(self, sample: Encoded, position: int) -> None:
        size = member_bytes(sample)
        if self.by_position:
            shard = position // self.max_count
            if self._tar is not None and shard != self.shard:
                self._finish(end=(self.shard + 1) * self.max_count)
            self.shard = shard
        elif self._tar is not None and (
            (self.max_count and self._count >= self.max_count)
            or (self.max_bytes and self._count and self._bytes + size > self.max_bytes)
        ):
            self._finish(end=self._last_pos + 1)
        if self._tar is None:
            self._open()
        fields = {sample.ext: sample.data, "cls": str(sample.label).encode()}
        for ext in sorted(fields):  # webdataset's member order
            self._add(f"{sample.key}.{ext}", fields[ext])
        self._count += 1
        self._bytes += size
        self._last_pos = position

    def _finish(self, end: int) -> None:
        self._tar.close()
        self._file.close()
        self._tar = None
        tar, idx = self._name("tar"), self._name("idx")
        final = os.path.join(self.root, tar)
        os.replace(self._tmp, final)
        idx_path = os.path.join(self.root, idx)
        write_index(final, idx_path, lines_of_members(self._members, final))
        info = ShardInfo(tar, idx, self._count, self._file.size, self._file.sha.hexdigest(),
                         sha256_file(idx_path), end, os.path.getsize(idx_path))
        self.shard += 1
        if self.on_shard:
            self.on_shard(info)

    def close(self, end: int) -> None:
        """Complete the open shard; ``end`` is the plan length (trailing rejects belong to it), or
        with ``by_position`` the end of the positions this writer was given."""
        if self._tar is not None:
            if self.by_position:
                end = min(end, (self.shard + 1) * self.max_count)
            self._finish(end=end)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar = None
            self._file.close()
            if os.path.exists(self._tmp):
                os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
