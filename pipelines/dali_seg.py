"""DALI segmentation loader: ADE20K-layout image / label-map pairs -> mmseg batches (``SegDataPreProcessor``'s input).

Layout (what mmseg's ``ADE20KDataset`` reads): ``images/<split>/NAME.jpg`` beside
``annotations/<split>/NAME.png`` (8-bit label maps, 0 = "other", 1..150 the classes). The pairs are matched
by name when the loader is built (a missing or extra file is an error naming it). The graph is the
module-level ``@pipeline_def`` factory :func:`ade_pipeline`: two ``fn.readers.file`` readers over the
matched lists, with the same seed, shard and shuffle arguments, each also returning the sample's index;
the loader checks the two indices agree in every batch (a pairing that drifted would be an error, not
silently wrong labels). The image reader is named ``"reader"`` (epoch size); augmentation subgraph
:func:`seg_augment`. Device switch, DDP sharding, exact-once evaluation, seeds and DALI checkpointing as
:mod:`pipelines.dali_det`.

Against mmseg's stock UPerNet ADE20K pipeline (``LoadImageFromFile, LoadAnnotations(reduce_zero_label=True),
RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True), RandomCrop(512x512,
cat_max_ratio=0.75), RandomFlip(0.5), PhotoMetricDistortion, PackSegInputs`` + ``SegDataPreProcessor``):

* exact: the resize arithmetic (ratio ~ U(0.5, 2.0), target ``int(2048 r), int(512 r)``, mmcv's
  ``rescale_size``), label maps resized with nearest and cropped and flipped with the same window and
  coin as the image, crop offsets ``randint(0, margin + 1)`` per axis, ``reduce_zero_label`` (0 -> 255,
  k -> k - 1, 255 stays 255), the ignore index 255, BGR order, metainfo (``img_path``, ``seg_map_path``,
  ``ori_shape``, ``img_shape``, ``scale_factor``, ``flip``, ``flip_direction``, ``reduce_zero_label``);
  ``inputs`` are the unpadded views, so ``SegDataPreProcessor`` pads images with 0 and labels with 255
  as with the stock loader. Evaluation: resize only, ``gt_sem_seg`` at the original size.
* not exact:
  - ``cat_max_ratio=0.75``: mmseg re-draws the crop (up to 10 times) while one class covers more than
    75 % of it; that needs the label histogram of each candidate crop, which no DALI operator gives,
    so we take the first crop (the ``cat_max_ratio=1`` behaviour).
  - ``PhotoMetricDistortion``: brightness (+-32, p 0.5) then contrast (x U(0.5, 1.5), p 0.5, mmseg's
    multiply-without-centre) as two ``fn.brightness_contrast`` steps, uint8 clamped as mmseg; saturation
    (x U(0.5, 1.5), p 0.5) and hue (+-18 OpenCV units = +-36 degrees, p 0.5) with ``fn.hsv``, which works
    in YIQ space rather than OpenCV's HSV and draws the hue shift continuously, not as an integer; the
    contrast step always comes before saturation/hue (mmseg picks the order at random).
  - pixel values after resizing (DALI's bilinear vs OpenCV's fixed-point ``INTER_LINEAR``, +-1 level).

With dense RecursiveMix (:class:`rmix.dense.SegRecursiveMix`) the mix runs on the dense padded batch
(image padding = rounded BGR mean, label padding = 255) and ``inputs`` are the whole padded images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .dali_det import DenseDaliLoader, keep_ratio_size

try:
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath
except ImportError as _e:
    raise ImportError(f"the DALI dense loaders need nvidia-dali ({_e}); install with `make setup`") from None

IGNORE_INDEX = 255


def ade_pairs(img_dir, ann_dir, img_suffix: str = ".jpg", seg_suffix: str = ".png") -> tuple[list, list]:
    """Sorted, name-matched ``(image paths, label paths)``; an unmatched file raises naming it."""
    img_dir, ann_dir = Path(img_dir), Path(ann_dir)
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"no ADE20K folder {d}")
    images = {p.name[: -len(img_suffix)]: p for p in img_dir.iterdir() if p.name.endswith(img_suffix)}
    labels = {p.name[: -len(seg_suffix)]: p for p in ann_dir.iterdir() if p.name.endswith(seg_suffix)}
    missing = sorted(set(images) - set(labels))
    if missing:
        name = missing[0]
        raise FileNotFoundError(f"{img_dir / (name + img_suffix)} has no label map {ann_dir / (name + seg_suffix)}")
    if not images:
        raise FileNotFoundError(f"no *{img_suffix} images in {img_dir}")
    names = sorted(images)
    return [str(images[n]) for n in names], [str(labels[n]) for n in names]


def seg_augment(encoded, encoded_seg, *, train: bool, scale, ratio_range, crop, flip_prob: float,
                photometric: bool, seg_fill: int, gpu: bool):
    """(encoded image, encoded label PNG) -> (CHW uint8 BGR image, HW uint8 label map, both padded to the
    batch max, info int32 ``(h, w, new_h, new_w, out_h, out_w)``, flip int32)."""
    decode_dev, op_dev = ("mixed", "gpu") if gpu else ("cpu", "cpu")
    shape = fn.peek_image_shape(encoded)
    h, w = shape[0], shape[1]
    image = fn.decoders.image(encoded, device=decode_dev, output_type=types.RGB)
    seg = fn.decoders.image(encoded_seg, device=decode_dev, output_type=types.GRAY)
    f64 = lambda x: fn.cast(x, dtype=types.FLOAT64)  # noqa: E731
    if train:
        r = fn.random.uniform(range=list(ratio_range), dtype=types.FLOAT64)
        # mmseg RandomResize: target scale = (int(2048 r), int(512 r)), then Resize(keep_ratio=True)
        target = (dmath.floor(types.Constant(float(scale[0]), dtype=types.FLOAT64) * r),
                  dmath.floor(types.Constant(float(scale[1]), dtype=types.FLOAT64) * r))
        long_t, short_t = dmath.max(*target), dmath.min(*target)
        hf, wf = f64(h), f64(w)
        s = dmath.min(long_t / dmath.max(hf, wf), short_t / dmath.min(hf, wf))
        half = types.Constant(0.5, dtype=types.FLOAT64)
        new_h, new_w = dmath.floor(hf * s + half), dmath.floor(wf * s + half)
    else:
        new_h, new_w = keep_ratio_size(h, w, scale)
    size = dict(resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT), antialias=False)
    image = fn.resize(image, device=op_dev, interp_type=types.INTERP_LINEAR, **size)
    flip = fn.random.coin_flip(probability=flip_prob if train else 0.0, dtype=types.INT32)
    if train:
        seg = fn.resize(seg, device=op_dev, interp_type=types.INTERP_NN, **size)
        # mmseg RandomCrop: offset = randint(0, max(side - crop, 0) + 1) per axis, same window for both
        ch, cw = dmath.min(new_h, float(crop[0])), dmath.min(new_w, float(crop[1]))
        oy = dmath.floor(fn.random.uniform(range=[0.0, 1.0], dtype=types.FLOAT64) * (new_h - ch + 1.0))
        ox = dmath.floor(fn.random.uniform(range=[0.0, 1.0], dtype=types.FLOAT64) * (new_w - cw + 1.0))
        oy, ox = dmath.min(oy, new_h - ch), dmath.min(ox, new_w - cw)  # U = 1.0 exactly
        start = fn.cast(fn.stack(oy, ox), dtype=types.INT64)
        window = fn.cast(fn.stack(ch, cw), dtype=types.INT64)
        image = fn.slice(image, start, window, axes=[0, 1], device=op_dev)
        seg = fn.slice(seg, start, window, axes=[0, 1], device=op_dev)
        seg = fn.flip(seg, device=op_dev, horizontal=flip)  # the image mirrors with the same coin below
        out_h, out_w = ch, cw
        if photometric:
            coin = lambda: fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT)  # noqa: E731
            delta = fn.random.uniform(range=[-32.0, 32.0]) * coin()
            image = fn.brightness_contrast(image, device=op_dev, brightness_shift=delta / 255.0)
            c = coin()
            alpha = fn.random.uniform(range=[0.5, 1.5]) * c + (1.0 - c)
            image = fn.brightness_contrast(image, device=op_dev, brightness=alpha)
            c = coin()
            sat = fn.random.uniform(range=[0.5, 1.5]) * c + (1.0 - c)
            hue = fn.random.uniform(range=[-36.0, 36.0]) * coin()
            image = fn.hsv(image, device=op_dev, hue=hue, saturation=sat)
    else:
        out_h, out_w = new_h, new_w
    image = fn.color_space_conversion(image, device=op_dev, image_type=types.RGB, output_type=types.BGR)
    # mirror (train) and HWC -> CHW in one pass (no mean/std: uint8 values unchanged)
    image = fn.crop_mirror_normalize(image, device=op_dev, mirror=flip, output_layout="CHW", dtype=types.UINT8)
    image = fn.pad(image, device=op_dev, axes=(1, 2), fill_value=0)
    seg = fn.pad(seg, device=op_dev, axes=(0, 1), fill_value=seg_fill)
    info = fn.cast(fn.stack(f64(h), f64(w), new_h, new_w, f64(out_h), f64(out_w)), dtype=types.INT32)
    return image, seg, info, flip


@pipeline_def(enable_checkpointing=True)
def ade_pipeline(image_files: Sequence[str], label_files: Sequence[str], scale=(2048, 512), ratio_range=(0.5, 2.0),
                 crop=(512, 512), flip_prob: float = 0.5, photometric: bool = True, seg_fill: int = 0,
                 reader_seed: int = 0, shard_id: int = 0, num_shards: int = 1, gpu: bool = False,
                 is_training: bool = False):
    """Matched image / label-map lists -> ``(images, seg, info, flip, index, seg_index)``.

    Call with DALI's pipeline arguments too. ``seg_fill`` pads label maps to the batch maximum (0 with
    ``reduce_zero_label``, which maps it to 255 afterwards; else 255). Both readers get ``reader_seed``
    so they shuffle alike; the loader checks ``index == seg_index``.
    """
    indices = list(range(len(image_files)))
    common = dict(labels=indices, shard_id=shard_id, num_shards=num_shards, random_shuffle=is_training,
                  seed=reader_seed, pad_last_batch=not is_training, stick_to_shard=not is_training)
    encoded, index = fn.readers.file(files=list(image_files), name="reader", **common)
    encoded_seg, seg_index = fn.readers.file(files=list(label_files), name="seg_reader", **common)
    image, seg, info, flip = seg_augment(encoded, encoded_seg, train=is_training, scale=scale, ratio_range=ratio_range,
                                         crop=crop, flip_prob=flip_prob, photometric=photometric,
                                         seg_fill=seg_fill, gpu=gpu)
    return image, seg, info, flip, index, seg_index


class ADE20KDaliLoader(DenseDaliLoader):
    """ADE20K-layout segmentation for mmseg: batches of ``SegDataSample`` with ``gt_sem_seg``.

    Args:
        img_dir, ann_dir: ``images/<split>`` and ``annotations/<split>``.
        scale: ``RandomResize``'s / ``Resize``'s scale (default (2048, 512)).
        ratio_range: ``RandomResize``'s ratio range (train).
        crop: ``RandomCrop``'s crop size (h, w) (train).
        flip_prob: ``RandomFlip(prob=...)`` (train).
        photometric: apply the ``PhotoMetricDistortion`` equivalent (train).
        reduce_zero_label: ADE20K's label shift (0 -> 255 ignored, k -> k - 1).
        mix: a :class:`rmix.dense.SegRecursiveMix` (train only), or None.
        batch_size, train, device, rank, world_size, seed, num_threads: as :class:`DenseDaliLoader`.
    """

    backend = "dali_ade20k"
    output_names = ("images", "seg", "info", "flip", "index", "seg_index")

    def __init__(self, img_dir, ann_dir, *, scale=(2048, 512), ratio_range=(0.5, 2.0), crop=(512, 512),
                 flip_prob: float = 0.5, photometric: bool = True, reduce_zero_label: bool = True,
                 img_suffix: str = ".jpg", seg_suffix: str = ".png", **kw):
        super().__init__(**kw)
        self.image_files, self.label_files = ade_pairs(img_dir, ann_dir, img_suffix, seg_suffix)
        self.scale, self.ratio_range, self.crop = tuple(scale), tuple(ratio_range), tuple(crop)
        self.flip_prob, self.photometric, self.reduce_zero_label = float(flip_prob), photometric, reduce_zero_label
        self._iterator = self._build()

    def _pipeline(self, checkpoint):
        from .seeds import derive_seed

        return ade_pipeline(image_files=self.image_files, label_files=self.label_files, scale=self.scale,
                            ratio_range=self.ratio_range, crop=self.crop, flip_prob=self.flip_prob,
                            photometric=self.photometric, seg_fill=0 if self.reduce_zero_label else IGNORE_INDEX,
                            reader_seed=derive_seed(self.seed, self.rank, 0, "shuffle"),
                            **self._pipe_kwargs(checkpoint))

    def _batch(self, out: dict) -> dict:
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample

        index, seg_index = out["index"].reshape(-1), out["seg_index"].reshape(-1)
        if not torch.equal(index, seg_index):
            raise RuntimeError(f"image and label readers out of step: {index.tolist()} vs {seg_index.tolist()}")
        images, seg = out["images"], out["seg"][..., 0]
        if self.reduce_zero_label:  # mmseg: 0 -> 255, k -> k - 1, 255 stays 255 (on the device, batched)
            seg = torch.where((seg == 0) | (seg == IGNORE_INDEX), IGNORE_INDEX, seg.long() - 1)
        seg = seg.long()
        info = out["info"].long().tolist()
        flips = out["flip"].reshape(-1).tolist()
        metas = []
        for i, (h, w, nh, nw, oh, ow) in enumerate(info):
            k = int(index[i])
            meta = dict(img_path=self.image_files[k], seg_map_path=self.label_files[k], ori_shape=(h, w),
                        img_shape=(oh, ow), pad_shape=(oh, ow), scale_factor=(nw / w, nh / h),
                        flip=bool(flips[i]), flip_direction="horizontal" if flips[i] else None,
                        reduce_zero_label=self.reduce_zero_label)
            metas.append(meta)
        if self.mix is not None and self.train:
            self._fill_padding(images, [m["img_shape"][0] for m in metas], [m["img_shape"][1] for m in metas])
            for i, m in enumerate(metas):  # label padding -> ignore
                seg[i, m["img_shape"][0]:, :] = IGNORE_INDEX
                seg[i, :, m["img_shape"][1]:] = IGNORE_INDEX
            mixed = self.mix(images, seg)
            images, seg = mixed.images, mixed.seg
            inputs, segs = list(images.unbind(0)), list(seg.unbind(0))
            for m in metas:
                m["img_shape"] = m["pad_shape"] = tuple(images.shape[2:])
        else:
            inputs = [images[i, :, :m["img_shape"][0], :m["img_shape"][1]] for i, m in enumerate(metas)]
            gt = [m["img_shape"] if self.train else m["ori_shape"] for m in metas]
            segs = [seg[i, :g[0], :g[1]] for i, g in enumerate(gt)]
        samples = []
        for meta, s in zip(metas, segs):
            d = SegDataSample(metainfo=meta)
            d.gt_sem_seg = PixelData(data=s[None])
            samples.append(d)
        return {"inputs": inputs, "data_samples": samples}
