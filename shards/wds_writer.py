"""Webdataset shard writer: tars cut by sample count or bytes, each written under a temporary name,
renamed when complete, then given its DALI index. Tars are byte-reproducible (fixed mtime, owner and
mode), so a resumed run writes exactly the shards an uninterrupted one would."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import webdataset as wds

from .dali_index import write_index
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
    end: int  # position in the write plan just after this shard's last sample
    idx_bytes: int  # size of the .idx (older manifests lack it; readers then check its sha256 only)

    def to_dict(self) -> dict:
        return asdict(self)


def member_bytes(sample: Encoded) -> int:
    """Bytes a sample occupies in a tar: a header block per member plus data padded to blocks."""
    pad = lambda n: (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK  # noqa: E731
    return 2 * TAR_BLOCK + pad(len(sample.data)) + pad(len(str(sample.label)))


class WdsShardWriter:
    """Context manager writing ``<directory>/<split>-NNNNNN.tar`` (+ ``.idx``).

    Args:
        root: the dataset directory (names in :class:`ShardInfo` are relative to it).
        subdir: folder under ``root`` for the shards (``wds``).
        split: prefix of the shard names.
        max_count / max_bytes: cut a shard before it would exceed either (at least one sample each).
        start_shard: number of the first shard (resuming after ``start_shard`` complete ones).
        on_shard: called with each completed :class:`ShardInfo` (the build journal).
    """

    def __init__(self, root: str, subdir: str, split: str, max_count: Optional[int] = None,
                 max_bytes: Optional[int] = None, start_shard: int = 0,
                 on_shard: Optional[Callable[[ShardInfo], None]] = None):
        self.root, self.subdir, self.split = root, subdir, split
        self.max_count, self.max_bytes = max_count, max_bytes
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
        self._tar = wds.TarWriter(self._tmp, encoder=False, mtime=0, user="rmix", group="rmix", mode=0o444)
        self._count = self._bytes = 0

    def write(self, sample: Encoded, position: int) -> None:
        size = member_bytes(sample)
        if self._tar is not None and (
            (self.max_count and self._count >= self.max_count)
            or (self.max_bytes and self._count and self._bytes + size > self.max_bytes)
        ):
            self._finish(end=self._last_pos + 1)
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": sample.key, sample.ext: sample.data, "cls": str(sample.label).encode()})
        self._count += 1
        self._bytes += size
        self._last_pos = position

    def _finish(self, end: int) -> None:
        self._tar.close()
        self._tar = None
        tar, idx = self._name("tar"), self._name("idx")
        final = os.path.join(self.root, tar)
        os.replace(self._tmp, final)
        write_index(final, os.path.join(self.root, idx))
        idx_path = os.path.join(self.root, idx)
        info = ShardInfo(tar, idx, self._count, os.path.getsize(final), sha256_file(final),
                         sha256_file(idx_path), end, os.path.getsize(idx_path))
        self.shard += 1
        if self.on_shard:
            self.on_shard(info)

    def close(self, end: int) -> None:
        """Complete the open shard; ``end`` is the plan length (trailing rejects belong to it)."""
        if self._tar is not None:
            self._finish(end=end)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            if os.path.exists(self._tmp):
                os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
