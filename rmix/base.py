"""What every mix shares: the host-side generator, label handling and the state_dict protocol."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from .batch import MixedBatch, as_soft_targets, check_images, label_range_error, one_hot_table
from .boxes import PastePlan, _cycled_rows

try:
    import numba
except ImportError:  # pragma: no cover - numba comes with FFCV, which the Makefile installs
    numba = None

if numba is not None:
    @numba.njit(nogil=True, cache=False)
    def _scalar_lam_rows(source, rows, other, lam, rest, box):  # pragma: no cover - compiled
        # row i of the targets: source[rows[i]] * lam + other[i] * rest, the float32 operations of the tensor
        # route in its order (no fused multiply-add); the outputs are allocated here, not by a numpy call each.
        # Returns them and the first i whose row is outside source (-1: none)
        n, k, corners = rows.shape[0], source.shape[1], box.shape[0]
        out_targets = np.empty((n, k), np.float32)
        out_boxes = np.empty((n, corners), np.float32)
        out_lam = np.empty(n, np.float32)
        for i in range(n):
            r = rows[i]
            if r < 0 or r >= source.shape[0]:
                return out_targets, out_boxes, out_lam, i
            for j in range(k):
                out_targets[i, j] = source[r, j] * lam + other[i, j] * rest
            for j in range(corners):
                out_boxes[i, j] = box[j]
            out_lam[i] = lam
        return out_targets, out_boxes, out_lam, -1
else:  # pragma: no cover
    _scalar_lam_rows = None  # the tensor route (the tests set this to exercise it)

_NO_BOX = np.zeros(0, np.float32)


class Mix:
    """Base of every mix: ``mix(images, targets) -> MixedBatch``.

    Random draws (a few scalars per batch) come from a numpy Generator on the host, so a mix never
    waits on the device; its state is part of ``state_dict()`` so a resumed run draws the same boxes.

    Args:
        num_classes: needed only when ``targets`` are integer labels.
        smoothing: label smoothing applied when integer labels are turned into soft targets.
        seed: seed of the mix's generator (give each DDP rank its own).
    """

    name = "mix"
    #: whether the mix wants the model's logits of each batch it returned (``record_logits``); a
    #: loader or trainer may skip the call when False
    uses_logits = False
    #: whether the mix only copies pixels (no blending, no interpolation), so mixing a uint8 batch and
    #: normalising afterwards equals normalising first (a loader then mixes a quarter of the bytes)
    exact_on_uint8 = False
    #: whether ``_mix`` takes the targets as given, (N,) integer labels included, and makes soft targets where it
    #: needs them (RecursiveMix: its compiled pass reads the labels, :meth:`_label_table`); else ``_mix`` gets
    #: (N, K) soft targets on the images' device
    reads_labels = False

    def __init__(self, num_classes: Optional[int] = None, smoothing: float = 0.0, seed: int = 0):
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, pasted: Optional[PastePlan] = None) -> MixedBatch:
        """Mix a batch. ``pasted``: the plan :meth:`plan_paste` returned, already applied to ``images``."""
        check_images(images, targets)
        if not self.reads_labels:
            targets = self._soft_targets(targets, images.device)
        if pasted is not None:
            return self._mix(images, targets, pasted=pasted)
        return self._mix(images, targets)

    def plan_paste(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Optional[PastePlan]:
        """The next call's paste, drawn before the batch of ``shape`` exists, or None (the default: the
        call does its own work). See :meth:`rmix.RecursiveMix.plan_paste`."""
        return None

    def _mix(self, images: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
        raise NotImplementedError

    # Epoch boundaries: stateless mixes have nothing to do.
    def set_epoch(self, epoch: int) -> None:
        """Called by the loader at the start of each epoch."""

    def record_logits(self, logits: torch.Tensor) -> None:
        """Mixes without history ignore the model's logits."""

    def borrow_batches(self) -> None:
        """The caller promises every batch it passes is a fresh tensor that nobody writes after the
        mix returns (our loaders do). A mix that keeps history may then keep a reference to the batch
        instead of a copy. Stateless mixes have nothing to change."""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for mix {state.get('name')!r}, not {self.name!r}")
        self.rng.bit_generator.state = state["rng"]

    @staticmethod
    def _full_lam(n: int, value: float, device: torch.device) -> torch.Tensor:
        return torch.full((n,), float(value), dtype=torch.float32, device=device)

    @staticmethod
    def _mix_targets(targets: torch.Tensor, other: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        lam = lam[:, None]
        return lam * targets + (1.0 - lam) * other

    def _soft_targets(self, targets: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(N, K) float32 soft targets on ``device`` from labels or soft targets (:func:`rmix.batch.as_soft_targets`)."""
        return as_soft_targets(targets, self.num_classes, self.smoothing).to(device)

    def _label_table(self, targets: torch.Tensor, device: torch.device) -> Optional[np.ndarray]:
        """The host (K, K) table of soft-target rows when :meth:`_scalar_lam_batch` can read these targets as
        labels in its compiled pass (CPU (N,) int64/int32 labels, a CPU batch, at most 2,048 classes), else None
        (then make soft targets first)."""
        if (_scalar_lam_rows is None or device.type != "cpu" or targets.device.type != "cpu" or targets.dim() != 1
                or targets.dtype not in (torch.int64, torch.int32) or self.num_classes is None):
            return None
        table = one_hot_table(self.num_classes, self.smoothing, targets.device)
        return None if table is None else table.numpy()

    @staticmethod
    def _scalar_lam_batch(targets: torch.Tensor, other: torch.Tensor, lam: float,
                          box: Optional[Sequence[int]] = None, table: Optional[np.ndarray] = None,
                          ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """For one lam (and at most one box) shared by the batch: the mixed targets ``lam * targets + (1 - lam) *
        other``, the (N, 4) float32 boxes (None without ``box``) and the (N,) float32 lams, on the targets' device.

        Bit for bit :meth:`_mix_targets` with a float32 lam tensor. On the CPU it is one compiled pass (numba) that
        allocates and writes all three: a loader calls this every batch, right after the batch went through the
        caches, where each small numpy or torch op costs 10-30 us (CIFAR batch of 512, in the loader: 96 -> 59 us).
        With ``table`` (:meth:`_label_table`) ``targets`` are (N,) integer labels and the pass reads row
        ``table[label]`` itself, so no (N, K) lookup comes first (memory loader, README). Elsewhere, and for targets
        that need grad, the tensor ops."""
        lam = np.float32(lam)
        rest = np.float32(1.0) - lam
        n, device = targets.shape[0], targets.device
        if table is not None and (other.shape != (n, table.shape[1]) or other.dtype != torch.float32
                                  or other.device.type != "cpu" or other.requires_grad):
            targets, table = torch.from_numpy(table).index_select(0, targets), None  # (not a route our mixes take)
        if table is not None or (
                device.type == "cpu" and _scalar_lam_rows is not None and not (targets.requires_grad or other.requires_grad)
                and targets.dtype == other.dtype == torch.float32 and other.shape == targets.shape):
            if table is None:
                source, rows = targets.numpy(), _cycled_rows(n, n)  # soft targets: row i for row i (cached)
            else:
                source, rows = table, targets.numpy()
            corners = _NO_BOX if box is None else np.array(box, np.float32)
            out_targets, out_boxes, out_lam, bad = _scalar_lam_rows(source, rows, other.numpy(), lam, rest, corners)
            if bad >= 0:
                raise label_range_error(targets, source.shape[0])
            return (torch.from_numpy(out_targets), torch.from_numpy(out_boxes) if box is not None else None,
                    torch.from_numpy(out_lam))
        mixed = targets * float(lam) + other * float(rest)
        boxes = None
        if box is not None:  # four fills with the values as kernel arguments: a copy from pageable host memory
            # to a GPU first waits for everything queued on the stream (memory loader, H200: 1.06x paired, 0.97-1.17)
            boxes = torch.empty((n, 4), dtype=torch.float32, device=device)
            for j, v in enumerate(box):
                boxes[:, j].fill_(float(np.float32(v)))
        return mixed, boxes, Mix._full_lam(n, float(lam), device)
