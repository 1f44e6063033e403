"""FFCV ``.beton`` writer: an RGB image field and an int label field, written with FFCV's own
``DatasetWriter`` to a temporary name and renamed when complete."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from .errors import ShardError
from .sources import Source

WRITE_MODES = ("raw", "jpg", "proportion", "smart")


class _Indexed:
    """FFCV's indexable-dataset protocol over the kept samples of a source."""

    def __init__(self, source: Source, indices: Sequence[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        return self.source.array(j), self.source.label(j)


def write_beton(path: str, source: Source, indices: Sequence[int], write_mode: str = "raw",
                max_resolution: Optional[int] = None, jpeg_quality: int = 90,
                compress_probability: float = 0.5, workers: int = 1) -> None:
    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter
    except ImportError as e:
        raise ShardError(f"FFCV output needs the ffcv package ({e}); install with `make setup` or drop ffcv from --formats") from None
    if write_mode not in WRITE_MODES:
        raise ShardError(f"unknown FFCV write mode {write_mode!r}; choose from {', '.join(WRITE_MODES)}")
    tmp = path + ".tmp"
    writer = DatasetWriter(
        tmp,
        {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                   jpeg_quality=jpeg_quality, compress_probability=compress_probability),
            "label": IntField(),
        },
        num_workers=max(1, workers),
    )
    writer.from_indexed_dataset(_Indexed(source, indices), chunksize=256)
    os.replace(tmp, path)
