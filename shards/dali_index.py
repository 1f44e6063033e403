"""DALI webdataset index files (``.idx``), byte-identical to what DALI's ``wds2idx`` writes.

Format v1.2: a header line ``v1.2 <num_samples>``, then one line per sample listing, for each of its
tar members in archive order, ``<ext> <data offset> <size> <member name>``. Members are grouped into a
sample by the name up to the first dot after the last slash; non-regular members and hidden names are
skipped. Offsets come from the tar headers (``TarInfo.offset_data``), so indexing a 1 GB shard reads
only its headers; the shard writer gives the same lines from the offsets it wrote at
(:func:`lines_of_members`), without reading the tar back.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from .errors import ShardError
from .reader import is_sample_name, iter_members, sample_key

INDEX_VERSION = "v1.2"


def index_lines(tar_path: str) -> list[str]:
    """The lines of ``tar_path``'s index, header included."""
    return lines_of_members(iter_members(tar_path), tar_path)


def lines_of_members(members: Iterable[tuple[str, int, int]], tar_path: str) -> list[str]:
    """The index lines of a tar whose regular members are ``(name, data offset, size)`` in archive
    order (names that are no sample, as ``wds2idx`` sees them, are skipped)."""
    samples: list[list[str]] = []
    last = None
    for name, offset, size in members:
        if not is_sample_name(name):
            continue
        base, ext = sample_key(name)
        part = f"{ext} {offset} {size} {name}"
        if base != last:
            samples.append([part])
            last = base
        else:
            samples[-1].append(part)
    if not samples:
        raise ShardError(f"{tar_path}: webdataset tar holds no samples")
    return [f"{INDEX_VERSION} {len(samples)}"] + [" ".join(s) for s in samples]


def write_index(tar_path: str, idx_path: str, lines: Optional[list[str]] = None) -> int:
    """Write the index of ``tar_path`` (its ``lines`` when the caller has them) to ``idx_path``
    atomically; return the sample count."""
    lines = index_lines(tar_path) if lines is None else lines
    tmp = idx_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, idx_path)
    return len(lines) - 1
