"""The batch every mix returns, and the label helpers every mix shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MixedBatch:
    """One mixed training batch.

    Attributes:
        images: (N, C, H, W) mixed images, same dtype, device and memory format as the input.
        targets: (N, K) float32 soft targets (probabilities), mixed like the images.
        boxes: (N, 4) float32 pixel boxes ``(x1, y1, x2, y2)`` (x = column, y = row, x2/y2 exclusive)
            of the region that holds pasted content, or ``None`` when nothing was pasted.
        lam: (N,) float32 weight of each sample's *own* content (1 = unmixed).
        history_logits: for RecursiveMix, the (N, K) logits the trainer recorded for the history
            rows pasted into each sample (target of the ROI consistency loss); else ``None``.
        labels: (N,) int64 hard labels of the samples before mixing, when a loader made the batch
            (for accuracy metrics); a bare mix leaves it ``None``.
    """

    images: torch.Tensor
    targets: torch.Tensor
    boxes: Optional[torch.Tensor]
    lam: torch.Tensor
    history_logits: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None


_TABLE_MAX_CLASSES = 2048  # a (K, K) float32 table of 16 MB at most; more classes scatter
_TABLES: dict = {}  # (num_classes, smoothing, device) -> the (K, K) table of smooth_one_hot's rows


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """Integer labels (N,) to float32 (N, K) targets: ``1 - smoothing`` on the label and
    ``smoothing / (K - 1)`` elsewhere (the seed's convention, which differs from timm's
    ``smoothing / K``).

    One row lookup in a cached (K, K) table of those rows (:func:`one_hot_table`, up to 2,048 classes; more
    fill and scatter): a loader calls this every batch, and each small op costs 10-30 us once the batch has
    gone through the caches. Both give the same float32 values; a label outside 0..K-1 is one ValueError
    line either way (on the CPU)."""
    try:
        if num_classes > _TABLE_MAX_CLASSES:
            _check_smoothing(num_classes, smoothing)
            return _fill_and_scatter(labels, num_classes, smoothing)
        table = one_hot_table(num_classes, smoothing, labels.device)
        return table.index_select(0, labels if labels.dtype in (torch.int64, torch.int32) else labels.long())
    except (IndexError, RuntimeError):
        # the range is checked only here, once torch has refused: no reduction over the labels per batch
        # (on a GPU an out-of-range index is a device-side assert instead, which no check here can turn into this)
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise label_range_error(labels, num_classes) from None
        raise


def one_hot_table(num_classes: int, smoothing: float, device) -> Optional[torch.Tensor]:
    """The (K, K) float32 table whose row c is :func:`smooth_one_hot` of label c, cached per (K, smoothing,
    device); None above 2,048 classes (a table of more than 16 MB)."""
    _check_smoothing(num_classes, smoothing)
    if num_classes > _TABLE_MAX_CLASSES:
        return None
    key = (num_classes, smoothing, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        classes = torch.arange(num_classes, device=device)
        table = _TABLES.setdefault(key, _fill_and_scatter(classes, num_classes, smoothing))
    return table


def label_range_error(labels: torch.Tensor, num_classes: int) -> ValueError:
    """The one-line error for labels outside 0..K-1."""
    return ValueError(f"labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")


def _check_smoothing(num_classes: int, smoothing: float) -> None:
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")


def _fill_and_scatter(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / (num_classes - 1)
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing)


def as_soft_targets(targets: torch.Tensor, num_classes: Optional[int], smoothing: float = 0.0) -> torch.Tensor:
    """Accept (N, K) soft targets or (N,) integer labels (then ``num_classes`` is required)."""
    if targets.dim() == 2 and targets.is_floating_point():
        return targets.float()
    if targets.dim() == 1 and not targets.is_floating_point():
        if num_classes is None:
            raise ValueError("integer labels given: pass num_classes= to the mix so it can build soft targets")
        return smooth_one_hot(targets, num_classes, smoothing)
    raise ValueError(
        f"targets must be (N, K) float probabilities or (N,) integer labels, got {tuple(targets.shape)} {targets.dtype}"
    )


def check_images(images: torch.Tensor, targets: torch.Tensor) -> None:
    """The contract of every mix's input: a 4-D batch with one target row per image."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if targets.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
