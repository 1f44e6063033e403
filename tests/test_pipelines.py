"""pipelines/: one batch contract for dali, memory, torch and ffcv, DDP splits, determinism, resume."""

import hashlib
import sys

import pytest
import torch

from conftest import label_value, write_cifar10, write_imagefolder
from pipelines import build_loader
from pipelines.loader import decode_ascii_labels
from pipelines.presets import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from rmix import CutMix, RecursiveMix
from shards.build import ShardParams, build
from shards.errors import ShardError

BACKENDS = ["dali", "memory", "torch", "ffcv"]
EXACT_RESUME = ["dali", "memory", "torch"]  # FFCV's augmentation draws are not seedable


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar")
    src, arrays = write_cifar10(tmp / "src", per_batch=20, test=30)  # 100 train, 30 val
    build(ShardParams(dataset="cifar10", samples_per_shard=10), src, tmp / "out", workers=2, progress=False)
    return tmp / "out" / "cifar10", arrays


@pytest.fixture(scope="module")
def imagenet_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imnet")
    src = write_imagefolder(tmp / "src", per_class=6, val_per_class=3, oddities=False)
    build(ShardParams(dataset="imagenet", samples_per_shard=4, ffcv_write_mode="jpg"), src, tmp / "out",
          workers=2, progress=False)
    return tmp / "out" / "imagenet"


def loader(root, split="train", backend="dali", **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("train", split == "train")
    kw.setdefault("num_workers", 2)
    return build_loader(root, split, backend=backend, **kw)


def brightness(images, mean, std, border=4):
    """Per-sample mean pixel value on 0..255, from the centre (always inside the source image)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    x = images.float().cpu() * s + m
    if border:
        x = x[:, :, border:-border, border:-border]
    return x.mean((1, 2, 3))


def digest(images):
    return [hashlib.sha1(x.float().cpu().numpy().tobytes()).hexdigest() for x in images]


@pytest.mark.parametrize("backend", BACKENDS)
def test_contract_and_label_image_alignment(cifar_shards, backend):
    root, arrays = cifar_shards
    L = loader(root, backend=backend)
    assert len(L) == 100 // 16
    seen_labels = []
    for b in L:
        assert b.images.shape == (16, 3, 32, 32) and b.images.dtype == torch.float32
        assert b.images.device.type == "cpu" and b.labels.dtype == torch.int64
        assert b.targets.shape == (16, 10) and torch.allclose(b.targets.sum(1), torch.ones(16))
        assert b.boxes is None and torch.all(b.lam == 1)
        # each image's content encodes its label: shuffling, cropping and flipping keep them aligned
        expected = torch.tensor([label_value(int(l)) for l in b.labels], dtype=torch.float32)
        assert (brightness(b.images, CIFAR_MEAN, CIFAR_STD) - expected).abs().max() < 6
        seen_labels += b.labels.tolist()
    assert len(seen_labels) == 96
    # shuffled, not in shard order
    assert seen_labels != sorted(seen_labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_sees_every_sample_once_with_exact_normalisation(cifar_shards, backend):
    root, arrays = cifar_shards
    L = loader(root, "val", backend=backend, batch_size=8)
    images = torch.cat([b.images for b in L])
    assert images.shape == (30, 3, 32, 32)
    src = torch.from_numpy(arrays["val"][0]).permute(0, 3, 1, 2).float()
    ref = (src - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert sorted(digest(images.round(decimals=4))) == sorted(digest(ref.round(decimals=4)))


@pytest.mark.parametrize("backend", ["dali", "memory", "torch"])
def test_ddp_two_ranks_disjoint_complete_eval_and_equal_train_batches(cifar_shards, backend):
    root, _ = cifar_shards
    evals = [digest(torch.cat([b.images for b in loader(root, "val", backend, batch_size=4, rank=r, world_size=2)]))
             for r in (0, 1)]
    assert not set(evals[0]) & set(evals[1])
    assert len(evals[0]) + len(evals[1]) == 30 and len(set(evals[0]) | set(evals[1])) == 30
    counts = [sum(1 for _ in loader(root, "train", backend, batch_size=8, rank=r, world_size=2)) for r in (0, 1)]
    assert counts[0] == counts[1] > 0
    lens = [len(loader(root, "train", backend, batch_size=8, rank=r, world_size=2)) for r in (0, 1)]
    assert lens == counts


@pytest.mark.parametrize("backend", EXACT_RESUME)
def test_same_seed_same_batches_and_epochs_differ(cifar_shards, backend):
    root, _ = cifar_shards
    a, b = loader(root, backend=backend, seed=3), loader(root, backend=backend, seed=3)
    ea = [x.images.clone() for x in a]
    eb = [x.images.clone() for x in b]
    assert all(torch.equal(x, y) for x, y in zip(ea, eb))
    ea2 = [x.labels.clone() for x in a]  # second pass = next epoch
    la = [x.labels for x in loader(root, backend=backend, seed=3)]
    assert any(not torch.equal(x, y) for x, y in zip(ea2, la))


@pytest.mark.parametrize("backend", EXACT_RESUME)
def test_mid_epoch_resume_is_exact_including_the_mix(cifar_shards, backend):
    root, _ = cifar_shards

    def make():
        return loader(root, backend=backend, seed=5, mix=RecursiveMix(alpha=1.0, box="sample", seed=9))

    def step(L, b):
        L.mix.record_logits(b.images.mean((2, 3)).repeat(1, 4)[:, :10])  # logits depend on the batch

    ref = make()
    ref.set_epoch(0)
    full = []
    for b in ref:
        full.append((b.images.clone(), b.targets.clone(), b.boxes, b.labels.clone()))
        step(ref, b)

    run = make()
    run.set_epoch(0)
    it = iter(run)
    for _ in range(3):
        step(run, next(it))
    state = run.state_dict()
    del it, run
    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    for b in resumed:
        rest.append((b.images.clone(), b.targets.clone(), b.boxes, b.labels.clone()))
        step(resumed, b)
    assert len(rest) == len(full) - 3
    for (i1, t1, b1, l1), (i2, t2, b2, l2) in zip(full[3:], rest):
        assert torch.equal(i1, i2) and torch.equal(t1, t2) and torch.equal(l1, l2)
        assert (b1 is None and b2 is None) or torch.equal(b1, b2)


def test_recursive_mix_inside_the_loader(cifar_shards):
    root, _ = cifar_shards
    L = loader(root, backend="dali", mix=RecursiveMix(alpha=1.0, seed=1))
    batches = []
    for b in L:
        batches.append(b)
        L.mix.record_logits(torch.randn(b.images.shape[0], 10))
    assert batches[0].boxes is None  # first batch of the epoch: history is empty
    assert all(b.boxes is not None and b.history_logits is not None for b in batches[1:] if b.lam.min() < 1)
    assert any((b.targets.max(1).values < 1).any() for b in batches[1:])  # soft, mixed targets
    L2 = loader(root, backend="memory", mix=CutMix(1.0, seed=1))
    assert any(b.boxes is not None for b in L2)


@pytest.mark.parametrize("backend", ["dali", "torch", "ffcv"])
def test_imagenet_presets(imagenet_shards, backend):
    L = loader(imagenet_shards, backend=backend, batch_size=6)
    b = next(iter(L))
    assert b.images.shape == (6, 3, 224, 224)
    E = loader(imagenet_shards, "val", backend=backend, batch_size=4)
    images, labels = zip(*[(b.images, b.labels) for b in E])
    images, labels = torch.cat(images), torch.cat(labels)
    assert images.shape == (9, 3, 224, 224)
    expected = torch.tensor([[20.0, 127.0, 234.0][l] for l in labels])
    assert (brightness(images, IMAGENET_MEAN, IMAGENET_STD, border=0) - expected).abs().max() < 15


def test_aug_plus_and_options(imagenet_shards):
    L = loader(imagenet_shards, backend="dali", batch_size=6, preset="imagenet_train_plus",
               channels_last=True, dtype="bf16")
    b = next(iter(L))
    assert b.images.dtype == torch.bfloat16 and b.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(b.images.float()).all()


def test_ascii_label_decoding():
    raw = torch.tensor([[51, 0, 0], [49, 50, 0], [57, 57, 57]], dtype=torch.uint8)
    assert decode_ascii_labels(raw).tolist() == [3, 12, 999]


def test_clear_errors(cifar_shards, tmp_path, monkeypatch):
    root, _ = cifar_shards
    with pytest.raises(ValueError, match="unknown backend 'tfdata'"):
        loader(root, backend="tfdata")
    with pytest.raises(ShardError, match="no manifest.json"):
        loader(tmp_path, backend="dali")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    victim = broken / "wds" / "train-000003.tar"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(ShardError, match="train-000003.tar"):
        loader(broken, backend="dali")
    victim.unlink()
    with pytest.raises(ShardError, match="missing shard .*train-000003.tar"):
        loader(broken, backend="torch")
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(ImportError, match="backend 'ffcv' needs the ffcv package"):
        loader(root, backend="ffcv")
    with pytest.raises(ValueError, match="CIFAR fast path"):
        loader(root, backend="memory", preset="imagenet_train")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["dali", "memory"])
def test_gpu_path_gives_cuda_batches(cifar_shards, backend):
    root, _ = cifar_shards
    L = loader(root, backend=backend, device="cuda", mix=RecursiveMix(seed=0))
    for b in L:
        assert b.images.is_cuda and b.targets.is_cuda and b.labels.is_cuda
        L.mix.record_logits(torch.zeros(b.images.shape[0], 10, device="cuda"))


def test_torch_backend_uneven_shards_still_give_equal_steps(cifar_shards):
    root, _ = cifar_shards  # 10 train shards over 3 ranks: 4 / 3 / 3 shards
    counts = [sum(1 for _ in loader(root, "train", "torch", batch_size=8, rank=r, world_size=3)) for r in range(3)]
    assert counts == [4, 4, 4]
