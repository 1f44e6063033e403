"""DALI detection loader: a COCO layout -> mmdet batches (``DetDataPreprocessor``'s input).

mmdet's own ``CocoDataset`` parses the annotation file (:func:`mmdet_coco_samples`: its images, labels,
box rules and training filter, not a second implementation of them); DALI reads and decodes the images
(``fn.readers.file`` over that list, each sample's index beside it, to look its annotations up). The graph
is the module-level ``@pipeline_def`` factory :func:`det_pipeline` (reader named ``"reader"`` so the
iterator sizes the epoch; augmentation subgraph :func:`det_augment`). Same device switch as
:mod:`pipelines.dali`: with CUDA ``mixed`` decode and GPU operators on ``dali_device_id(device)``, without
it the same graph on CPU with ``device_id=None``. DDP: training shards with DALI's
``shard_id``/``num_shards`` and drops the last partial batch; evaluation gives each rank the samples of
mmengine's ``DefaultSampler`` layout (:func:`eval_shard`), so mmengine's gather of the ranks' results counts
every image exactly once for any image count and world size. Reader seed ``derive_seed(seed, rank, 0,
"reader")`` (DALI reshuffles every epoch on its own); resume with DALI's checkpointing.

What matches mmdet's stock ATSS pipeline (``LoadImageFromFile, LoadAnnotations, Resize(scale=(1333, 800),
keep_ratio=True), RandomFlip(0.5), PackDetInputs`` + ``DetDataPreprocessor(pad_size_divisor=32)``):

* annotations: mmdet's (above): ltrb pixels ``[x, y, x + w, y + h]``, labels by mmdet's ``cat2label`` over
  the real COCO category ids, crowd boxes in ``ignored_instances``; training applies the ``filter_cfg``
  (ATSS: ``filter_empty_gt=True, min_size=32``), evaluation keeps every image. Evaluation boxes are scaled
  as in training; mmdet's test pipelines load annotations after ``Resize``, so theirs stay in the original
  frame (no metric reads them: ``CocoMetric`` reads the annotation file).
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

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
def det_pipeline(files: Sequence[str], indices: Optional[Sequence[int]] = None, scale=(1333, 800),
                 flip_prob: float = 0.5, shard_id: int = 0, num_shards: int = 1, gpu: bool = False,
                 is_training: bool = False, host_resize: bool = False):
    """Image files -> ``(images, info, flip, index)``.

    Call with DALI's pipeline arguments too (``batch_size``, ``num_threads``, ``device_id`` -- None for
    a CPU-only graph --, ``seed``, ``checkpoint``). The reader reads ``files[i]`` for each ``i`` of
    ``indices`` (default: every file once) and returns ``i`` beside it: the loader looks the sample's
    annotations up by it. Training shuffles; eval pads the last batch and sticks to its shard.
    ``host_resize``: see :func:`det_augment`.
    """
    indices = list(range(len(files))) if indices is None else [int(i) for i in indices]
    encoded, index = fn.readers.file(
        files=[files[i] for i in indices], labels=indices, shard_id=shard_id, num_shards=num_shards,
        random_shuffle=is_training, pad_last_batch=not is_training, stick_to_shard=not is_training, name="reader")
    images, info, flip = det_augment(encoded, scale, flip_prob if is_training else 0.0, gpu, host_resize)
    return images, info, flip, index


def eval_shard(n: int, rank: int, world_size: int) -> list[int]:
    """The sample indices rank ``rank`` of ``world_size`` evaluates, in order: the layout of mmengine's
    ``DefaultSampler(shuffle=False)`` (``range(n)`` repeated up to a multiple of ``world_size``, then every
    ``world_size``-th from ``rank``).

    Why this layout: mmengine's evaluator gathers the ranks' results with ``collect_results``, which
    interleaves them (first result of each rank in rank order, then the second, ...), stops at the shortest
    rank and keeps the first ``len(dataset)`` = ``n``. With this layout every rank evaluates
    ``ceil(n / world_size)`` samples, the interleaved list is the padded range in order, and the padding (at
    most ``world_size - 1`` repeats of the first samples) falls after the first ``n``: every sample is
    counted exactly once, for any ``n >= 1`` and ``world_size``. DALI's own sharding gives uneven shards
    (3 images on 2 ranks: 1 and 2), which that gather would truncate."""
    per_rank = -(-n // world_size)
    total = per_rank * world_size
    padded = (list(range(n)) * (total // n + 1))[:total]
    return padded[rank::world_size]


def first_unreadable(paths: Sequence[str], pool: ThreadPoolExecutor) -> Optional[str]:
    """The first of ``paths`` whose image header PIL cannot read (missing, empty, not an image), or None."""
    from PIL import Image

    def bad(path: str) -> bool:
        try:
            with Image.open(path) as im:  # reads the header only
                return im.size[0] < 1
        except (OSError, ValueError):
            return True

    return next((p for p, b in zip(paths, pool.map(bad, paths)) if b), None)


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
        self._num_samples = 0  # set by the subclass before its first _build()
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
        with too_few_samples_is_one_line(self.source or self.backend, self.world_size), self._undecodable_is_one_line():
            return DALIGenericIterator([pipe], list(self.output_names), reader_name="reader", auto_reset=True,
                                       last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)

    def source_files(self) -> Sequence[str]:
        """Every file the graph decodes (images, label maps): where an undecodable one is looked for."""
        raise NotImplementedError

    @contextmanager
    def _undecodable_is_one_line(self):
        """DALI reports a file its decoder cannot read in some 40 lines that name neither the file nor the
        folder; this raises one ``ValueError`` line naming the file instead: the first of
        :meth:`source_files` whose header PIL does not recognise (read only on this failure), or, when every
        header reads, the folder."""
        try:
            yield
        except RuntimeError as e:
            msg = str(e)
            if "decoders" not in msg and "peek_image_shape" not in msg:
                raise
            lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and "no longer valid" not in ln]
            reason = lines[-1] if lines else "decoder error"
            bad = first_unreadable(self.source_files(), self.pool())
            where = f"{bad}: DALI cannot decode this file" if bad else f"{self.source}: DALI cannot decode a file here"
            raise ValueError(f"{where} ({reason}); replace or remove it") from None

    def _pipe_kwargs(self, checkpoint) -> dict:
        """DALI's pipeline arguments and this rank's share of the samples: training shards with DALI
        (``shard_id``/``num_shards``, the last partial batch dropped), evaluation reads the rank's
        :func:`eval_shard` whole (every rank the same count, so mmengine's gather counts each sample once)."""
        if self.train:
            share = dict(indices=None, shard_id=self.rank, num_shards=self.world_size)
        else:
            share = dict(indices=eval_shard(self.num_samples, self.rank, self.world_size), shard_id=0, num_shards=1)
        return dict(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self._device_id,
                    seed=derive_seed(self.seed, self.rank, 0, "reader"), prefetch_queue_depth=2,
                    checkpoint=checkpoint, gpu=self._device_id is not None, is_training=self.train, **share)

    @property
    def iterator(self):
        if self._iterator is None:
            self._iterator = self._build()
        return self._iterator

    @property
    def num_samples(self) -> int:
        """Samples of one epoch over all ranks (eval: every image once; mmengine's ``len(dataset)``)."""
        return self._num_samples

    # -- iteration -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.iterator)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch (and reset the mix history, per the mix)."""
        self.epoch, self.position = epoch, 0
        if self.mix is not None:
            self.mix.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.iterator)
        while True:
            with self._undecodable_is_one_line():
                out = next(batches, None)
            if out is None:
                break
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


ATSS_FILTER = dict(filter_empty_gt=True, min_size=32)  # mmdet's COCO detection configs' train filter_cfg


def mmdet_coco_samples(img_dir, ann_file, classes: Sequence[str], *, train: bool,
                       filter_cfg: Optional[dict] = ATSS_FILTER) -> list[dict]:
    """The samples mmdet's ``CocoDataset`` makes of ``ann_file``, by mmdet itself (one implementation of its
    rules): ``img_id``, ``img_path``, ``width``, ``height`` and ``instances`` (``bbox`` ltrb pixels,
    ``bbox_label``, ``ignore_flag``) per image, in its order, after its training filter.

    So the labels are mmdet's ``cat2label`` (the index among the file's categories whose name is in
    ``classes``, by their real COCO ids), annotations with an unknown category, no overlap with the image,
    ``area <= 0`` or a side under 1 pixel are dropped, crowd boxes are flagged ``ignore_flag=1``, and in
    training (``filter_cfg``, ``test_mode=False``) images without an annotation of a selected category or
    smaller than ``min_size`` are skipped. What mmdet refuses (an annotation without ``bbox``, ``area`` or
    ``category_id``, repeated annotation ids) raises a one-line ``ValueError`` naming it."""
    from mmdet.datasets import CocoDataset

    ds = CocoDataset(ann_file=str(ann_file), data_prefix=dict(img=str(img_dir)), metainfo=dict(classes=tuple(classes)),
                     filter_cfg=dict(filter_cfg) if (train and filter_cfg) else None, test_mode=not train,
                     pipeline=[], serialize_data=False, lazy_init=True)
    try:
        ds.full_init()
    except KeyError as e:
        key = e.args[0] if e.args else "?"
        coco = getattr(ds, "coco", None)
        bad = [a for a in (coco.dataset.get("annotations", []) if coco is not None else []) if key not in a]
        which = f"annotation {bad[0].get('id')} (image {bad[0].get('image_id')})" if bad else "an entry"
        raise ValueError(f"{ann_file}: {which} has no {key!r}, which mmdet's CocoDataset reads from every "
                         "annotation; fix or remove it") from None
    except AssertionError as e:  # mmdet's own checks (e.g. repeated annotation ids): its message, one line
        raise ValueError(f"{ann_file}: {str(e).splitlines()[0] if str(e) else 'refused by mmdet'}") from None
    return [ds.get_data_info(i) for i in range(len(ds))]


class CocoDaliLoader(DenseDaliLoader):
    """COCO detection for mmdet: batches of ``DetDataSample`` with ``gt_instances`` (HorizontalBoxes, labels)
    and ``ignored_instances`` (crowd boxes), for the images and annotations mmdet's ``CocoDataset`` makes of
    the file (:func:`mmdet_coco_samples`); DALI reads and decodes the images (``fn.readers.file``).

    Args:
        img_dir: the images folder (``data_root/train2017``).
        ann_file: ``instances_*.json``.
        classes: the dataset's class names (``CocoDataset.METAINFO['classes']``, or the config's
            ``metainfo.classes``); categories are selected by name, as mmdet does.
        filter_cfg: mmdet's ``filter_cfg`` for training (default ATSS's ``filter_empty_gt=True,
            min_size=32``; None keeps every image); evaluation keeps every image, as mmdet's ``test_mode``.
        scale: ``Resize(scale=..., keep_ratio=True)``'s scale (default ATSS's (1333, 800)).
        flip_prob: ``RandomFlip(prob=...)`` (train only).
        mix: a :class:`rmix.dense.DetRecursiveMix` (train only), or None.
        host_resize: resize, flip and pad with OpenCV after the DALI graph (module header); default
            (None): on when the loader runs on the CPU, off on a GPU.
        batch_size, train, device, rank, world_size, seed, num_threads: as :class:`DenseDaliLoader`.
    """

    backend = "dali_coco"
    output_names = ("images", "info", "flip", "index")

    def __init__(self, img_dir, ann_file, classes: Sequence[str], *, filter_cfg: Optional[dict] = ATSS_FILTER,
                 scale=(1333, 800), flip_prob: float = 0.5, host_resize: Optional[bool] = None, **kw):
        super().__init__(**kw)
        self.host_resize = self._device_id is None if host_resize is None else bool(host_resize)
        self.img_dir, self.ann_file = str(img_dir), str(ann_file)
        self.source = self.img_dir
        if not Path(self.ann_file).is_file():
            raise FileNotFoundError(f"no COCO annotation file {self.ann_file}")
        if not Path(self.img_dir).is_dir():
            raise FileNotFoundError(f"no COCO image folder {self.img_dir}")
        self.scale, self.flip_prob = tuple(scale), float(flip_prob)
        samples = mmdet_coco_samples(self.img_dir, self.ann_file, classes, train=self.train, filter_cfg=filter_cfg)
        if not samples:
            raise ValueError(f"{self.ann_file}: no {'training ' if self.train else ''}images left after mmdet's "
                             f"rules (filter_cfg {filter_cfg if self.train else None})")
        self._files = [s["img_path"] for s in samples]
        self._img_ids = [int(s["img_id"]) for s in samples]
        # every sample's instances in three flat arrays (a few tensors, not three per image: COCO has 118k),
        # sample k's are rows offsets[k]:offsets[k + 1]
        inst = [i for s in samples for i in s["instances"]]
        self._boxes = torch.tensor([i["bbox"] for i in inst], dtype=torch.float32).reshape(-1, 4)
        self._labels = torch.tensor([i["bbox_label"] for i in inst], dtype=torch.int64)
        self._ignore = torch.tensor([bool(i["ignore_flag"]) for i in inst], dtype=torch.bool)
        self._offsets = np.cumsum([0] + [len(s["instances"]) for s in samples]).tolist()
        self._num_samples = len(samples)
        self._iterator = self._build()

    def source_files(self) -> Sequence[str]:
        return self._files

    def _pipeline(self, checkpoint):
        return det_pipeline(files=self._files, scale=self.scale, flip_prob=self.flip_prob, host_resize=self.host_resize,
                            **self._pipe_kwargs(checkpoint))

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
        index = out["index"].reshape(-1).tolist()
        # the mix works on the boxes on the host and hands them back on the images' device
        ann_device = torch.device("cpu") if mixing else images.device
        boxes, labels, ignored, metas = [], [], [], []
        for i, (h, w, nh, nw) in enumerate(info):
            k = index[i]
            rows = slice(self._offsets[k], self._offsets[k + 1])
            b, lab, ign = self._boxes[rows], self._labels[rows], self._ignore[rows]
            # mmdet's Resize (HorizontalBoxes.rescale_ in float32, clip_ to the image) and RandomFlip (flip_)
            sx, sy = nw / w, nh / h
            b = b * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
            b[:, 0::2] = b[:, 0::2].clamp(0, nw)
            b[:, 1::2] = b[:, 1::2].clamp(0, nh)
            if flips[i]:
                b = torch.stack([nw - b[:, 2], b[:, 1], nw - b[:, 0], b[:, 3]], dim=1)
            boxes.append(b[~ign].to(ann_device, non_blocking=True))  # PackDetInputs: ignore_flag 0 -> gt
            labels.append(lab[~ign].to(ann_device, non_blocking=True))
            ignored.append((b[ign].to(images.device, non_blocking=True), lab[ign].to(images.device, non_blocking=True)))
            meta = dict(img_id=self._img_ids[k], img_path=self._files[k], ori_shape=(h, w), img_shape=(nh, nw),
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
        for meta, b, lab, (ib, il) in zip(metas, boxes, labels, ignored):
            s = DetDataSample(metainfo=meta)
            s.gt_instances = InstanceData(bboxes=HorizontalBoxes(b), labels=lab)
            # crowd boxes, where mmdet's PackDetInputs puts them; the mix leaves them where they were
            s.ignored_instances = InstanceData(bboxes=HorizontalBoxes(ib), labels=il)
            samples.append(s)
        return {"inputs": inputs, "data_samples": samples}
