"""Dense RecursiveMix (``rmix.dense``) inside mmdet's and mmseg's data preprocessors.

For users of mmengine's stock DataLoader; configs pull this module in with ``custom_imports``:

    # mmdet: a batch augmentation, run by DetDataPreprocessor after normalisation and padding
    model = dict(data_preprocessor=dict(batch_augments=[dict(type='DetRecursiveMixAug', alpha=0.5)]))

    # mmseg 1.2.2 stores ``batch_augments`` raw and calls it as one callable (a list fails), so the mix is
    # a SegDataPreProcessor subclass that mixes after its own normalisation and padding
    model = dict(data_preprocessor=dict(type='RecursiveMixSegDataPreProcessor', rmix=dict(alpha=0.5)))

Both run only when ``training=True`` (validation and test batches pass through), on the device of the
batch. The mixes run on the normalised, padded batch, so the history is the previous mixed batch exactly as
the model saw it, and padding (0 after normalisation; label ``seg_pad_val``) is pasted like any content.

Detection: ``gt_instances.bboxes`` (tensors, or mmdet box types: written back as the same type) and
``labels`` are replaced by the mixed annotations; ``gt_instances`` must hold nothing else (masks are not
mixed: an error says so). The sample metainfo (``img_shape``, ``pad_shape``, ``batch_input_shape``,
``scale_factor``, ``flip``) is left as it is: the frame does not change, and pasted boxes lie inside the
batch frame. ``ignored_instances`` (crowd boxes) are left untouched; ATSS's assigner does not read them.

Epochs: the mix clears its history when mmengine's ``MessageHub`` reports a new epoch (its
``RuntimeInfoHook`` sets ``epoch`` before each training epoch), as the seed resets history per epoch;
``keep_history_across_epochs=True`` keeps it. Iteration-based schedules (UPerNet 80k) never change epoch,
so their history runs through. Seeds: ``seed`` is combined with the rank by ``pipelines.seeds``, so DDP
ranks draw different boxes.

Left out: mmengine's checkpoints hold only the model's tensors, not the mix's history and generator, so a
``--resume`` starts with an empty history (its first batch passes through unmixed).
"""

from __future__ import annotations

from typing import Optional

import torch
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.dist import get_rank
from mmengine.logging import MessageHub
from mmengine.structures import InstanceData
from mmseg.models.data_preprocessor import SegDataPreProcessor
from mmseg.registry import MODELS as MMSEG_MODELS
from torch import nn

from pipelines.seeds import derive_seed
from rmix.dense import DetRecursiveMix, SegRecursiveMix


class _EpochFollower:
    """Calls ``mix.set_epoch`` when mmengine's MessageHub reports a new training epoch."""

    def __init__(self):
        self._epoch: Optional[int] = None

    def follow(self, mix) -> None:
        try:
            epoch = MessageHub.get_current_instance().get_info("epoch")  # None before a Runner trains
        except RuntimeError:  # no MessageHub at all: not inside mmengine's loops
            return
        if epoch is None:
            return
        if self._epoch is not None and epoch != self._epoch:
            mix.set_epoch(int(epoch))
        self._epoch = epoch


@MMDET_MODELS.register_module()
class DetRecursiveMixAug(nn.Module):
    """mmdet ``batch_augments`` entry: :class:`rmix.dense.DetRecursiveMix` on ``(inputs, data_samples)``.

    Args: those of :class:`rmix.dense.DetRecursiveMix` (``alpha``, ``box``, ``min_visible``, ``clip``,
    ``min_size``, ``interpolation``, ``keep_history_across_epochs``, ``seed``); ``seed`` is per run, the
    rank is mixed in.
    """

    def __init__(self, alpha: float = 0.5, box: str = "batch", min_visible: float = 0.3, clip: str = "visible_bbox",
                 min_size: float = 1.0, interpolation: str = "nearest", keep_history_across_epochs: bool = False,
                 seed: int = 0):
        super().__init__()
        self.mix = DetRecursiveMix(alpha=alpha, box=box, min_visible=min_visible, clip=clip, min_size=min_size,
                                   interpolation=interpolation, keep_history_across_epochs=keep_history_across_epochs,
                                   seed=derive_seed(seed, get_rank(), 0, "mix"))
        self._epochs = _EpochFollower()

    def forward(self, inputs: torch.Tensor, data_samples: list):
        self._epochs.follow(self.mix)
        boxes, labels, box_types = [], [], []
        for i, sample in enumerate(data_samples):
            gt = sample.gt_instances
            extra = set(gt.keys()) - {"bboxes", "labels"}
            if extra:
                raise ValueError(f"DetRecursiveMixAug mixes only gt_instances.bboxes/labels; sample {i} also has "
                                 f"{sorted(extra)} (instance masks are not mixed: use a box-only pipeline)")
            b = gt.bboxes
            box_types.append(type(b) if hasattr(b, "tensor") else None)
            boxes.append(b.tensor if hasattr(b, "tensor") else b)
            labels.append(gt.labels)
        out = self.mix(inputs, boxes, labels)
        for sample, b, l, kind in zip(data_samples, out.boxes, out.labels, box_types):
            new = InstanceData(metainfo=sample.gt_instances.metainfo)
            new.bboxes = kind(b) if kind is not None else b
            new.labels = l
            sample.gt_instances = new
        return out.images, data_samples


@MMSEG_MODELS.register_module()
class RecursiveMixSegDataPreProcessor(SegDataPreProcessor):
    """``SegDataPreProcessor`` that applies :class:`rmix.dense.SegRecursiveMix` to training batches after
    its own normalisation, padding (and any ``batch_augments``), updating ``gt_sem_seg``.

    Args:
        rmix: keyword arguments of :class:`rmix.dense.SegRecursiveMix` (``alpha``, ``box``,
            ``interpolation``, ``keep_history_across_epochs``, ``seed``); ``ignore_index`` defaults to
            ``seg_pad_val`` and must equal it (padding is unlabelled).
        everything else: :class:`mmseg.models.SegDataPreProcessor`'s.
    """

    def __init__(self, *args, rmix: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        opts = dict(rmix or {})
        opts.setdefault("ignore_index", self.seg_pad_val)
        if opts["ignore_index"] != self.seg_pad_val:
            raise ValueError(f"rmix.ignore_index={opts['ignore_index']} but seg_pad_val={self.seg_pad_val}: padding "
                             "must be the ignore label; set them equal")
        opts["seed"] = derive_seed(int(opts.get("seed", 0)), get_rank(), 0, "mix")
        self.mix = SegRecursiveMix(**opts)
        self._epochs = _EpochFollower()

    def forward(self, data: dict, training: bool = False) -> dict:
        data = super().forward(data, training)
        if not training:
            return data
        self._epochs.follow(self.mix)
        inputs, samples = data["inputs"], data["data_samples"]
        seg = torch.cat([s.gt_sem_seg.data for s in samples])  # each (1, H, W) after stack_batch
        out = self.mix(inputs, seg)
        for i, s in enumerate(samples):
            s.gt_sem_seg.data = out.seg[i:i + 1]
        return dict(inputs=out.images, data_samples=samples)
