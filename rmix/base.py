"""What every mix shares: the host-side generator, label handling and the state_dict protocol."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from .batch import MixedBatch, as_soft_targets, check_images
from .boxes import PastePlan


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

    def __init__(self, num_classes: Optional[int] = None, smoothing: float = 0.0, seed: int = 0):
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, pasted: Optional[PastePlan] = None) -> MixedBatch:
        """Mix a batch. ``pasted``: the plan :meth:`plan_paste` returned, already applied to ``images``."""
        check_images(images, targets)
        soft = as_soft_targets(targets, self.num_classes, self.smoothing)
        if pasted is not None:
            return self._mix(images, soft.to(images.device), pasted=pasted)
        return self._mix(images, soft.to(images.device))

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

    @staticmethod
    def _mix_targets_scalar(targets: torch.Tensor, other: torch.Tensor, lam: float) -> torch.Tensor:
        """:meth:`_mix_targets` for one lam shared by the batch, bit for bit: lam is rounded to float32 as the
        lam tensor is, and on a CPU batch numpy does the same float32 operations (each small torch op costs
        5-20 us on a loader's hot path)."""
        lam = np.float32(lam)
        rest = np.float32(1.0) - lam
        if targets.device.type != "cpu" or targets.requires_grad or other.requires_grad:
            return targets * float(lam) + other * float(rest)
        out = targets.numpy() * lam
        out += other.numpy() * rest
        return torch.from_numpy(out)
