"""DALI detection loader: ``fn.readers.coco`` on a COCO layout -> mmdet batches (``DetDataPreprocessor``'s input).

The graph is the module-level ``@pipeline_def`` factory :func:`coco_pipeline` (reader named ``"reader"`` so
the iterator sizes the epoch; augmentation subgraph :func:`det_augment`). Same device switch as
:mod:`pipelines.dali`: with CUDA ``mixed`` decode and GPU operators on ``dali_device_id(device)``, without
it the same graph on CPU with ``device_id=None``. DDP: DALI's ``shard_id``/``num_shards``; train drops the
last partial batch, eval pads the reader and the iterator removes the padding, so each image is evaluated
exactly once across ranks. Reader seed ``derive_seed(seed, rank, 0, "reader")`` (DALI reshuffles every
epoch on its own); resume with DALI's checkpointing.

What matches mmdet's stock ATSS pipeline (``LoadImageFromFile, LoadAnnotations, Resize(scale=(1333, 800),
keep_ratio=True), RandomFlip(0.5), PackDetInputs`` + ``DetDataPreprocessor(pad_size_divisor=32)``):

* annotations: ltrb pixels ``[x, y, x + w, y + h]``, ``iscrowd`` boxes excluded (mmdet moves them to
  ``ignored_instances``, which ATSS does not use), labels mapped by category *name* to the index of the
  dataset's ``classes`` (mmdet's ``cat2label``); training skips images without annotations
  (``filter_empty_gt=True``), evaluation keeps them. mmdet's ``min_size=32`` image filter is not applied
  (COCO has no image that small).
* output size: mmcv's ``rescale_size`` arithmetic exactly (``s = min(1333 / long, 800 / short)``,
  ``int(side * s + 0.5)``, in float64 inside the graph); boxes scaled by ``(new_w / w, new_h / h)``,
  clipped to the image and flipped ``x -> W - x`` with the same coin as the pixels; the metainfo mmdet
  reads (``img_id``, ``img_path``, ``ori_shape``, ``img_shape``, ``scale_factor``, ``flip``,
  ``flip_direction``); BGR channel order (what ``LoadImageFromFile`` gives and ``bgr_to_rgb=True`` expects).
* padding to a multiple of 32: the images are padded to the batch maximum inside the graph (a dense batch),
  but each ``inputs`` entry is the unpadded view ``[:, :h, :w]``, so ``DetDataPreprocessor`` normalises
  and pads exactly as with the stock loader (pad value 0 after normalisation).

On a CPU (no CUDA) the resize runs on the host (``host_resize``, the default there): the graph decodes and
pads the decoded images to the batch maximum, and the loader resizes each with OpenCV's ``INTER_LINEAR`` (what
mmcv's ``imresize`` calls), flips it and writes it transposed into the padded CHW batch, one image per
thread. Why: DALI's CPU bilinear resize is ~15x slower than OpenCV's here (640x480 -> 1067x800: ~52 images
per CPU-second for decode + resize in DALI, against ~1,100 resizes/s for OpenCV on one core), which made this
loader 0.64x mmdet's own DataLoader per CPU-second. With the host resize the pixels are those of the stock
pipeline bit for bit (both decode with libjpeg-turbo, both resize with OpenCV). On a GPU the whole graph runs
on the device (``mixed`` decode, GPU resize, flip and pad); its pixels differ from OpenCV's fixed-point
bilinear by +-1 grey level. ``host_resize=False`` runs that same graph on the CPU (the tests do, for parity).

Training order comes from DALI's shuffle buffer (``random_shuffle``, as :mod:`pipelines.dali`): a full
permutation per epoch while the dataset fits the buffer (1,024 images), a buffer shuffle beyond, not
mmengine's ``DefaultSampler`` permutation.

With dense RecursiveMix (:class:`rmix.dense.DetRecursiveMix`) the mix runs on the dense padded batch as it
leaves the iterator (history = the previous mixed batch); the padding is filled with the pixel mean
(rounded to uint8, i.e. ~0 after normalisation, as the stock pad) and each ``inputs`` entry is the whole
padded image, with ``img_shape`` = the padded shape, since pasted content may land in the padding.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from .dali import dali_device_id, too_few_samples_is_one_line
from .loader import one_torch_thread, resolve_device
from .seeds import derive_seed

try:
    from nvidia.dali import fn, pipeline_def, types
    import nvidia.dali.math as dmath
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as _e:
    raise ImportError(f"the DALI dense loaders need nvidia-dali ({_e}); install with `make setup`") from None

PAD_DIVISOR = 32
BGR_MEAN = (103.53, 116.28, 123.675)  # mmdet / mmseg ImageNet mean, BGR order (their inputs are BGR)
PAD_MEAN = tuple(round(m) for m in BGR_MEAN)  # the uint8 padding under dense RecursiveMix


def _f64(x):
    return fn.cast(x, dtype=types.FLOAT64)


def keep_ratio_size(h, w, scale: Sequence[float]):
    """mmcv ``rescale_size`` in the graph: (h, w) -> (new_h, new_w) as float64 DataNodes.

    ``scale`` is mmcv's ``(long, short)`` edge bound (e.g. ``(1333, 800)``), orientation-free."""
    long_edge, short_edge = float(max(scale)), float(min(scale))
    hf, wf = _f64(h), _f64(w)
    s = dmath.min(types.Constant(long_edge, dtype=types.FLOAT64) / dmath.max(hf, wf),
                  types.Constant(short_edge, dtype=types.FLOAT64) / dmath.min(hf, wf))
    half = types.Constant(0.5, dtype=types.FLOAT64)
    return dmath.floor(hf * s + half), dmath.floor(wf * s + half)


def det_augment(encoded, scale: Sequence[float], flip_prob: float, gpu: bool, host_resize: bool = False):
    """Encoded JPEG -> (CHW uint8 BGR image padded to the batch max and a multiple of 32,
    shape info int32 ``(h, w, new_h, new_w)``, flip int32).

    With ``host_resize`` the graph stops after decoding: the image is the decoded HWC *RGB* image padded
    to the batch maximum, and the loader resizes, flips, pads and turns it to BGR with OpenCV and numpy
    (module header). RGB because DALI's CPU decoder takes 2.6x longer to give BGR (4.9 against 1.9 ms
    for a 640x480 JPEG, measured here); the host copy reverses the channels for free."""
    shape = fn.peek_image_shape(encoded)  # (h, w, c) on the CPU, before decoding
    h, w = shape[0], shape[1]
    new_h, new_w = keep_ratio_size(h, w, scale)
    op_dev = "gpu" if gpu else "cpu"
    flip = fn.random.coin_flip(probability=flip_prob, dtype=types.INT32)  # p=0 in eval: always 0
    info = fn.cast(fn.stack(_f64(h), _f64(w), new_h, new_w), dtype=types.INT32)
    if host_resize:
        images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
        return fn.pad(images, device=op_dev, axes=(0, 1), fill_value=0), info, flip
    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.BGR)
    images = fn.resize(images, device=op_dev, resize_x=fn.cast(new_w, dtype=types.FLOAT),
                       resize_y=fn.cast(new_h, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR, antialias=False)
    # mirror and HWC -> CHW in one pass (no mean/std: uint8 values unchanged)
    images = fn.crop_mirror_normalize(images, device=op_dev, mirror=flip, output_layout="CHW", dtype=types.UINT8)
    images = fn.pad(images, device=op_dev, axes=(1, 2), align=(PAD_DIVISOR, PAD_DIVISOR), fill_value=0)
    return images, info, flip


@pipeline_def(enable_checkpointing=True)
def coco_pipeline(file_root: str, annotations_file: str, scale=(1333, 800), flip_prob: float = 0.5,
                  shard_id: int = 0, num_shards: int = 1, gpu: bool = False, is_training: bool = False,
                  host_resize: bool = False):
    """COCO images + ``instances_*.json`` -> ``(images, info, flip, boxes, labels, image_ids)``.

    Call with DALI's pipeline arguments too (``batch_size``, ``num_threads``, ``device_id`` -- None for
    a CPU-only graph --, ``seed``, ``checkpoint``). Boxes are the file's ltrb pixels padded with -1 to the
    batch maximum count, labels the file's ``category_id`` padded with -1; the loader scales and flips
    them with ``info`` / ``flip``. Training shuffles and skips images without (non-crowd) annotations;
    eval pads the last batch and sticks to its shard (exact-once across ``num_shards``). ``host_resize``:
    see :func:`det_augment`.
    """
    encoded, boxes, labels, image_ids = fn.readers.coco(
        file_root=file_root, annotations_file=annotations_file, ltrb=True, ratio=False, image_ids=True,
        skip_empty=is_training, include_iscrowd=False, shard_id=shard_id, num_shards=num_shards,
        random_shuffle=is_training, pad_last_batch=not is_training, stick_to_shard=not is_training,
        name="reader")
    images, info, flip = det_augment(encoded, scale, flip_prob if is_training else 0.0, gpu, host_resize)
    boxes = fn.pad(boxes, axes=(0,), fill_value=-1.0)
    labels = fn.pad(fn.cast(labels, dtype=types.INT32), axes=(0,), fill_value=-1)
    return images, info, flip, boxes, labels, image_ids


class DenseDaliLoader:
    """What the detection and segmentation loaders share: device, DDP, epochs, ``state_dict``.

    An iterable of mmengine batches ``{'inputs': [CHW uint8], 'data_samples': [...]}`` that owns its DALI
    pipeline. ``len()`` is batches per epoch on this rank; ``set_epoch()`` resets the bookkeeping and the
    mix history (DALI reshuffles on its own); ``state_dict()`` holds epoch, position, the mix state and
    DALI's reader checkpoint, so ``load_state_dict()`` resumes mid-epoch exactly.
    """

    backend = "dali_dense"
    output_names: Sequence[str] = ()
    source = ""  # what the loader reads (its image folder), for error messages

    def __init__(self, *, batch_size: int, train: bool, device="auto", rank: int = 0, world_size: int = 1,
                 seed: int = 0, mix=None, num_threads: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.batch_size, self.train = batch_size, train
        self.device = resolve_device(device)
        self._device_id = dali_device_id(self.device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.mix = mix
        if mix is not None and hasattr(mix, "borrow_batches"):
            mix.borrow_batches()  # every batch is a fresh tensor and the trainer only reads it
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        self.epoch, self.position = 0, 0
        self._iterator = None
        self._pool = None  # threads of the host-side stages (CPU path), started with the first batch

    def pool(self) -> ThreadPoolExecutor:
        """The loader's ``num_threads`` host threads (OpenCV and numpy copies release the GIL)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix=self.backend)
        return self._pool

    # -- DALI ------------------------------------------------------------------------------------
    def _pipeline(self, checkpoint):
        raise NotImplementedError

    def _build(self, checkpoint=None):
        pipe = self._pipeline(checkpoint)
        with too_few_samples_is_one_line(self.source or self.backend, self.world_size):
            return DALIGenericIterator([pipe], list(self.output_names), reader_name="reader", auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)

    def _pipe_kwargs(self, checkpoint) -> dict:
        return dict(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
                    seed=derive_seed(self.seed, self.rank, 0, "reader"), prefetch_queue_depth=2,
                    checkpoint=checkpoint, shard_id=self.rank, num_shards=self.world_size,
                    gpu=self._device_id is not None, is_training=self.train)

    @property
    def iterator(self):
        if self._iterator is None:
            self._iterator = self._build()
        return self._iterator

    @property
    def num_samples(self) -> int:
        """Samples of one epoch over all ranks (eval: every image once)."""
        return int(self.iterator._pipes[0].reader_meta("reader")["epoch_size"])

    # -- iteration -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.iterator)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch (and reset the mix history, per the mix)."""
        self.epoch, self.position = epoch, 0
        if self.mix is not None:
            self.mix.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        for out in self.iterator:
            self.position += 1
            with one_torch_thread(self._device_id is None):  # DALI's threads decode the next batches meanwhile
                batch = self._batch(out[0])
            yield batch
        self.set_epoch(self.epoch + 1)

    def _batch(self, out: dict) -> dict:
        raise NotImplementedError

    def _fill_padding(self, images: torch.Tensor, heights, widths) -> None:
        """Paint each sample's padding with the rounded BGR mean (~0 after normalisation, as mmdet's pad)."""
        for i, (h, w) in enumerate(zip(heights, widths)):
            for c, m in enumerate(PAD_MEAN):  # fill_ is a memset per plane; a broadcast (3, 1, 1) copy is slower
                images[i, c, h:, :].fill_(m)
                images[i, c, :h, w:].fill_(m)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Epoch, position, rank, mix state and DALI's reader checkpoint: enough to resume exactly."""
        return {**self.reader_state(), "mix": self.mix.state_dict() if self.mix is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_reader_state(state)
        if self.mix is not None and state["mix"] is not None:
            self.mix.load_state_dict(state["mix"])

    def reader_state(self) -> dict[str, Any]:
        """Where the reader stands, without the mix: epoch, position and DALI's reader checkpoint (the order of
        this epoch's remaining images and of every later epoch; DALI draws each epoch's order from its own
        epoch count, so a fresh reader would start again at the first epoch's order)."""
        return {"backend": self.backend, "epoch": self.epoch, "position": self.position, "rank": self.rank,
                "world_size": self.world_size, "seed": self.seed, "dali": self.iterator.checkpoints()[0]}

    def load_reader_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`reader_state` (or :meth:`state_dict`): the next batch is the one that followed it."""
        if state["backend"] != self.backend:
            raise ValueError(f"loader state is from {state['backend']!r}, this loader is {self.backend!r}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"loader state is for rank {state['rank']}/{state['world_size']}, "
                             f"this loader is {self.rank}/{self.world_size}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._iterator = self._build(checkpoint=state["dali"])


class CocoDaliLoader(DenseDaliLoader):
    """COCO detection for mmdet: batches of ``DetDataSample`` with ``gt_instances`` (HorizontalBoxes, labels).

    Args:
        img_dir: the images folder (``data_root/train2017``).
        ann_file: ``instances_*.json``.
        classes: the dataset's class names in mmdet's order (``CocoDataset.METAINFO['classes']``); a
            category whose name is not listed is dropped (mmdet selects categories by name).
        scale: ``Resize(scale=..., keep_ratio=True)``'s scale (default ATSS's (1333, 800)).
        flip_prob: ``RandomFlip(prob=...)`` (train only).
        mix: a :class:`rmix.dense.DetRecursiveMix` (train only), or None.
        host_resize: resize, flip and pad with OpenCV after the DALI graph (module header); default
            (None): on when the loader runs on the CPU, off on a GPU.
        batch_size, train, device, rank, world_size, seed, num_threads: as :class:`DenseDaliLoader`.
    """

    backend = "dali_coco"
    output_names = ("images", "info", "flip", "boxes", "labels", "image_ids")

    def __init__(self, img_dir, ann_file, classes: Sequence[str], *, scale=(1333, 800), flip_prob: float = 0.5,
                 host_resize: Optional[bool] = None, **kw):
        super().__init__(**kw)
        self.host_resize = self._device_id is None if host_resize is None else bool(host_resize)
        self.img_dir, self.ann_file = str(img_dir), str(ann_file)
        self.source = self.img_dir
        if not Path(self.ann_file).is_file():
            raise FileNotFoundError(f"no COCO annotation file {self.ann_file}")
        if not Path(self.img_dir).is_dir():
            raise FileNotFoundError(f"no COCO image folder {self.img_dir}")
        self.scale, self.flip_prob = tuple(scale), float(flip_prob)
        doc = json.loads(Path(self.ann_file).read_text())
        names = list(classes)
        ids = [c["id"] for c in doc["categories"]]
        lut = np.full(max(ids + [0]) + 1, -1, dtype=np.int64)
        for c in doc["categories"]:
            if c["name"] in names:
                lut[c["id"]] = names.index(c["name"])
        self._cat2label = torch.from_numpy(lut)
        self._files = {int(im["id"]): os.path.join(self.img_dir, im["file_name"]) for im in doc["images"]}
        self._iterator = self._build()

    def _pipeline(self, checkpoint):
        return coco_pipeline(file_root=self.img_dir, annotations_file=self.ann_file, scale=self.scale,
                             flip_prob=self.flip_prob, host_resize=self.host_resize, **self._pipe_kwargs(checkpoint))

    def _resize_on_host(self, decoded: torch.Tensor, info, flips, fill: bool) -> torch.Tensor:
        """Decoded HWC RGB images (padded to the batch max) -> the CHW BGR batch the GPU graph gives: each
        image resized to its ``(new_h, new_w)`` with OpenCV's bilinear (mmcv's ``imresize``), flipped,
        written channel-reversed into a batch padded to a multiple of 32; the padding is the rounded mean
        when ``fill``, else left unwritten (the ``inputs`` views never show it)."""
        import cv2

        src = decoded.numpy()
        out_h = -(-max(r[2] for r in info) // PAD_DIVISOR) * PAD_DIVISOR
        out_w = -(-max(r[3] for r in info) // PAD_DIVISOR) * PAD_DIVISOR
        out = torch.empty((len(info), 3, out_h, out_w), dtype=torch.uint8)
        dst = out.numpy()

        def one(i: int) -> None:  # OpenCV and numpy's copy release the GIL: the threads run in parallel
            h, w, nh, nw = info[i]
            img = src[i, :h, :w]
            if (nh, nw) != (h, w):
                img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
            chw = img.transpose(2, 0, 1)[::-1]  # RGB HWC -> BGR CHW ...
            np.copyto(dst[i, :, :nh, :nw], chw[:, :, ::-1] if flips[i] else chw)  # ... and the flip: one copy
            if fill:
                for c, m in enumerate(PAD_MEAN):
                    dst[i, c, nh:, :] = m
                    dst[i, c, :nh, nw:] = m

        list(self.pool().map(one, range(len(info))))
        return out

    def _batch(self, out: dict) -> dict:
        from mmdet.structures import DetDataSample
        from mmdet.structures.bbox import HorizontalBoxes
        from mmengine.structures import InstanceData

        info = out["info"].long().tolist()            # small CPU tensors: no device sync
        flips = out["flip"].reshape(-1).tolist()
        mixing = self.mix is not None and self.train
        if self.host_resize:
            images = self._resize_on_host(out["images"], info, flips, fill=mixing).to(self.device)
        else:
            images = out["images"]
        ids = out["image_ids"].reshape(-1).tolist()
        raw_boxes, raw_labels = out["boxes"], out["labels"].long()
        # the mix works on the boxes on the host and hands them back on the images' device
        ann_device = torch.device("cpu") if mixing else images.device
        boxes, labels, metas = [], [], []
        for i, (h, w, nh, nw) in enumerate(info):
            keep = raw_labels[i] >= 0
            lab = self._cat2label[raw_labels[i][keep]]
            b = raw_boxes[i][keep].float()
            sx, sy = nw / w, nh / h
            b = b * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
            b[:, 0::2] = b[:, 0::2].clamp(0, nw)
            b[:, 1::2] = b[:, 1::2].clamp(0, nh)
            if flips[i]:
                b = torch.stack([nw - b[:, 2], b[:, 1], nw - b[:, 0], b[:, 3]], dim=1)
            known = lab >= 0
            boxes.append(b[known].to(ann_device, non_blocking=True))
            labels.append(lab[known].to(ann_device, non_blocking=True))
            meta = dict(img_id=ids[i], img_path=self._files.get(ids[i], ""), ori_shape=(h, w), img_shape=(nh, nw),
                        scale_factor=(sx, sy))
            if self.train:
                meta.update(flip=bool(flips[i]), flip_direction="horizontal" if flips[i] else None)
            metas.append(meta)
        if mixing:
            if not self.host_resize:  # (the host resize fills it as it writes)
                self._fill_padding(images, [m["img_shape"][0] for m in metas], [m["img_shape"][1] for m in metas])
            mixed = self.mix(images, boxes, labels)
            images, boxes, labels = mixed.images, mixed.boxes, mixed.labels
            inputs = list(images.unbind(0))
            for m in metas:
                m["img_shape"] = tuple(images.shape[2:])
        else:
            inputs = [images[i, :, :m["img_shape"][0], :m["img_shape"][1]] for i, m in enumerate(metas)]
        samples = []
        for meta, b, lab in zip(metas, boxes, labels):
            s = DetDataSample(metainfo=meta)
            s.gt_instances = InstanceData(bboxes=HorizontalBoxes(b), labels=lab)
            s.ignored_instances = InstanceData(bboxes=HorizontalBoxes(b.new_zeros(0, 4)), labels=lab.new_zeros(0))
            samples.append(s)
        return {"inputs": inputs, "data_samples": samples}
