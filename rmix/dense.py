"""RecursiveMix for dense tasks: detection (boxes) and semantic segmentation (label maps).

Paper: L. Yang et al., "RecursiveMix: Mixed Training with History", arXiv:2203.06844. The seed
(implus/RecursiveMix-pytorch) mixes classification batches only and reaches COCO / ADE20K through the
pretrained backbone; carrying the mix itself over to boxes and masks is ours. The nearest relative in the
OpenMMLab stack, mmdet's ``CachedMixUp``, caches single samples per worker; here, as in classification,
the history is the whole previous *mixed* batch with its annotations, so content recurses.

Shared with :class:`rmix.RecursiveMix` (same helpers in ``rmix/boxes.py``):
  * One box per batch (``box='batch'``, the seed) or one per sample (``box='sample'``): side ratio
    sqrt(U(0, alpha)) of each image side, centre uniform, half-sides of ``side // 2``, clipped to the
    image. The whole history batch is resized into the box and pasted; the box is drawn in the frame of
    the batch as given, i.e. the *padded* frame for detection (pasted content may land in a sample's
    padding; mmdet's anchors there are invalid, so objects pasted wholly into padding are simply unused).
  * lam = 1 - box area / image area, per sample (reported; dense losses do not use it).
  * The first call after a reset passes the batch through (no box, lam = 1) and becomes the history;
    ``set_epoch`` clears it unless ``keep_history_across_epochs=True``. Host-side numpy Generator for
    every draw; ``state_dict()`` holds the generator and the history, so a resumed run mixes bit for bit
    like an uninterrupted one.
  * Batch-size changes: sample i takes history row ``i % len(history)`` (the first N rows when the
    history is larger).
  * Images (and label maps) are modified in place; the history is a copy (``borrow_batches()`` turns the
    copy off for callers that hand over fresh tensors each step).

Detection (:class:`DetRecursiveMix`):
  * History boxes: each history gt box is scaled by (box width / history width, box height / history
    height), offset by the box's top-left corner, clipped to the pasted box, and appended after the
    current sample's boxes with its label. A pasted box narrower or lower than ``min_size`` pixels
    (default 1) is dropped: recursion shrinks objects geometrically and sub-pixel boxes carry nothing.
  * Current boxes under the paste. Let ``visible`` = 1 - area(box ∩ paste) / area(box). A box is dropped
    when ``visible < min_visible`` (default 0.3: at least 30 % of the object must stay in view) or when
    it is wholly covered (so ``min_visible=0`` drops only fully covered boxes). A kept box is then, with
    ``clip='visible_bbox'`` (default), replaced by the tight bounding box of its visible part. The visible
    part of a rectangle minus one rectangle is itself a rectangle only when the paste covers a whole side
    band (the paste spans the box's full height and covers its left or right edge, or spans its full width
    and covers its top or bottom edge); then that side moves to the paste's edge. In every other case
    (a corner, an interior hole, a strip through the middle) the tight bounding box of the visible part is
    the box itself, so it is kept unchanged. ``clip='none'`` never moves a box (only the drop applies).
    Why: the box still has to enclose all the visible evidence of the object (ATSS assigns by IoU and
    centre distance), and the bounding box of what is visible is the only rectangle that does so without
    enclosing pasted content it could avoid. Degenerate (zero-area) boxes count as covered only when they
    lie inside the paste.
  * Output order per sample: kept current boxes (input order), then pasted history boxes (their order).

Segmentation (:class:`SegRecursiveMix`): the history images are resized with ``interpolation``
('nearest' or 'bilinear', align_corners=True as the seed), the history label maps always with nearest,
so no label is ever blended and ``ignore_index`` pixels (mmseg's padding and "other") stay
``ignore_index`` wherever they land, in the current part and the pasted part alike.

Host-device syncs: segmentation has none. Detection has exactly one per mixed batch: the current boxes
go to the host, where the box arithmetic runs in numpy (which boxes survive decides the output's shape,
and tens of boxes are cheaper there than tens of tiny kernels); the history keeps its boxes on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .boxes import box_lam, paste_one_box, paste_per_sample, sample_boxes

INTERPOLATIONS = ("nearest", "bilinear")
BOX_MODES = ("batch", "sample")
CLIP_MODES = ("visible_bbox", "none")


@dataclass
class DenseMixed:
    """One mixed dense batch.

    Attributes:
        images: (N, C, H, W) mixed images (the input tensor, modified in place).
        boxes: detection only: per sample a (k_i, 4) float ltrb pixel tensor in the frame of ``images``.
        labels: detection only: per sample a (k_i,) int64 tensor, aligned with ``boxes``.
        mix_boxes: (N, 4) float32 ``(x1, y1, x2, y2)`` of the pasted region per sample (x2/y2 exclusive),
            or None when nothing was pasted.
        lam: (N,) float32 share of each sample that is its own content (1 = unmixed).
        seg: segmentation only: (N, H, W) mixed label map (the input tensor, modified in place).
    """

    images: torch.Tensor
    boxes: Optional[list] = None
    labels: Optional[list] = None
    mix_boxes: Optional[torch.Tensor] = None
    lam: Optional[torch.Tensor] = None
    seg: Optional[torch.Tensor] = None


class _DenseRecursiveMix:
    """What the two dense mixes share: box drawing, history rows, epochs, the state_dict protocol."""

    name = "dense_mix"

    def __init__(self, alpha: float, box: str, interpolation: str, keep_history_across_epochs: bool,
                 copy_history: bool, seed: int):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"{type(self).__name__} alpha must be in (0, 1], got {alpha}")
        if box not in BOX_MODES:
            raise ValueError(f"box must be one of {BOX_MODES}, got {box!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        self.alpha = float(alpha)
        self.box = box
        self.interpolation = interpolation
        self.keep_history_across_epochs = keep_history_across_epochs
        self.copy_history = copy_history
        self.rng = np.random.default_rng(seed)
        self.reset()

    # -- history ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the history: the next call passes its batch through unmixed."""
        self._history: Optional[dict[str, Any]] = None

    def set_epoch(self, epoch: int) -> None:
        """Called at the start of each epoch: clears the history unless ``keep_history_across_epochs``."""
        if not self.keep_history_across_epochs:
            self.reset()

    @property
    def has_history(self) -> bool:
        return self._history is not None

    def borrow_batches(self) -> None:
        """The caller hands a fresh batch every step and never writes it afterwards: keep references."""
        self.copy_history = False

    def record_logits(self, logits) -> None:
        """Dense mixes have no logit history (no ROI consistency loss): a no-op, for the loader protocol."""

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.clone() if self.copy_history else t

    # -- drawing ------------------------------------------------------------------------------
    def _draw(self, n: int, height: int, width: int) -> np.ndarray:
        """(n, 4) int64 paste boxes: one drawn and repeated (``box='batch'``) or one per sample."""
        k = 1 if self.box == "batch" else n
        boxes = sample_boxes(self.rng, np.sqrt(self.rng.uniform(0.0, self.alpha, size=k)), height, width)
        return np.repeat(boxes, n, axis=0) if self.box == "batch" else boxes

    def _paste(self, dst: torch.Tensor, src: torch.Tensor, boxes: np.ndarray, mode: str) -> None:
        if self.box == "batch":
            paste_one_box(dst, src, boxes[0], mode)
        else:
            paste_per_sample(dst, src, boxes, mode)

    @staticmethod
    def _rows(n: int, hist_n: int) -> list[int]:
        """History row of each current sample: i for a history at least as large, else i % hist_n."""
        return [i % hist_n for i in range(n)]

    @staticmethod
    def _history_images(hist: torch.Tensor, rows: list[int], like: torch.Tensor) -> torch.Tensor:
        if hist.shape[1] != like.shape[1]:
            raise ValueError(f"history has {hist.shape[1]} channels, batch has {like.shape[1]}")
        hist = hist.to(like.device, non_blocking=True)
        src = hist[: len(rows)] if rows == list(range(len(rows))) else hist[torch.tensor(rows, device=like.device)]
        return src.to(like.dtype)

    # -- checkpointing ------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return dict(alpha=self.alpha, box=self.box, interpolation=self.interpolation)

    def state_dict(self) -> dict[str, Any]:
        """Generator state, the settings a resume must share, and the history (on the CPU)."""
        hist = None
        if self._history is not None:
            hist = {k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in self._history.items()}
        return {"name": self.name, "rng": self.rng.bit_generator.state, **self._config(), "history": hist}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state_dict is for mix {state.get('name')!r}, not {self.name!r}")
        for key, value in self._config().items():
            if state[key] != value:
                raise ValueError(f"state_dict has {key}={state[key]!r}, this mix has {value!r}")
        self.rng.bit_generator.state = state["rng"]
        # kept on the host until the next call moves the rows it needs to the batch's device
        self._history = state["history"]


class DetRecursiveMix(_DenseRecursiveMix):
    """RecursiveMix for detection: ``mix(images, boxes, labels) -> DenseMixed``.

    Args:
        alpha: paste boxes have side ratio sqrt(U(0, alpha)); 0 < alpha <= 1.
        box: 'batch' (one paste box for the batch, as the seed) or 'sample'.
        min_visible: drop a current gt box when less than this fraction of its area stays visible
            (default 0.3); fully covered boxes are always dropped. See the module header.
        clip: 'visible_bbox' (default): a kept box becomes the tight bounding box of its visible part
            (moves only when the paste covers a whole side band); 'none': kept boxes never move.
        min_size: drop pasted history boxes narrower or lower than this many pixels (default 1.0).
        interpolation: resize of the history images, 'nearest' (seed default) or 'bilinear'.
        keep_history_across_epochs: if False (seed), ``set_epoch`` clears the history.
        copy_history: keep a copy of each mixed batch (see :meth:`borrow_batches`).
        seed: seed of the host-side generator (give each DDP rank its own).

    Takes ``images`` (N, C, H, W) float or uint8 (a padded batch), ``boxes`` a list of N (k_i, 4) float
    ltrb pixel tensors in the frame of ``images``, ``labels`` a list of N (k_i,) int64 tensors; everything
    on the device of ``images``. Returns new box / label lists; the images are mixed in place.
    """

    name = "det_recursive_mix"

    def __init__(self, alpha: float = 0.5, box: str = "batch", min_visible: float = 0.3,
                 keep_history_across_epochs: bool = False, seed: int = 0, clip: str = "visible_bbox",
                 min_size: float = 1.0, interpolation: str = "nearest", copy_history: bool = True):
        if not 0.0 <= min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1], got {min_visible}")
        if clip not in CLIP_MODES:
            raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}")
        self.min_visible = float(min_visible)
        self.clip = clip
        self.min_size = float(min_size)
        super().__init__(alpha, box, interpolation, keep_history_across_epochs, copy_history, seed)

    def _config(self) -> dict[str, Any]:
        return dict(super()._config(), min_visible=self.min_visible, clip=self.clip, min_size=self.min_size)

    @staticmethod
    def _check(images: torch.Tensor, boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        n = images.shape[0]
        if len(boxes) != n or len(labels) != n:
            raise ValueError(f"{n} images but {len(boxes)} box tensors and {len(labels)} label tensors")
        for i, (b, l) in enumerate(zip(boxes, labels)):
            if b.dim() != 2 or b.shape[1] != 4 or not b.is_floating_point():
                raise ValueError(f"boxes[{i}] must be a float (k, 4) ltrb tensor, got {tuple(b.shape)} {b.dtype}")
            if l.dim() != 1 or l.shape[0] != b.shape[0] or l.is_floating_point():
                raise ValueError(f"labels[{i}] must be an integer ({b.shape[0]},) tensor, "
                                 f"got {tuple(l.shape)} {l.dtype}")

    def _remember(self, images, boxes, labels, host_boxes=None) -> None:
        # the history's boxes live on the host, where the next call's arithmetic runs (see _annotate)
        host_boxes = host_boxes if host_boxes is not None else [b.detach().cpu() for b in boxes]
        self._history = {"images": self._keep(images), "boxes": [self._keep(b) for b in host_boxes],
                         "labels": [self._keep(l) for l in labels]}

    def __call__(self, images: torch.Tensor, boxes: Sequence[torch.Tensor],
                 labels: Sequence[torch.Tensor]) -> DenseMixed:
        self._check(images, boxes, labels)
        n, _, height, width = images.shape
        device = images.device
        boxes, labels = list(boxes), list(labels)
        if self._history is None:
            self._remember(images, boxes, labels)
            return DenseMixed(images, boxes, labels, None, torch.ones(n, device=device))

        hist = self._history
        hist_n, _, hist_h, hist_w = hist["images"].shape
        rows = self._rows(n, hist_n)
        src = self._history_images(hist["images"], rows, images)
        paste = self._draw(n, height, width)
        self._paste(images, src, paste, self.interpolation)
        lam_np = box_lam(paste, height, width)
        if (lam_np >= 1.0).all():  # zero-area box(es): nothing pasted, annotations unchanged
            self._remember(images, boxes, labels)
            return DenseMixed(images, boxes, labels, None, torch.ones(n, device=device))

        boxes, labels, host_boxes = self._annotate(boxes, labels, [hist["boxes"][r] for r in rows],
                                                   [hist["labels"][r] for r in rows], paste, hist_h, hist_w, device)
        self._remember(images, boxes, labels, host_boxes)
        mix_boxes = torch.from_numpy(paste.astype(np.float32)).to(device, non_blocking=True)
        return DenseMixed(images, boxes, labels, mix_boxes, torch.from_numpy(lam_np).to(device, non_blocking=True))

    def _annotate(self, boxes, labels, h_boxes, h_labels, paste: np.ndarray, hist_h: int, hist_w: int, device):
        """Clip / drop the current boxes under the paste and append the scaled history boxes, for the whole
        batch at once. The box arithmetic runs in numpy on the host, on every device: a batch holds tens of
        boxes, and ~40 tensor operations on them cost more than the arithmetic (1.6-1.8 ms of a COCO batch in
        the CPU loader; ~40 kernel launches on a GPU). Labels stay on their device. Returns the per-sample
        boxes on ``device``, the per-sample labels, and the boxes' host copies (the next history)."""
        n = len(boxes)
        counts = [int(b.shape[0]) for b in boxes]
        h_counts = [int(b.shape[0]) for b in h_boxes]
        # the one host-device sync of the mix (none on a CPU): the current boxes, which select the output's shape
        cur = torch.cat(boxes).cpu().numpy() if n else np.zeros((0, 4), np.float32)
        ft = cur.dtype.type
        old = torch.cat([b.cpu() for b in h_boxes]).numpy().astype(ft, copy=False)  # host copies (_remember)
        pb = paste.astype(np.float64).astype(ft)
        p_cur, p_old = np.repeat(pb, counts, axis=0), np.repeat(pb, h_counts, axis=0)

        # current boxes: visible fraction, drop, clip (float arithmetic of the box dtype, as torch's ops would)
        px1, py1, px2, py2 = p_cur.T
        bx1, by1, bx2, by2 = cur.T
        iw = np.maximum(np.minimum(bx2, px2) - np.maximum(bx1, px1), 0)
        ih = np.maximum(np.minimum(by2, py2) - np.maximum(by1, py1), 0)
        area = np.maximum(bx2 - bx1, 0) * np.maximum(by2 - by1, 0)
        inside = (bx1 >= px1) & (bx2 <= px2) & (by1 >= py1) & (by2 <= py2) & (px2 > px1) & (py2 > py1)
        covered = np.where(area > 0, iw * ih / np.maximum(area, np.finfo(ft).tiny), inside.astype(ft))
        visible = 1.0 - covered
        keep_cur = (visible > 0) & (visible >= self.min_visible)
        if self.clip == "visible_bbox":
            full_h = (py1 <= by1) & (py2 >= by2)  # the paste spans the box's whole height ...
            full_w = (px1 <= bx1) & (px2 >= bx2)  # ... or its whole width
            cur = np.stack([
                np.where(full_h & (px1 <= bx1) & (px2 > bx1), px2, bx1),   # left band covered
                np.where(full_w & (py1 <= by1) & (py2 > by1), py2, by1),   # top band covered
                np.where(full_h & (px2 >= bx2) & (px1 < bx2), px1, bx2),   # right band covered
                np.where(full_w & (py2 >= by2) & (py1 < by2), py1, by2),   # bottom band covered
            ], axis=1)

        # history boxes: scale into the paste, offset, clip to it, drop sub-`min_size` ones
        qx1, qy1, qx2, qy2 = p_old.T
        sx = (qx2 - qx1) / float(hist_w)
        sy = (qy2 - qy1) / float(hist_h)
        ox1, oy1, ox2, oy2 = old.T
        new = np.stack([
            np.minimum(np.maximum(ox1 * sx + qx1, qx1), qx2),
            np.minimum(np.maximum(oy1 * sy + qy1, qy1), qy2),
            np.minimum(np.maximum(ox2 * sx + qx1, qx1), qx2),
            np.minimum(np.maximum(oy2 * sy + qy1, qy1), qy2),
        ], axis=1)
        keep_old = ((new[:, 2] - new[:, 0]) >= self.min_size) & ((new[:, 3] - new[:, 1]) >= self.min_size)
        keep_old &= (qx2 > qx1) & (qy2 > qy1)

        # One gather for the whole batch: the kept rows of cat([cur, new]) in output order (per sample, its kept
        # current boxes, then its kept pasted ones), split into per-sample views.
        keep = np.concatenate([keep_cur, keep_old])
        sample = np.concatenate([np.repeat(np.arange(n), counts), np.repeat(np.arange(n), h_counts)])
        source = np.flatnonzero(keep)  # kept rows of cat([cur, new]), ascending
        pasted = source >= sum(counts)
        order = source[np.argsort(sample[source] * 2 + pasted, kind="stable")]  # stable: input order kept
        sizes = np.bincount(sample[source], minlength=n).tolist()
        host = torch.from_numpy(np.concatenate([cur, new])[order])
        out_boxes = host.to(device, non_blocking=True)
        cur_labels = torch.cat([l.to(device) for l in labels]) if n else torch.zeros(0, dtype=torch.long, device=device)
        old_labels = torch.cat([l.to(device) for l in h_labels])
        index = torch.from_numpy(order).to(device, non_blocking=True)
        out_labels = torch.cat([cur_labels, old_labels.to(cur_labels.dtype)]).index_select(0, index)
        return list(out_boxes.split(sizes)), list(out_labels.split(sizes)), list(host.split(sizes))


class SegRecursiveMix(_DenseRecursiveMix):
    """RecursiveMix for semantic segmentation: ``mix(images, seg) -> DenseMixed``.

    Args:
        alpha: paste boxes have side ratio sqrt(U(0, alpha)); 0 < alpha <= 1.
        box: 'batch' (one paste box for the batch, as the seed) or 'sample'.
        interpolation: resize of the history *images*, 'nearest' or 'bilinear'; label maps are always
            resized with nearest.
        ignore_index: the label of unlabelled pixels (mmseg: 255, also its padding value). Nearest resize
            copies it like any label, so it survives the paste; kept so a resumed or adapted mix can be
            checked against the segmentor's ``ignore_index`` (``state_dict`` carries it).
        keep_history_across_epochs: if False (seed), ``set_epoch`` clears the history.
        copy_history: keep a copy of each mixed batch (see :meth:`borrow_batches`).
        seed: seed of the host-side generator.

    Takes ``images`` (N, C, H, W) float or uint8 and ``seg`` (N, H, W) integer label maps on the same
    device; both are mixed in place. No host-device sync.
    """

    name = "seg_recursive_mix"

    def __init__(self, alpha: float = 0.5, box: str = "batch", interpolation: str = "nearest",
                 ignore_index: int = 255, keep_history_across_epochs: bool = False, seed: int = 0,
                 copy_history: bool = True):
        self.ignore_index = int(ignore_index)
        super().__init__(alpha, box, interpolation, keep_history_across_epochs, copy_history, seed)

    def _config(self) -> dict[str, Any]:
        return dict(super()._config(), ignore_index=self.ignore_index)

    def __call__(self, images: torch.Tensor, seg: torch.Tensor) -> DenseMixed:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if seg.dim() != 3 or seg.shape[0] != images.shape[0] or seg.shape[1:] != images.shape[2:]:
            raise ValueError(f"seg must be (N, H, W) = {(images.shape[0], *images.shape[2:])}, got {tuple(seg.shape)}")
        if seg.is_floating_point():
            raise ValueError(f"seg must hold integer labels, got {seg.dtype}")
        n, _, height, width = images.shape
        device = images.device
        if self._history is None:
            self._history = {"images": self._keep(images), "seg": self._keep(seg)}
            return DenseMixed(images, seg=seg, lam=torch.ones(n, device=device))

        hist = self._history
        rows = self._rows(n, hist["images"].shape[0])
        src = self._history_images(hist["images"], rows, images)
        src_seg = self._history_images(hist["seg"][:, None], rows, seg[:, None])
        paste = self._draw(n, height, width)
        self._paste(images, src, paste, self.interpolation)
        self._paste(seg[:, None], src_seg, paste, "nearest")  # a view: pastes into seg in place
        lam_np = box_lam(paste, height, width)
        self._history = {"images": self._keep(images), "seg": self._keep(seg)}
        if (lam_np >= 1.0).all():
            return DenseMixed(images, seg=seg, lam=torch.ones(n, device=device))
        mix_boxes = torch.from_numpy(paste.astype(np.float32)).to(device, non_blocking=True)
        return DenseMixed(images, mix_boxes=mix_boxes, lam=torch.from_numpy(lam_np).to(device, non_blocking=True),
                          seg=seg)


DENSE_MIXES = {"det_recursive_mix": DetRecursiveMix, "seg_recursive_mix": SegRecursiveMix}
