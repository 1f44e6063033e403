"""The DALI GPU path against the CPU path, on photographs (``@pytest.mark.gpu``: ``pytest -m gpu``, ``make gpu-check``).

Decode tolerance. The GPU path decodes with nvJPEG (DALI's ``mixed`` decoder, the hardware JPEG decoder where
the GPU has one) and resizes on the GPU; the CPU path decodes the same crop with libjpeg-turbo and resizes with
OpenCV. The JPEG standard leaves two things to the decoder: the inverse DCT's rounding (a level or two per
pixel) and how the subsampled chroma planes (PIL writes 4:2:0) are brought to full size. libjpeg-turbo
interpolates them; a decoder that replicates them instead moves these photographs by up to 1.0 grey level on
average per image and 9 levels at the 99th percentile, all of it along colour edges. The bilinear resizes add at
most one level. So per image the mean absolute difference must stay below ``MEAN_LEVELS`` (2 of 255) and 99 %
of all pixels within ``P99_LEVELS`` (12); the maximum is not bounded. A wrong flip moves the mean by tens of
levels on a photograph (checked below), a wrong crop window by as much.

The dense (detection / segmentation) graphs on the GPU: ``tests/test_dali_dense.py::test_gpu_graph_matches_cpu_graph``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nvidia.dali")

from pipelines import build_loader  # noqa: E402
from pipelines.presets import IMAGENET_STD  # noqa: E402
from rmix import RecursiveMix  # noqa: E402
from shards.build import ShardParams, build  # noqa: E402
from tools.photos import write_photo_imagefolder  # noqa: E402

pytestmark = pytest.mark.gpu

MEAN_LEVELS = 2.0
P99_LEVELS = 12.0
CLASSES = 4


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """48 training photographs (300-500 px, JPEG quality 90) of 4 classes, in 3 shards."""
    tmp = tmp_path_factory.mktemp("photos")
    src = write_photo_imagefolder(tmp / "src", n_train=48, n_val=8, classes=CLASSES)
    build(ShardParams(dataset="imagenet", formats=["wds"], samples_per_shard=16), src, tmp / "out", workers=4,
          progress=False)
    return tmp / "out" / "imagenet"


def photo_loader(root, device, **kw):
    return build_loader(root, "train", backend="dali", batch_size=8, train=True, device=device, num_workers=4,
                        seed=3, **kw)


def gap(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Two normalised batches' difference in grey levels (0..255): per-image means, the 99th percentile."""
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    diff = ((a.float().cpu() - b.float().cpu()) * std).abs()
    return {"means": diff.mean((1, 2, 3)), "p99": diff.flatten().quantile(0.99).item(), "max": diff.max().item()}


def within_decode_tolerance(a: torch.Tensor, b: torch.Tensor) -> bool:
    g = gap(a, b)
    return bool(g["means"].max() < MEAN_LEVELS and g["p99"] < P99_LEVELS)


def test_mixed_decode_matches_the_cpu_decode_on_the_same_crops(photo_shards):
    """The device loader (``mixed`` decode fused with the random crop, GPU resize and flip) against the CPU
    loader with the same seed: the same samples, crops and flips, pixels within the decode tolerance."""
    gpu, cpu = photo_loader(photo_shards, "cuda"), photo_loader(photo_shards, "cpu")
    n = 0
    for g, c in zip(gpu, cpu):
        assert g.images.is_cuda and g.images.shape == c.images.shape == (8, 3, 224, 224)
        assert torch.equal(g.labels.cpu(), c.labels)
        assert within_decode_tolerance(g.images, c.images), gap(g.images, c.images)
        # the tolerance is tight enough to see a flip the other way
        assert gap(g.images.flip(-1), c.images)["means"].median() > 3 * MEAN_LEVELS
        n += 1
    assert n == len(cpu) == 6


@pytest.mark.parametrize("box", ["batch", "sample"])
def test_gpu_loader_with_recursive_mix_gives_the_cpu_loaders_batches(photo_shards, box):
    """With RecursiveMix and the same seeds, over two epochs: labels, boxes, lams and history logits equal,
    targets equal up to float rounding (the GPU may fuse the multiply-add), images within the decode tolerance."""
    def run(device):
        L = photo_loader(photo_shards, device, mix=RecursiveMix(alpha=1.0, box=box, seed=9))
        out = []
        for _ in range(2):
            for b in L:
                out.append({"images": b.images.cpu(), "labels": b.labels.cpu(), "targets": b.targets.cpu(),
                            "lam": b.lam.cpu(), "boxes": None if b.boxes is None else b.boxes.cpu(),
                            "history": None if b.history_logits is None else b.history_logits.cpu()})
                # logits from the labels, not the pixels, so both devices hand the mix the same history
                L.record_logits(3.0 * torch.nn.functional.one_hot(b.labels, CLASSES).float())
        return out

    cpu, gpu = run("cpu"), run("cuda")
    assert len(cpu) == len(gpu) == 12 and sum(b["boxes"] is not None for b in cpu) >= 8
    for c, g in zip(cpu, gpu):
        assert torch.equal(c["labels"], g["labels"]) and torch.equal(c["lam"], g["lam"])
        assert (c["boxes"] is None) == (g["boxes"] is None)
        if c["boxes"] is not None:
            assert torch.equal(c["boxes"], g["boxes"]) and torch.equal(c["history"], g["history"])
        assert torch.allclose(c["targets"], g["targets"], rtol=0, atol=1e-6)
        assert within_decode_tolerance(c["images"], g["images"]), gap(c["images"], g["images"])


def test_gpu_mid_epoch_checkpoint_resumes_exactly(photo_shards):
    """A device loader with RecursiveMix saved after 3 of 6 batches and restored in a fresh loader gives the
    rest of that epoch and the whole next one bit for bit (DALI's reader checkpoint, the mix's history)."""
    def make():
        return photo_loader(photo_shards, "cuda", mix=RecursiveMix(alpha=1.0, box="sample", seed=9))

    def step(L, b):
        L.record_logits(b.images.float().mean((2, 3)).repeat(1, 2)[:, :CLASSES])  # logits depend on the pixels

    def take(L, batches):
        for b in L:
            batches.append((b.images.clone(), b.targets.clone(), b.labels.clone(),
                            None if b.boxes is None else b.boxes.clone()))
            step(L, b)

    ref, full = make(), []
    ref.set_epoch(0)
    take(ref, full)
    ref.set_epoch(1)
    take(ref, full)

    run = make()
    run.set_epoch(0)
    it = iter(run)
    for _ in range(3):
        step(run, next(it))
    state = run.state_dict()
    del it, run
    resumed, rest = make(), []
    resumed.load_state_dict(state)
    take(resumed, rest)
    resumed.set_epoch(1)
    take(resumed, rest)
    assert len(full) == 12 and len(rest) == len(full) - 3
    for (i1, t1, l1, b1), (i2, t2, l2, b2) in zip(full[3:], rest):
        assert i1.is_cuda and torch.equal(i1, i2) and torch.equal(t1, t2) and torch.equal(l1, l2)
        assert (b1 is None and b2 is None) or torch.equal(b1, b2)
