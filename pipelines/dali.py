"""DALI backend (the default): ``fn.readers.webdataset`` over our shards and ``.idx`` files, decode and
augment in one DALI graph, then the mix on the batch as it leaves the iterator.

The graph is the module-level ``@pipeline_def`` factory :func:`wds_pipeline` (the shape of NVIDIA's
RN50 example, ``docs/examples/use_cases/pytorch/resnet50/main.py``): the reader is named ``"reader"``
so the iterator sizes the epoch from it, and the augmentation subgraph is the plain function
:func:`augment`. The loader only calls the factory; tests and benchmarks build the same graph.

One switch: with CUDA the graph decodes with ``device='mixed'`` (nvJPEG / the hardware decoder, fused
with the random crop) and augments on the GPU of ``device_id`` (:func:`dali_device_id`: always the
resolved CUDA index, so ``device='cuda'`` means the current GPU); without CUDA the same graph runs CPU
operators with ``device_id=None``, with one exception: ImageNet training on a CPU (``host_crop``) stops the
graph after the fused crop decode and resizes and flips with OpenCV in a thread pool, because DALI's CPU
resize cost more than the decode before it (the same crops and flips; bilinear within one grey level).
Sharding across DDP ranks is DALI's (``shard_id``/``num_shards``), the pipeline seed is
``derive_seed(seed, rank, 0, "reader")`` (DALI reshuffles on its own every epoch), train drops the last
partial batch (equal batch counts on every rank, DALI's iterator stops all ranks together), eval pads and
the iterator removes the padding so every sample is seen exactly once across ranks. Mid-epoch resume uses
DALI's own checkpointing (``enable_checkpointing``).

Start checks (:mod:`pipelines.checks`): DALI reads each sample at the offset its ``.idx`` lists and
never parses the tar, so a damaged ``.idx`` or tar would silently feed wrong bytes; the loader checks
each ``.idx`` against the manifest and the tar headers at its offsets before building the graph.
``rmix verify`` is the full (pixel-level) check. An image DALI cannot decode ends the pass in one
:class:`ShardError` line naming the shard and the sample: DALI names them when the image's data is
damaged (``Failed to decode sample #i : TAR:OFFSET:MEMBER``); when it cannot even parse the header it
names neither, and the loader finds the sample by reading the headers of this rank's shards
(:func:`first_unreadable_image`). On such a header DALI 2.4's CPU decoder crashes the process in most runs
(SIGSEGV in ``dali::imgcodec::ImageDecoder``) before it can raise: ``rmix verify`` names that sample. A
bad image in the first batch fails while the loader is built (DALI's iterator reads that batch then).

Why the mix runs after the iterator and not inside the graph: measured in ``rmix bench`` (see
``tools/bench/loaders.py``); the paste is a few strided copies of a batch that is already on the device,
while feeding history back through ``external_source`` would serialise the pipeline on the trainer.
"""

from __future__ import annotations

import ctypes
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from shards.checks import check_wds_split
from shards.errors import ShardError
from shards.reader import iter_tar, split_files

from .loader import Loader, decode_ascii_labels
from .presets import Preset
from .seeds import derive_seed

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as _e:
    raise ImportError(f"backend 'dali' needs nvidia-dali ({_e}); install with `make setup` or "
                      "pip install nvidia-dali-cuda130") from None

LABEL_WIDTH = 8  # ASCII digits of a .cls entry, zero padded to a fixed width so batches are dense

# A forked child (a DataLoader worker started while a DALI pipeline is alive) inherits the pipeline objects
# but not their executor threads. When the child's garbage collector finalises one (a pipeline in a
# reference cycle, from a loader the parent no longer uses), DALI's Shutdown joins threads that do not exist
# there and the worker dies with SIGSEGV: seen in the test suite, from gdb on the worker's core. So in a
# child every inherited pipeline forgets its backend, which is parked in a list that is never freed (not even
# at interpreter exit), and its finaliser does nothing. The child never runs those pipelines anyway.
_FORKED_AWAY: list = []
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_FORKED_AWAY))


def _orphan_pipelines_in_child() -> None:
    for ref in list(Pipeline._pipes):
        pipe = ref()
        if pipe is not None and getattr(pipe, "_pipe", None) is not None:
            _FORKED_AWAY.append(pipe._pipe)
            pipe._pipe = None
    Pipeline._pipes.clear()


os.register_at_fork(after_in_child=_orphan_pipelines_in_child)


@contextmanager
def too_few_samples_is_one_line(what: str, world_size: int):
    """DALI's reader refuses a split with fewer samples than shards (DDP ranks) in an assertion of many lines
    that names neither; this turns it into one ValueError line."""
    try:
        yield
    except RuntimeError as e:
        m = re.search(r"number of input samples: (\d+), needs to be at least equal to the requested number of "
                      r"shards", str(e))
        if m is None:
            raise
        raise ValueError(f"{what}: {m.group(1)} sample(s) for {world_size} ranks, and DALI gives every rank at "
                         f"least one; use at most {m.group(1)} ranks for it") from None


# what DALI's decoders say when an image's data is damaged; its source info is TAR:OFFSET:MEMBER
_DALI_NAMES_SAMPLE = re.compile(r"Failed to decode sample #\d+ : (?P<tar>.+):\d+:(?P<member>[^\s:]+)$", re.M)
_DECODER_OPERATORS = ("fn.decoders.image", "fn.decoders.image_random_crop")


def first_unreadable_image(files: Sequence[str], ext: str) -> Optional[tuple[str, str, str]]:
    """``(tar, sample key, why)`` of the first sample in ``files`` whose image header PIL cannot read, or None.
    Streams the tars (:func:`shards.reader.iter_tar`) and parses headers only, no pixels."""
    from PIL import Image, UnidentifiedImageError

    for tar in files:
        for key, members in iter_tar(tar, fields={ext}):
            try:
                Image.open(io.BytesIO(members.get(ext) or b"")).close()
            except UnidentifiedImageError:
                return str(tar), key, "not an image file"
            except Exception as e:  # noqa: BLE001 -- whatever PIL says is the reason
                return str(tar), key, (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


def decode_error(e: RuntimeError, files: Sequence[str], ext: str, root: str, split: str) -> Optional[ShardError]:
    """The one-line :class:`ShardError` for DALI's error ``e`` when a decoder failed on one of ``files`` (the
    shards this rank reads), naming the shard and the sample; None for any other error."""
    text = str(e)
    if not any(f"`nvidia.dali.{op}`" in text for op in _DECODER_OPERATORS):
        return None
    fix = f"rebuild that shard (rmix verify {root} lists every such sample)"
    m = _DALI_NAMES_SAMPLE.search(text)
    if m:
        member = m.group("member")
        key = member[: -len(ext) - 1] if member.endswith("." + ext) else member
        return ShardError(f"{m.group('tar')}: sample {key}: DALI cannot decode its image (damaged data); {fix}")
    said = (text.split("encountered:", 1)[-1].strip().splitlines() or ["no reason given"])[0]
    found = first_unreadable_image(files, ext)
    if found:
        tar, key, why = found
        return ShardError(f"{tar}: sample {key}: DALI cannot decode its image ({why}; DALI: {said}); {fix}")
    return ShardError(f"{root} split {split!r}: DALI cannot decode an image ({said}); rmix verify {root} names it")


def dali_device_id(device: torch.device) -> Optional[int]:
    """DALI's ``device_id`` for a resolved training device: the CUDA index, or None (CPU-only graph).

    A CUDA device without an index is refused: DALI would read it as None and build a CPU-only
    pipeline while the graph asks for GPU operators. Resolve it first with
    :func:`pipelines.loader.resolve_device` (bare 'cuda' -> the current GPU).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda" and device.index is not None:
        return device.index
    raise ValueError(f"DALI needs 'cpu' or an indexed CUDA device (cuda:N), got {str(device)!r}; "
                     "resolve it with pipelines.loader.resolve_device")


def random_crop_decode(encoded, gpu: bool):
    """Fused decode + RandomResizedCrop's crop (scale=(0.08, 1), ratio=(3/4, 4/3), as torchvision): only the
    crop's region of the JPEG is decoded. HWC uint8 RGB, one size per sample."""
    return fn.decoders.image_random_crop(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                         random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                         num_attempts=10)


def augment(encoded, preset: Preset, gpu: bool, normalise: bool = True):
    """The augmentation subgraph of a preset: encoded images -> normalised float CHW, or with
    ``normalise=False`` uint8 CHW (the loader then mixes the uint8 batch and normalises once).

    ``preset=None`` decodes only (uint8 HWC RGB), for tests and benchmarks of the reader and decoder.
    """
    decode_dev = "mixed" if gpu else "cpu"
    op_dev = "gpu" if gpu else "cpu"
    if preset is None:
        return fn.decoders.image(encoded, device=decode_dev, output_type=types.RGB)
    common = dict(dtype=types.FLOAT, output_layout="CHW", mean=list(preset.mean), std=list(preset.std)) \
        if normalise else dict(dtype=types.UINT8, output_layout="CHW")
    if preset.kind == "imagenet" and preset.train:
        images = random_crop_decode(encoded, gpu)
        images = fn.resize(images, device=op_dev, resize_x=preset.size, resize_y=preset.size,
                           interp_type=types.INTERP_LINEAR, antialias=False)
        if preset.color_jitter:
            lo, hi = 1.0 - preset.color_jitter, 1.0 + preset.color_jitter
            images = fn.color_twist(images, device=op_dev, brightness=fn.random.uniform(range=[lo, hi]),
                                    contrast=fn.random.uniform(range=[lo, hi]),
                                    saturation=fn.random.uniform(range=[lo, hi]))
        return fn.crop_mirror_normalize(images, device=op_dev, mirror=fn.random.coin_flip(), **common)
    if preset.kind == "imagenet":
        images = fn.decoders.image(encoded, device=decode_dev, output_type=types.RGB)
        images = fn.resize(images, device=op_dev, resize_shorter=preset.resize, interp_type=types.INTERP_LINEAR)
        return fn.crop_mirror_normalize(images, device=op_dev, crop=(preset.size, preset.size), **common)
    images = fn.decoders.image(encoded, device=decode_dev, output_type=types.RGB)
    if preset.train:
        # RandomCrop(32, padding=4): zero-pad to 40x40, then a random integer window of 32x32
        ratio = (preset.size + 2 * preset.pad) / preset.size
        images = fn.paste(images, device=op_dev, ratio=ratio, fill_value=0, paste_x=0.5, paste_y=0.5)
        return fn.crop_mirror_normalize(images, device=op_dev, crop=(preset.size, preset.size),
                                        crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                                        crop_pos_y=fn.random.uniform(range=[0.0, 1.0]),
                                        mirror=fn.random.coin_flip(), **common)
    return fn.crop_mirror_normalize(images, device=op_dev, **common)


@pipeline_def(enable_checkpointing=True)
def wds_pipeline(files: Sequence[str], index_files: Sequence[str], ext: str, preset: Optional[Preset],
                 shard_id: int = 0, num_shards: int = 1, gpu: bool = False, is_training: bool = False,
                 initial_fill: int = 1024, normalise: bool = True, host_crop: bool = False):
    """Our webdataset shards -> ``(images, labels)``, as a DALI ``@pipeline_def`` factory.

    ``host_crop`` (ImageNet training presets without colour jitter): the graph stops after the fused
    crop decode and returns ``(crops, labels, flips)``, crops of one size per sample, for the loader to
    resize and flip with OpenCV (:class:`DaliLoader`). Its random operators are created in the order of
    the full graph's (crop, then the flip coin), so both draw the same crops and flips.

    Call it with the graph's arguments plus DALI's pipeline arguments (``batch_size``,
    ``num_threads``, ``device_id`` -- None for a CPU-only graph, else the GPU that ``gpu=True`` runs
    on --, ``seed``, ``prefetch_queue_depth``, ``checkpoint``). Training shuffles and drops nothing
    here (the iterator drops the last partial batch); eval pads the last batch and sticks to its
    shard so each sample is read exactly once across ``num_shards``. Labels are the ``.cls`` ASCII
    digits zero-padded to ``LABEL_WIDTH`` bytes (:func:`pipelines.loader.decode_ascii_labels`).
    """
    encoded, cls = fn.readers.webdataset(
        paths=list(files), index_paths=list(index_files), ext=[ext, "cls"], missing_component_behavior="error",
        shard_id=shard_id, num_shards=num_shards, random_shuffle=is_training, initial_fill=initial_fill,
        pad_last_batch=not is_training, stick_to_shard=not is_training, name="reader")
    labels = fn.pad(cls, axes=(0,), shape=(LABEL_WIDTH,), fill_value=0)
    if host_crop:
        return random_crop_decode(encoded, gpu), labels, fn.random.coin_flip()
    images = augment(encoded, preset, gpu, normalise)
    return images, labels.gpu() if gpu else labels


class HostCropIterator(DALIGenericIterator):
    """DALI's iterator (epoch size, dropping the last partial batch, checkpoints: all its own) over a graph
    whose crops differ in size per sample. DALIGenericIterator would stack them into one tensor and fails;
    here ``finish(crops, labels, flips)`` gets each crop as a numpy view of DALI's buffer, while that buffer
    is still held, and returns the batch the iterator yields."""

    def __init__(self, pipe, finish, **kw):
        self._finish_batch = finish
        super().__init__([pipe], ["images", "labels", "flips"], prepare_first_batch=False, **kw)

    def __next__(self):
        self._ever_consumed = True
        (crops, labels, flips), = self._get_outputs()
        if self._advance_and_check_drop_last(dry_run=True):
            batch = None  # a partial last batch: DALI's own __next__ drops it, so no work is spent on it
        else:
            batch = self._finish_batch([np.asarray(crops[i]) for i in range(len(crops))],
                                       np.array(labels.as_array()), np.array(flips.as_array()).reshape(-1))
        self._schedule_runs()  # releases DALI's buffers: the views above die here
        self._advance_and_check_drop_last()  # raises StopIteration at the end of the epoch
        return [batch]


class DaliLoader(Loader):
    backend = "dali"
    # Epoch order comes from DALI's reader, which reshuffles on its own every epoch: set_epoch()
    # resets our bookkeeping and the mix, and a checkpoint restores the reader's exact state.

    #: The graph normalises (fused with crop and mirror). ``False`` hands over uint8 instead, for the loader
    #: to mix before normalising; measured on the CPU (photographs, batch 64) it was not faster: 0.95-0.98x
    #: with and without RecursiveMix, inside the spread of the repeats.
    normalise_in_graph = True

    def __init__(self, manifest, split, *, host_crop: Optional[bool] = None, **kw):
        super().__init__(manifest, split, **kw)
        self._device_id = dali_device_id(self.device)
        # On a CPU, DALI's resize costs more than the crop decode before it (measured on photographs,
        # batch 64: the graph gave 690 images per CPU-second, decode + OpenCV's resize 1,250), so the
        # ImageNet training graph stops after the crop decode and OpenCV finishes here. Colour jitter
        # has no host version: those presets keep the graph.
        can = self.preset.kind == "imagenet" and self.train and not self.preset.color_jitter
        if host_crop and not can:
            raise ValueError("host_crop needs an ImageNet training preset without colour jitter, "
                             f"not {self.preset.name!r}")
        self.host_crop = can and self._device_id is None if host_crop is None else bool(host_crop)
        self._pool = None
        files = split_files(self.manifest, split, "wds")
        check_wds_split(self.manifest, split, files, self.rank, self.world_size)
        root = self.manifest["root"]
        self._files = [str(f) for f in files]
        self._index_files = [f"{root}/{s['idx']}" for s in self.manifest["splits"][split]["wds"]["shards"]]
        self._ext = self.manifest["splits"][split]["wds"]["ext"]
        self._iterator = self._build(checkpoint=None)

    def _build(self, checkpoint):
        pipe = wds_pipeline(
            files=self._files, index_files=self._index_files, ext=self._ext, preset=self.preset,
            shard_id=self.rank, num_shards=self.world_size, gpu=self._device_id is not None,
            is_training=self.train, initial_fill=min(4096, max(self.batch_size * 4, 256)),
            normalise=self.normalise_in_graph, host_crop=self.host_crop,
            batch_size=self.batch_size, num_threads=self.num_workers, device_id=self._device_id,
            seed=derive_seed(self.seed, self.rank, 0, "reader"), prefetch_queue_depth=2, checkpoint=checkpoint)
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        # DALI's iterator reads its first batch as it is built: a bad image there fails here
        with too_few_samples_is_one_line(f"{self.manifest['root']} split {self.split!r}", self.world_size), \
                self._decode_errors_are_one_line():
            if self.host_crop:
                return HostCropIterator(pipe, self._resize_on_host, reader_name="reader", auto_reset=True,
                                        last_batch_policy=policy)
            return DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader", auto_reset=True,
                                       last_batch_policy=policy)

    def _resize_on_host(self, crops: list, labels: np.ndarray, flips: np.ndarray) -> dict:
        """Each crop resized to the preset's size with OpenCV's bilinear (DALI's INTERP_LINEAR without
        antialiasing: the same filter) and flipped, in a thread pool (OpenCV releases the GIL), into a
        uint8 batch. The batch is NHWC in memory and handed on as an NCHW view: the mix pastes it as uint8
        and the normalisation writes contiguous NCHW float in the pass it needs anyway."""
        import cv2

        size = self.preset.size
        out = torch.empty((len(crops), size, size, 3), dtype=torch.uint8)
        dst = out.numpy()

        def one(i: int) -> None:
            crop = crops[i]
            if crop.shape[:2] == (size, size):
                resized = crop
            else:
                resized = cv2.resize(crop, (size, size), dst=None if flips[i] else dst[i],
                                     interpolation=cv2.INTER_LINEAR)
            if flips[i]:
                cv2.flip(resized, 1, dst=dst[i])
            elif resized is crop:
                dst[i] = crop

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="dali-host")
        list(self._pool.map(one, range(len(crops))))
        return {"images": out.permute(0, 3, 1, 2), "labels": torch.from_numpy(labels)}

    def __len__(self) -> int:
        return len(self._iterator)

    def _batches(self, start: int) -> Iterator:
        # ``start`` needs no skipping: a restored pipeline resumes where its checkpoint was taken
        with self._decode_errors_are_one_line():
            for out in self._iterator:
                images, raw = out[0]["images"], out[0]["labels"]
                yield images, decode_ascii_labels(raw.to(images.device, non_blocking=True))

    @contextmanager
    def _decode_errors_are_one_line(self):
        """A decoder's error inside the block becomes the one-line ShardError of :func:`decode_error`."""
        try:
            yield
        except RuntimeError as e:
            error = decode_error(e, self._rank_files(), self._ext, self.manifest["root"], self.split)
            if error is None:
                raise
            raise error from None

    def _rank_files(self) -> list[str]:
        """The shards holding this rank's samples: DALI gives shard ``r`` of ``W`` the samples
        ``[n * r // W, n * (r + 1) // W)`` of the files' concatenation."""
        counts = [int(s["num_samples"]) for s in self.manifest["splits"][self.split]["wds"]["shards"]]
        n = sum(counts)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        starts = np.cumsum([0] + counts[:-1])
        return [f for f, a, c in zip(self._files, starts, counts) if a < hi and a + c > lo]

    def _backend_state(self) -> Any:
        return self._iterator.checkpoints()[0]

    def _load_backend_state(self, state: Any) -> None:
        self._iterator = self._build(checkpoint=state)
