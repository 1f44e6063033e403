"""mmengine's Runner fed by our DALI dense loaders (``rmix mm train CONFIG --loader dali``).

:func:`attach_dali_loaders` replaces a built Runner's train / val / test dataloaders with
:class:`MMDaliLoader` objects before ``runner.train()`` / ``runner.test()`` builds its loops. mmengine's
loops take any iterable in place of a ``DataLoader`` (``BaseLoop`` keeps a non-dict as is); what they read
from it is here: ``len()``, iteration, ``sampler.set_epoch`` (epoch- and iteration-based loops),
``dataset.metainfo`` (the evaluator's class names) and ``len(dataset)`` (the evaluator's sample count:
every image once over all ranks). The loaders are attached to the Runner, not written into the config,
because the Runner deep-copies and dumps its config.

The loader arguments come from the config's own pipelines, so the two loaders do the same thing; a
transform we do not implement is refused with one line that names it (use the stock loader for it):

* detection (``CocoDataset``): ``LoadImageFromFile``, ``LoadAnnotations(with_bbox=True)``,
  ``Resize(scale, keep_ratio=True)``, ``RandomFlip(prob)`` (horizontal), ``PackDetInputs``; the
  annotations are parsed and filtered by mmdet's ``CocoDataset`` with the config's ``metainfo`` and
  ``filter_cfg`` (:func:`pipelines.dali_det.mmdet_coco_samples`).
* segmentation (``ADE20KDataset``): ``LoadImageFromFile``, ``LoadAnnotations(reduce_zero_label)``,
  ``RandomResize(scale, ratio_range, keep_ratio=True)``, ``Resize(scale, keep_ratio=True)``,
  ``RandomCrop(crop_size, cat_max_ratio)``, ``RandomFlip(prob)``, ``PhotoMetricDistortion``, ``PackSegInputs``
  (exact on the CPU; the GPU graph takes the first crop and approximates the photometric steps:
  :mod:`pipelines.dali_seg`).

Dense RecursiveMix runs inside the training loader when ``rm_alpha`` is given
(:class:`rmix.dense.DetRecursiveMix` / :class:`rmix.dense.SegRecursiveMix`, one generator per rank from
``derive_seed(seed, rank, 0, "mix")``).

Resume: mmengine does not checkpoint dataloaders; an iteration-based resume advances the loader batch by
batch as with the stock loader (the DALI reader's order is a function of the seed, so the same batches
come back). An epoch-based resume does not advance it, and a fresh DALI reader would read the next epoch in
the first epoch's order: the :class:`trainers.mm.hooks.DaliReaderState` hook, which :func:`attach_dali_loaders`
registers, saves every rank's reader state in each checkpoint and restores it from one saved at an epoch's
end. The dense mix's generator and history are not in the model either: the
:class:`trainers.mm.hooks.DenseMixState` hook saves every rank's in each checkpoint and restores them on resume
(for the loader's mix after the advance, via :meth:`MMDaliLoader.restore_mix`), so a resumed run mixes the
next batch as the uninterrupted run would.
"""

from __future__ import annotations

import os.path as osp
from typing import Any, Optional

DET_TYPES = ("CocoDataset",)
SEG_TYPES = ("ADE20KDataset",)
DET_TRANSFORMS = ("LoadImageFromFile", "LoadAnnotations", "Resize", "RandomFlip", "PackDetInputs")
SEG_TRANSFORMS = ("LoadImageFromFile", "LoadAnnotations", "RandomResize", "Resize", "RandomCrop", "RandomFlip",
                  "PhotoMetricDistortion", "PackSegInputs")
LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
# mmseg's PhotoMetricDistortion defaults: what pipelines.seg_host (and the DALI graph) implement
PHOTOMETRIC_DEFAULTS = dict(brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta=18)


class DaliLoaderError(ValueError):
    """A config our DALI loaders cannot reproduce; its message is the one line the user sees."""


class _DatasetInfo:
    """What mmengine reads from ``dataloader.dataset``: ``metainfo`` and the number of samples."""

    def __init__(self, metainfo: dict, num_samples: int):
        self.metainfo, self._n = metainfo, num_samples

    def __len__(self) -> int:
        return self._n


class MMDaliLoader:
    """A :class:`pipelines.dali_det.DenseDaliLoader` in the shape mmengine's loops take for a DataLoader."""

    def __init__(self, loader, metainfo: dict):
        self.loader = loader
        self.batch_size = loader.batch_size
        self.dataset = _DatasetInfo(metainfo, loader.num_samples)
        self.sampler = self  # mmengine calls dataloader.sampler.set_epoch(epoch)
        self._pending_mix: Optional[tuple[dict, bool]] = None  # (state, reset), loaded after _skip more batches
        self._skip = 0

    @property
    def mix(self):
        """The dense mix inside the loader (None without one)."""
        return self.loader.mix

    def restore_mix(self, state: dict, skip: int, reset: bool) -> None:
        """Load the mix's ``state`` once ``skip`` more batches have been drawn: mmengine's iteration-based
        resume re-draws the batches a run already trained on (mixing them again) before the first new one,
        which must then be mixed with the history and generator of the checkpoint. ``reset``: the
        checkpoint sits on an epoch boundary, so the history is dropped as ``set_epoch`` would."""
        self._pending_mix, self._skip = (state, bool(reset)), int(skip)

    def restore_reader(self, state: dict) -> None:
        """Continue the reader from ``state`` (:meth:`pipelines.dali_det.DenseDaliLoader.reader_state`): an
        epoch-based resume starts the next epoch with the order the uninterrupted run would read
        (:class:`trainers.mm.hooks.DaliReaderState`)."""
        self.loader.load_reader_state(state)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            if self._pending_mix is not None and self._skip <= 0:
                state, reset = self._pending_mix
                self._pending_mix = None
                self.loader.mix.load_state_dict(state)
                if reset and not self.loader.mix.keep_history_across_epochs:
                    self.loader.mix.reset()
            batch = next(batches, None)
            if batch is None:
                return
            self._skip -= 1
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, key: str):  # mmengine's auto_scale_lr reads dataloader['batch_size']
        if key != "batch_size":
            raise KeyError(key)
        return self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def _dataset_cfg(loader_cfg) -> dict:
    ds = loader_cfg.get("dataset")
    while ds is not None and "dataset" in ds and "data_root" not in ds:  # RepeatDataset, ClassBalanced...
        ds = ds["dataset"]
    if ds is None:
        raise DaliLoaderError("the dataloader has no dataset")
    return ds


def _transforms(ds: dict, allowed) -> dict:
    out = {}
    for t in ds.get("pipeline") or []:
        kind = t.get("type")
        if kind not in allowed:
            raise DaliLoaderError(f"--loader dali does not implement the transform {kind!r} of {ds.get('type')} "
                                  f"(it implements {', '.join(allowed)}); use the stock loader for this config")
        out[kind] = t
    return out


def _metainfo(ds: dict, task: str) -> dict:
    cfg = {k: v for k, v in ds.items() if k not in ("pipeline",)}
    cfg.update(pipeline=[], lazy_init=True)
    if task == "det":
        from mmdet.registry import DATASETS
    else:
        from mmseg.registry import DATASETS
    return dict(DATASETS.build(cfg).metainfo)


def build_mm_loader(loader_cfg, *, train: bool, device="auto", rank: int = 0, world_size: int = 1, seed: int = 0,
                    rm_alpha: Optional[float] = None) -> MMDaliLoader:
    """One mmengine dataloader config (``cfg.train_dataloader`` ...) -> our DALI loader for it."""
    from pipelines.seeds import derive_seed

    ds = _dataset_cfg(loader_cfg)
    kind = ds.get("type")
    root = ds.get("data_root") or ""
    prefix = ds.get("data_prefix") or {}
    common = dict(batch_size=int(loader_cfg.get("batch_size", 1)), train=train, device=device, rank=rank,
                  world_size=world_size, seed=seed, num_threads=max(1, int(loader_cfg.get("num_workers", 1) or 1)))
    mix_seed = derive_seed(seed, rank, 0, "mix")
    if kind in DET_TYPES:
        from pipelines.dali_det import CocoDaliLoader

        t = _transforms(ds, DET_TRANSFORMS)
        resize = t.get("Resize")
        if resize is None or not resize.get("keep_ratio", False) or resize.get("scale") is None:
            raise DaliLoaderError("--loader dali needs Resize(scale=..., keep_ratio=True) in the detection pipeline")
        flip = t.get("RandomFlip")
        if flip is not None and flip.get("direction", "horizontal") != "horizontal":
            raise DaliLoaderError(f"--loader dali flips horizontally only, the config asks {flip.get('direction')!r}")
        mix = None
        if rm_alpha and train:
            from rmix.dense import DetRecursiveMix
            mix = DetRecursiveMix(alpha=rm_alpha, seed=mix_seed)
        metainfo = _metainfo(ds, "det")
        try:
            loader = CocoDaliLoader(osp.join(root, prefix.get("img", "")), osp.join(root, ds["ann_file"]),
                                    metainfo["classes"], filter_cfg=ds.get("filter_cfg"), scale=tuple(resize["scale"]),
                                    flip_prob=float(flip.get("prob", 0.5)) if (flip and train) else 0.0, mix=mix,
                                    **common)
        except ValueError as e:  # an annotation file mmdet refuses, fewer training images than ranks: one line
            raise DaliLoaderError(str(e)) from None
        return MMDaliLoader(loader, metainfo)
    if kind in SEG_TYPES:
        from pipelines.dali_seg import ADE20KDaliLoader

        t = _transforms(ds, SEG_TRANSFORMS)
        resize = t.get("RandomResize") if train else t.get("Resize")
        if resize is None or not resize.get("keep_ratio", False):
            raise DaliLoaderError(f"--loader dali needs {'RandomResize' if train else 'Resize'}(keep_ratio=True) "
                                  "in the segmentation pipeline")
        crop = t.get("RandomCrop")
        if train and crop is None:
            raise DaliLoaderError("--loader dali needs RandomCrop(crop_size=...) in the training pipeline")
        ann = t.get("LoadAnnotations") or {}
        reduce = ann.get("reduce_zero_label")
        if reduce is None:
            reduce = ds.get("reduce_zero_label", True)
        crop_size = tuple(crop["crop_size"]) if crop else (512, 512)
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        flip = t.get("RandomFlip")
        photometric = t.get("PhotoMetricDistortion")
        if photometric and any(k != "type" and (tuple(v) if isinstance(v, (list, tuple)) else v) != PHOTOMETRIC_DEFAULTS.get(k)
                               for k, v in photometric.items()):
            raise DaliLoaderError(f"--loader dali runs PhotoMetricDistortion with mmseg's defaults "
                                  f"{PHOTOMETRIC_DEFAULTS}, the config sets {dict(photometric)}: use the stock loader")
        mix = None
        if rm_alpha and train:
            from rmix.dense import SegRecursiveMix
            mix = SegRecursiveMix(alpha=rm_alpha, seed=mix_seed)
        metainfo = _metainfo(ds, "seg")
        try:
            loader = ADE20KDaliLoader(osp.join(root, prefix.get("img_path", "")),
                                      osp.join(root, prefix.get("seg_map_path", "")), scale=tuple(resize["scale"]),
                                      ratio_range=tuple(resize.get("ratio_range", (1.0, 1.0))),
                                      crop=crop_size, flip_prob=float(flip.get("prob", 0.5)) if flip else 0.0,
                                      photometric=photometric is not None, reduce_zero_label=bool(reduce),
                                      cat_max_ratio=float(crop.get("cat_max_ratio", 1.0)) if crop else 1.0,
                                      img_suffix=ds.get("img_suffix", ".jpg"),
                                      seg_suffix=ds.get("seg_map_suffix", ".png"), mix=mix, **common)
        except ValueError as e:  # e.g. fewer training images than ranks: one line
            raise DaliLoaderError(str(e)) from None
        return MMDaliLoader(loader, metainfo)
    raise DaliLoaderError(f"--loader dali reads {', '.join(DET_TYPES + SEG_TYPES)}, not {kind!r}")


def attach_dali_loaders(runner, *, rm_alpha: Optional[float] = None, device="auto",
                        which=LOADERS) -> dict[str, MMDaliLoader]:
    """Replace ``runner``'s dataloaders (those of ``which`` that its config has) with ours; call after the
    Runner is built and before ``runner.train()`` / ``runner.test()``. Returns them by config key.

    Rank and world size come from mmengine's process group, the seed from ``runner.seed``.
    """
    from mmengine.dist import get_dist_info

    from .hooks import DaliReaderState

    rank, world_size = get_dist_info()
    cfg = runner.cfg
    seed = int(runner.seed or 0)
    out = {}
    for key in which:
        loader_cfg = cfg.get(key)
        if not loader_cfg:
            continue
        train = key == "train_dataloader"
        loader = build_mm_loader(loader_cfg, train=train, device=device, rank=rank, world_size=world_size, seed=seed,
                                 rm_alpha=rm_alpha if train else None)
        setattr(runner, "_" + key, loader)  # what Runner.build_{train,val,test}_loop read
        out[key] = loader
    if "train_dataloader" in out and not any(isinstance(h, DaliReaderState) for h in runner.hooks):
        runner.register_hook(DaliReaderState())
    return out
