"""Start-of-loader checks: what a loader verifies about its files before it decodes anything.

These run when a loader is built and cost seconds, not a pass over the data. They catch files that
have the right size but damaged structure, which would otherwise train silently (DALI reads samples at
the byte offsets its ``.idx`` lists and never looks at the tar headers; FFCV sizes its buffers from
the beton's metadata):

* webdataset (:func:`check_wds_split`): each ``.idx`` has the sha256 the manifest recorded and lists
  the manifest's sample count, and at every member offset it lists the tar holds an intact header
  (checksum, name, size) for exactly that member, inside the file. One 512-byte read per tar member,
  a few microseconds each; in DDP each rank checks every ``world_size``-th tar, so the ranks share
  the cost (ImageNet train: about 2.6 M members in all).
* FFCV (:func:`check_beton`): the header (format version, sample count against the manifest, page
  size), the two fields (``image`` RGB, ``label`` int), every sample's metadata (image mode, sides
  within the manifest's resolution, data pointer in the allocation table, raw size = w * h * 3, label
  in range) and the allocation table (inside the file) -- all read with numpy before FFCV allocates
  anything.

Not covered: damaged pixel bytes of the right size in an intact container. ``rmix verify`` (sha256 of
every file and a decode of every sample) is the full check; run it after copying a dataset.

Every failure is one :class:`shards.errors.ShardError` line naming the file.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ShardError

TAR_BLOCK = 512
MAX_IMAGE_SIDE = 16384  # beyond any image we shard; FFCV's u2 fields allow 65535 (a 48 GiB batch)
MAX_PAGE_SIZE = 1 << 28


def _verify_hint(manifest: dict) -> str:
    return f"run `rmix verify {manifest['root']}` and re-shard what it names"


# -- webdataset ---------------------------------------------------------------------------------

def _header_fields(buf: bytes) -> tuple[bool, str, int]:
    """(checksum ok, member name, size) of one ustar/GNU/pax member header, without tarfile's
    per-header Python parsing (this runs once per member of the split)."""
    stored = buf[148:156].replace(b"\0", b" ").strip()
    try:
        ok = int(stored, 8) == sum(buf[:148]) + sum(buf[156:]) + 8 * 32
    except ValueError:
        return False, "", -1
    if not ok:
        return False, "", -1
    if buf[124] & 0x80:  # GNU base-256 size (members over 8 GiB): let tarfile parse it
        info = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        return True, info.name, info.size
    name = buf[:100].split(b"\0", 1)[0]
    if buf[257:262] == b"ustar" and buf[345] != 0:
        name = buf[345:500].split(b"\0", 1)[0] + b"/" + name
    try:
        size = int(buf[124:136].replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        return False, "", -1
    return True, name.decode("utf-8", "surrogateescape"), size


def read_index(idx: Path) -> tuple[bytes, list[list[str]]]:
    """The raw bytes of a DALI ``.idx`` and its sample lines split into fields."""
    try:
        data = idx.read_bytes()
    except OSError as e:
        raise ShardError(f"cannot read DALI index {idx}: {e.strerror}") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ShardError(f"corrupt DALI index {idx}: not text") from None
    return data, [line.split() for line in lines]


def check_tar_against_index(tar: Path, idx: Path, num_samples: int, idx_sha256: str = "") -> None:
    """Check one tar's structure against its ``.idx`` (see the module header)."""
    data, rows = read_index(idx)
    if idx_sha256 and hashlib.sha256(data).hexdigest() != idx_sha256:
        raise ShardError(f"corrupt DALI index {idx}: its sha256 differs from the manifest's")
    head = rows[0] if rows else []
    if len(head) != 2 or not head[0].startswith("v1") or head[1] != str(num_samples) or len(rows) != num_samples + 1:
        raise ShardError(f"corrupt DALI index {idx}: header {' '.join(head)!r} and {len(rows) - 1} sample lines, "
                         f"manifest says {num_samples} samples")
    size = os.path.getsize(tar)
    with open(tar, "rb") as f:
        for line, fields in enumerate(rows[1:], start=2):
            if not fields or len(fields) % 4:
                raise ShardError(f"corrupt DALI index {idx}: line {line} is not 'ext offset size name' groups")
            for g in range(0, len(fields), 4):
                name = fields[g + 3]
                try:
                    offset, nbytes = int(fields[g + 1]), int(fields[g + 2])
                except ValueError:
                    raise ShardError(f"corrupt DALI index {idx}: line {line} has a non-numeric offset or size") from None
                if offset < TAR_BLOCK or offset % TAR_BLOCK or offset + nbytes > size:
                    raise ShardError(f"{tar}: member {name} at bytes {offset}..{offset + nbytes} of its index "
                                     f"{idx.name} is not inside the {size}-byte tar")
                f.seek(offset - TAR_BLOCK)
                ok, hname, hsize = _header_fields(f.read(TAR_BLOCK))
                if not ok:
                    raise ShardError(f"{tar}: damaged tar header of member {name} (byte {offset - TAR_BLOCK}); "
                                     f"the file has the right size but not the right content")
                # a name over 100 bytes lives in a pax/GNU record before this header: check the size only
                if hsize != nbytes or (hname != name and len(name.encode()) <= 100):
                    raise ShardError(f"{tar}: the tar header at byte {offset - TAR_BLOCK} is {hname!r} ({hsize} bytes), "
                                     f"its index {idx.name} says {name!r} ({nbytes} bytes)")


def check_wds_split(manifest: dict, split: str, files: Sequence[Path], rank: int = 0, world_size: int = 1) -> None:
    """Check the tars of ``split`` (as returned by ``split_files``) against their indexes; this rank
    checks every ``world_size``-th tar starting at ``rank``."""
    root = Path(manifest["root"])
    shards = manifest["splits"][split]["wds"]["shards"]
    for i in range(rank, len(shards), world_size):
        s = shards[i]
        try:
            check_tar_against_index(Path(files[i]), root / s["idx"], int(s["num_samples"]), s.get("idx_sha256", ""))
        except ShardError as e:
            raise ShardError(f"{e}; {_verify_hint(manifest)}") from None


# -- FFCV ---------------------------------------------------------------------------------------

def check_beton(manifest: dict, split: str, path: Path, fixed_size: bool = False) -> None:
    """Check an FFCV beton's header, fields and metadata against the manifest before FFCV opens it.

    ``fixed_size``: every image must have one size (what FFCV's ``SimpleRGBImageDecoder`` needs).
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType, get_metadata_type

    entry = manifest["splits"][split]
    expected = int(entry["ffcv"].get("num_samples", entry["num_samples"]))
    num_classes = int(manifest["num_classes"])
    limit = entry["ffcv"].get("max_resolution") or MAX_IMAGE_SIDE
    hint = _verify_hint(manifest)

    def bad(msg: str) -> ShardError:
        return ShardError(f"corrupt FFCV beton {path}: {msg}; {hint}")

    size = os.path.getsize(path)
    if size < HeaderType.itemsize + 2 * FieldDescType.itemsize:
        raise bad(f"{size} bytes is shorter than its header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise bad(f"format version {int(header['version'])}, this FFCV reads {CURRENT_VERSION}")
    n = int(header["num_samples"])
    if n != expected:
        raise bad(f"header says {n} samples, manifest says {expected}")
    page = int(header["page_size"])
    if page < 4096 or page > MAX_PAGE_SIZE or page & (page - 1):
        raise bad(f"page size {page} is not a power of two in 4 KiB..{MAX_PAGE_SIZE >> 20} MiB")
    if int(header["num_fields"]) != 2:
        raise bad(f"{int(header['num_fields'])} fields, expected 2 (image, label)")
    descs = np.fromfile(path, dtype=FieldDescType, count=2, offset=HeaderType.itemsize)
    names = [bytes(d["name"]).split(b"\0", 1)[0].decode("ascii", "replace") for d in descs]
    kinds = [TYPE_ID_HANDLER.get(int(d["type_id"])) for d in descs]
    if names != ["image", "label"] or kinds != [RGBImageField, IntField]:
        found = ", ".join(f"{nm}:{getattr(k, '__name__', 'unknown type')}" for nm, k in zip(names, kinds))
        raise bad(f"fields {found}, expected image:RGBImageField, label:IntField")
    meta_type = get_metadata_type([RGBImageField(), IntField()])
    meta_start = HeaderType.itemsize + descs.nbytes
    table = int(header["alloc_table_ptr"])
    if not meta_start + n * meta_type.itemsize <= table <= size or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise bad(f"allocation table at byte {table} does not fit a {size}-byte file of {n} samples")
    meta = np.fromfile(path, dtype=meta_type, count=n, offset=meta_start)
    image, label = meta[meta_type.names[0]], meta[meta_type.names[1]]
    alloc = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table)
    if len(alloc) < n or (alloc["sample_id"] >= n).any():
        raise bad(f"allocation table has {len(alloc)} entries for {n} samples")
    data_end = alloc["ptr"] + alloc["size"]
    if (alloc["ptr"] < meta_start + n * meta_type.itemsize).any() or (data_end > table).any():
        raise bad("allocation table points outside the data region")
    if not np.isin(image["mode"], (0, 1)).all():  # FFCV's IMAGE_MODES: jpg 0, raw 1
        raise bad("unknown image mode in the sample metadata")
    w, h = image["width"].astype(np.int64), image["height"].astype(np.int64)
    if n and (min(w.min(), h.min()) < 1 or max(w.max(), h.max()) > limit):
        i = int(np.argmax((w < 1) | (h < 1) | (w > limit) | (h > limit)))
        raise bad(f"sample {i} is {w[i]}x{h[i]} px, outside 1..{limit}")
    if fixed_size and n and (w != w[0]).any() | (h != h[0]).any():
        raise bad("images of different sizes where the preset reads one fixed size")
    order = np.argsort(alloc["ptr"], kind="stable")
    pos = np.searchsorted(alloc["ptr"][order], image["data_ptr"])
    pos = np.minimum(pos, len(alloc) - 1)
    hit = alloc["ptr"][order][pos] == image["data_ptr"]
    if not hit.all():
        raise bad(f"sample {int(np.argmin(hit))}'s image data pointer is not in the allocation table")
    raw = image["mode"] == 1
    if (alloc["size"][order][pos][raw] != (w * h * 3)[raw]).any():
        i = int(np.flatnonzero(raw & (alloc["size"][order][pos] != w * h * 3))[0])
        raise bad(f"sample {i} is {w[i]}x{h[i]} px raw but holds {int(alloc['size'][order][pos][i])} bytes")
    if n and (label.min() < 0 or label.max() >= num_classes):
        raise bad(f"labels outside 0..{num_classes - 1}")
