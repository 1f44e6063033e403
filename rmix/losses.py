"""Losses of RecursiveMix training (seed: ``LabelSmoothingLoss`` and the train loop of main.py)."""

from __future__ import annotations

from typing import Optional

import torch

from .batch import smooth_one_hot


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the batch of ``-sum_k t_k log softmax(logits)_k``.

    ``targets`` are (N, K) probabilities, or (N,) integer labels smoothed with ``smoothing`` the seed's
    way (``smoothing / (K - 1)`` off the label). Computed in float32 so AMP logits do not lose the loss.
    """
    if targets.dim() == 1:
        targets = smooth_one_hot(targets, logits.shape[1], smoothing)
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp * targets).sum(dim=1).mean()


def roi_consistency_loss(
    roi_logits: torch.Tensor,
    history_logits: torch.Tensor,
    lam: torch.Tensor,
    omega: float,
) -> torch.Tensor:
    """RecursiveMix's extra term: ``omega * (1 - lam) * CE(roi_logits, softmax(history_logits))``.

    With one box per batch (the seed) lam is the same for every sample and this equals the seed's
    ``loss_roi * aug_omega * (1 - lam)``; with a box per sample each sample is weighted by its own
    pasted area. ``history_logits`` are detached: the history prediction is a target, not a path
    for gradients.
    """
    target = torch.softmax(history_logits.detach().float(), dim=1)
    per_sample = -(torch.log_softmax(roi_logits.float(), dim=1) * target).sum(dim=1)
    return omega * ((1.0 - lam.float()) * per_sample).mean()


def roi_loss_or_zero(
    roi_logits: Optional[torch.Tensor], history_logits: Optional[torch.Tensor], lam: torch.Tensor, omega: float
) -> torch.Tensor:
    """The ROI term when the batch has a pasted box and recorded history logits, else a zero."""
    if roi_logits is None or history_logits is None:
        return lam.new_zeros(())
    return roi_consistency_loss(roi_logits, history_logits, lam, omega)
