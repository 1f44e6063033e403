"""RecursiveMix: mixed training with history.

Paper: L. Yang, X. Li, B. Zhao, R. Song, J. Yang, "RecursiveMix: Mixed Training with History",
arXiv:2203.06844. Seed implementation: implus/RecursiveMix-pytorch (``recursive_mix`` in utils.py and
the train loop in main.py).

What we follow from the seed:
  * History is the previous call's *mixed* output (images and soft targets), so content recurses.
  * One box per batch by default: side ratio = sqrt(U(0, alpha)), side = int(size * ratio), centre
    uniform, half-sides of side // 2 around it, clipped to the image. The whole history batch is
    resized into the box (nearest, or bilinear with align_corners=True) and pasted.
  * lam = 1 - clipped area / image area; targets = lam * y + (1 - lam) * y_history.
  * The first call after a reset passes the batch through (lam = 1, no box) and becomes history.
    The seed keeps history in a local of ``train()``, i.e. it is reset every epoch; so do we unless
    ``keep_history_across_epochs=True``.
  * The ROI loss target is softmax of the logits the model produced on the whole history batch;
    the trainer hands them over with ``record_logits`` after its forward pass.

Where we deviate, on purpose:
  * Box frame. The seed indexes ``x[:, :, bbx1:bbx2, bby1:bby2]`` (its "x" walks rows) and then gives
    the same numbers to ``roi_align`` as (x1, y1, x2, y2), so its ROI is the transpose of the pasted
    region (identical only for boxes symmetric about the diagonal). We return boxes in the true
    (x1, y1, x2, y2) = (column, row) frame of the pasted region.
  * ``box='sample'`` draws a box per sample (the seed has one per batch, ``box='batch'``).
  * A zero-area box pastes nothing (lam = 1) instead of calling interpolate with size 0.
  * A batch larger than the history (e.g. the first batch after a smaller last one) pastes history
    row ``i % len(history)`` into sample i; a smaller batch uses the first N rows, as the seed does.
  * Images are modified in place (the loader owns the batch), and the history is a persistent
    buffer that is copied into, not re-allocated, each step.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from .base import Mix
from .batch import MixedBatch
from .boxes import PastePlan, box_lam, paste_one_box, paste_per_sample, sample_box, sample_boxes

INTERPOLATIONS = ("nearest", "bilinear")
BOX_MODES = ("batch", "sample")


class RecursiveMix(Mix):
    """RecursiveMix as one stateful callable: ``mix(images, targets) -> MixedBatch``.

    Args:
        alpha: boxes have side ratio sqrt(U(0, alpha)); 0 < alpha <= 1.
        interpolation: 'nearest' (seed default) or 'bilinear'.
        box: 'batch' (one box for the whole batch, as the seed) or 'sample' (a box per sample).
        keep_history_across_epochs: if False (seed), ``set_epoch`` clears the history.
        copy_history: copy each mixed batch into a persistent history buffer (safe whatever the caller
            does with the batch afterwards). ``borrow_batches()`` turns it off: our loaders call it,
            as they hand the mix a fresh tensor every batch and the trainer only reads it, so keeping
            a reference saves a full-batch copy.
        num_classes, smoothing, seed: see :class:`rmix.base.Mix`.

    Use::

        mix = RecursiveMix(alpha=0.5, num_classes=10)
        for images, labels in loader:
            batch = mix(images, labels)
            logits, roi_logits = model(batch.images, batch.boxes)   # roi only when boxes is not None
            mix.record_logits(logits)                               # history for the next step
    """

    name = "recursive_mix"
    uses_logits = True
    reads_labels = True  # one box per batch on the CPU: the compiled pass that mixes the targets reads the labels

    def __init__(
        self,
        alpha: float = 0.5,
        interpolation: str = "nearest",
        box: str = "batch",
        keep_history_across_epochs: bool = False,
        copy_history: bool = True,
        num_classes: Optional[int] = None,
        smoothing: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(num_classes=num_classes, smoothing=smoothing, seed=seed)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"RecursiveMix alpha must be in (0, 1], got {alpha}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if box not in BOX_MODES:
            raise ValueError(f"box must be one of {BOX_MODES}, got {box!r}")
        self.alpha = alpha
        self.interpolation = interpolation
        self.box = box
        self.keep_history_across_epochs = keep_history_across_epochs
        self.copy_history = copy_history
        self.reset()

    def borrow_batches(self) -> None:
        self.copy_history = False

    @property
    def exact_on_uint8(self) -> bool:
        return self.interpolation == "nearest"

    # -- history ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the history: the next call passes its batch through unmixed."""
        self._images: Optional[torch.Tensor] = None
        self._targets: Optional[torch.Tensor] = None
        self._logits: Optional[torch.Tensor] = None
        self._planned: Optional[PastePlan] = None

    def set_epoch(self, epoch: int) -> None:
        if not self.keep_history_across_epochs:
            self.reset()

    @property
    def has_history(self) -> bool:
        return self._images is not None

    @property
    def history_logits(self) -> Optional[torch.Tensor]:
        """Logits recorded for the current history batch (None until ``record_logits``)."""
        return self._logits

    def record_logits(self, logits: torch.Tensor) -> None:
        """Store the model's logits on the batch this mix returned last (the new history)."""
        if self._images is None:
            raise RuntimeError("record_logits() called before the mix produced a batch")
        if logits.shape[0] != self._images.shape[0]:
            raise ValueError(f"logits for {logits.shape[0]} samples, but the last batch had {self._images.shape[0]}")
        self._logits = logits.detach()

    def _remember(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if not self.copy_history:
            self._images, self._targets, self._logits = images.detach(), targets.detach(), None
            return
        # Copy into the persistent buffers when shapes allow: the caller may reuse the memory of
        # ``images`` for the next batch, and re-allocating every step fragments the allocator's cache.
        if (
            self._images is not None
            and self._images.shape == images.shape
            and self._images.dtype == images.dtype
            and self._images.device == images.device
        ):
            self._images.copy_(images)
            self._targets.copy_(targets)
        else:
            self._images = images.detach().clone(memory_format=torch.preserve_format)
            self._targets = targets.detach().clone()
        self._logits = None  # the new history has no logits until the trainer records them

    # -- mixing -------------------------------------------------------------------------------
    def plan_paste(self, shape, dtype: torch.dtype, device: torch.device) -> Optional[PastePlan]:
        """Draw the next call's box now, before the batch of ``shape`` (N, C, H, W) exists.

        For a loader that writes its batch in a compiled pass of its own (the memory path's crop): it copies
        the pasted history pixels in that pass, instead of a second pass over the finished batch, then calls
        ``mix(images, targets, pasted=plan)``, which uses the plan's box instead of drawing one. The draws,
        the batch, the targets and the history are then those of an ordinary call, bit for bit.

        None when there is nothing to plan this way; the next call then does everything itself: no history
        yet (that call draws nothing), a box per sample, bilinear, or a history of another dtype, device or
        channel count than the batch. A new plan replaces one that was never passed to the mix.
        """
        self._planned = None  # a plan never passed on (an interrupted batch) is dropped; its draw stays spent
        n, c, height, width = (int(v) for v in shape)
        hist = self._images
        if (hist is None or self.box != "batch" or self.interpolation != "nearest" or hist.dtype != dtype
                or hist.device != torch.device(device) or hist.shape[1] != c):
            return None
        self._planned = PastePlan.nearest(self._draw_box(height, width), hist, n)
        return self._planned

    def _draw_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        # alpha * U[0, 1) is the bits of uniform(0, alpha) (numpy computes 0 + alpha * U), from the same draw,
        # through a cheaper call
        return sample_box(self.rng, math.sqrt(self.alpha * self.rng.random()), height, width)

    def _draw_ratio(self, n: int) -> np.ndarray:
        return np.sqrt(self.rng.uniform(0.0, self.alpha, size=n))

    def _mix(self, images: torch.Tensor, targets: torch.Tensor, pasted: Optional[PastePlan] = None) -> MixedBatch:
        n, _, height, width = images.shape
        device = images.device
        planned, self._planned = self._planned, None
        if pasted is not planned:  # a plan holds a draw: skipping it, or using a stale one, would change every later box
            raise RuntimeError("plan_paste() drew this call's box: pass its plan as pasted=" if pasted is None
                               else "pasted= must be the plan plan_paste() returned last")
        if pasted is not None and (pasted.source_rows.shape[0] != n or pasted.box[2] > width or pasted.box[3] > height):
            raise ValueError(f"the plan was drawn for another batch shape than {tuple(images.shape)}")
        # (N,) labels stay labels where the compiled pass of _scalar_lam_batch reads them (one box per batch, CPU)
        table = self._label_table(targets, device) if self.box == "batch" and self._images is not None else None
        if table is None:
            targets = self._soft_targets(targets, device)
        if self._images is None:
            self._remember(images, targets)
            return MixedBatch(images, targets, None, self._full_lam(n, 1.0, device))

        hist_images, hist_targets, hist_logits = self._images, self._targets, self._logits
        if hist_images.device != device:  # e.g. restored from a CPU state_dict
            hist_images, hist_targets = hist_images.to(device), hist_targets.to(device)
            hist_logits = hist_logits.to(device) if hist_logits is not None else None
        classes = targets.shape[1] if table is None else table.shape[1]
        if hist_targets.shape[1] != classes:
            raise ValueError(f"history has {hist_targets.shape[1]} classes, batch has {classes}")
        if hist_images.shape[1] != images.shape[1]:
            raise ValueError(f"history has {hist_images.shape[1]} channels, batch has {images.shape[1]}")
        hist_n = hist_images.shape[0]
        src = hist_images
        if n != hist_n:  # documented rule: a smaller batch takes the first n rows, a larger one row i % hist_n
            rows = slice(0, n) if n < hist_n else torch.arange(n, device=device) % hist_n
            # (a planned paste read its history rows already: no copy of the history images for it)
            src, hist_targets = (hist_images[rows] if pasted is None else None), hist_targets[rows]
            hist_logits = hist_logits[rows] if hist_logits is not None else None
        if src is not None and src.dtype != images.dtype:
            src = src.to(images.dtype)
        # the recorded logits are never written in place (record_logits replaces them), so no copy
        history_logits = hist_logits

        if self.box == "batch":
            # One box for all, in as few operations as possible: a CIFAR batch of 512 pastes in ~0.3 ms, and each
            # small tensor op costs 5-20 us after the kernels have been through the caches.
            x1, y1, x2, y2 = self._draw_box(height, width) if pasted is None else pasted.box
            area = (x2 - x1) * (y2 - y1)
            if area == 0:  # side < 2 pixels: nothing pasted
                boxes, lam, history_logits = None, self._full_lam(n, 1.0, device), None
                if table is not None:
                    targets = self._soft_targets(targets, device)
            else:
                if pasted is None:  # else the caller copied these pixels while it wrote the batch
                    paste_one_box(images, src, (x1, y1, x2, y2), self.interpolation)
                lam_value = np.float32(1.0 - area / float(height * width))  # box_lam's arithmetic
                targets, boxes, lam = self._scalar_lam_batch(targets, hist_targets, lam_value, (x1, y1, x2, y2), table)
        else:
            boxes_np = sample_boxes(self.rng, self._draw_ratio(n), height, width)
            paste_per_sample(images, src, boxes_np, self.interpolation)
            lam_np = box_lam(boxes_np, height, width)
            if (lam_np >= 1.0).all():  # nothing pasted anywhere
                boxes, lam = None, self._full_lam(n, 1.0, device)
                history_logits = None
            else:
                boxes = torch.from_numpy(boxes_np.astype(np.float32)).to(device, non_blocking=True)
                lam = torch.from_numpy(lam_np).to(device, non_blocking=True)
                targets = self._mix_targets(targets, hist_targets, lam)

        self._remember(images, targets)
        return MixedBatch(images, targets, boxes, lam, history_logits)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            alpha=self.alpha,
            interpolation=self.interpolation,
            box=self.box,
            images=None if self._images is None else self._images.cpu(),
            targets=None if self._targets is None else self._targets.cpu(),
            logits=None if self._logits is None else self._logits.cpu(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("alpha", "interpolation", "box"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state[key]!r}, this mix has {getattr(self, key)!r}")
        # Kept on the host until the next call moves them to the batch's device.
        self._images, self._targets, self._logits = state["images"], state["targets"], state["logits"]
        self._planned = None
