"""DALI backend (the default): ``fn.readers.webdataset`` over our shards and ``.idx`` files, decode and
augment in one DALI graph, then the mix on the batch as it leaves the iterator.

One switch: with CUDA the graph decodes with ``device='mixed'`` (nvJPEG / the hardware decoder, fused
with the random crop) and augments on the GPU; without CUDA the same graph runs CPU operators with
``device_id=None``. Sharding across DDP ranks is DALI's (``shard_id``/``num_shards``), shuffling uses a
per-rank seed, train drops the last partial batch (equal batch counts on every rank, DALI's iterator
stops all ranks together), eval pads and the iterator removes the padding so every sample is seen
exactly once across ranks. Mid-epoch resume uses DALI's own checkpointing (``enable_checkpointing``).

Why the mix runs after the iterator and not inside the graph: measured in ``rmix bench`` (see
``pipelines/bench.py``); the paste is a few strided copies of a batch that is already on the device,
while feeding history back through ``external_source`` would serialise the pipeline on the trainer.
"""

from __future__ import annotations

from typing import Any, Iterator

from .loader import Loader, decode_ascii_labels, split_files
from .presets import Preset

LABEL_WIDTH = 8  # ASCII digits of a .cls entry, zero padded to a fixed width so batches are dense


def _import_dali():
    try:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise ImportError(f"backend 'dali' needs nvidia-dali ({e}); install with `make setup` or pip install nvidia-dali-cuda130") from None
    return fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy


def augment(fn, types, encoded, preset: Preset, gpu: bool):
    """The augmentation subgraph of a preset: encoded images -> normalised float CHW."""
    decode_dev = "mixed" if gpu else "cpu"
    op_dev = "gpu" if gpu else "cpu"
    common = dict(dtype=types.FLOAT, output_layout="CHW", mean=list(preset.mean), std=list(preset.std))
    if preset.kind == "imagenet" and preset.train:
        # fused decode + RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)), as torchvision
        images = fn.decoders.image_random_crop(encoded, device=decode_dev, output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                               num_attempts=10)
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


class DaliLoader(Loader):
    backend = "dali"
    # Epoch order comes from DALI's reader, which reshuffles on its own every epoch: set_epoch()
    # resets our bookkeeping and the mix, and a checkpoint restores the reader's exact state.

    def __init__(self, manifest, split, **kw):
        super().__init__(manifest, split, **kw)
        self._dali = _import_dali()
        self._files = split_files(self.manifest, split, "wds")
        self._ext = self.manifest["splits"][split]["wds"]["ext"]
        self._iterator = self._build(checkpoint=None)

    def _build(self, checkpoint):
        fn, pipeline_def, types, DALIGenericIterator, LastBatchPolicy = self._dali
        gpu = self.device.type == "cuda"
        files, idx = [str(f) for f in self._files], [str(f)[: -len(".tar")] + ".idx" for f in self._files]
        preset, train = self.preset, self.train

        @pipeline_def(enable_checkpointing=True)
        def pipeline():
            encoded, cls = fn.readers.webdataset(
                paths=files, index_paths=idx, ext=[self._ext, "cls"], missing_component_behavior="error",
                shard_id=self.rank, num_shards=self.world_size, random_shuffle=train,
                initial_fill=min(4096, max(self.batch_size * 4, 256)), pad_last_batch=not train,
                stick_to_shard=not train, name="reader")
            images = augment(fn, types, encoded, preset, gpu)
            labels = fn.pad(cls, axes=(0,), shape=(LABEL_WIDTH,), fill_value=0)
            return images, labels.gpu() if gpu else labels

        pipe = pipeline(batch_size=self.batch_size, num_threads=self.num_workers,
                        device_id=self.device.index if gpu else None,
                        seed=self.seed * 1000 + self.rank, prefetch_queue_depth=2, checkpoint=checkpoint)
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader", auto_reset=True,
                                   last_batch_policy=LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL)

    def __len__(self) -> int:
        return len(self._iterator)

    def _batches(self, start: int) -> Iterator:
        # ``start`` needs no skipping: a restored pipeline resumes where its checkpoint was taken
        for out in self._iterator:
            images, raw = out[0]["images"], out[0]["labels"]
            yield images, decode_ascii_labels(raw.to(images.device, non_blocking=True))

    def _backend_state(self) -> Any:
        return self._iterator.checkpoints()[0]

    def _load_backend_state(self, state: Any) -> None:
        self._iterator = self._build(checkpoint=state)
