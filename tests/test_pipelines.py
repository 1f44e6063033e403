"""pipelines/: one batch contract for dali, memory, torch and ffcv, DDP splits, determinism, resume."""

import hashlib
import sys

import pytest
import torch

from conftest import label_value, write_cifar10, write_imagefolder
from pipelines import build_loader
from pipelines.loader import decode_ascii_labels
from pipelines.presets import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, get_preset
from rmix import CutMix, RecursiveMix
from shards.build import ShardParams, build
from shards.errors import ShardError
from shards.manifest import load_manifest

BACKENDS = ["dali", "memory", "torch", "ffcv"]
EXACT_RESUME = ["dali", "memory", "torch", "ffcv"]
# FFCV's JIT draws are seeded per batch only when FFCV runs single-threaded (pipelines/ffcv_loader.py)
SERIAL = {"ffcv": dict(num_workers=1)}


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
    kw = SERIAL.get(backend, {})
    a, b = loader(root, backend=backend, seed=3, **kw), loader(root, backend=backend, seed=3, **kw)
    ea = [x.images.clone() for x in a]
    eb = [x.images.clone() for x in b]
    assert len(ea) == len(eb) > 0 and all(torch.equal(x, y) for x, y in zip(ea, eb))
    ea2 = [x.labels.clone() for x in a]  # second pass = next epoch
    la = [x.labels for x in loader(root, backend=backend, seed=3, **kw)]
    assert any(not torch.equal(x, y) for x, y in zip(ea2, la))


@pytest.mark.parametrize("backend", EXACT_RESUME)
def test_mid_epoch_resume_is_exact_including_the_mix(cifar_shards, backend):
    root, _ = cifar_shards

    def make():
        return loader(root, backend=backend, seed=5, mix=RecursiveMix(alpha=1.0, box="sample", seed=9),
                      **SERIAL.get(backend, {}))

    def step(L, b):
        L.record_logits(b.images.mean((2, 3)).repeat(1, 4)[:, :10])  # logits depend on the batch

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
        L.record_logits(torch.randn(b.images.shape[0], 10))
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


def test_dali_host_crop_is_the_graph_and_resumes_exactly(imagenet_shards):
    """On a CPU DALI's ImageNet training graph stops after the fused crop decode and OpenCV resizes and
    flips (``host_crop``, the default there). Against the whole graph run on the CPU: the same samples,
    crops and flips, pixels within one grey level. Mid-epoch resume through DALI's checkpoint is exact
    on it, RecursiveMix included; a preset it cannot do is refused."""
    from pipelines.dali import DaliLoader

    manifest, preset = load_manifest(imagenet_shards), get_preset("imagenet_train", "imagenet", True)

    def dali(**kw):
        return DaliLoader(manifest, "train", batch_size=4, train=True, preset=preset, device="cpu",
                          num_workers=2, **kw)

    assert loader(imagenet_shards, batch_size=4).host_crop  # the CPU default
    host, graph = dali(seed=2, host_crop=True), dali(seed=2, host_crop=False)
    one_level = 1.0 / min(IMAGENET_STD) + 1e-4
    n = 0
    for a, b in zip(host, graph):
        assert torch.equal(a.labels, b.labels)
        assert a.images.shape == b.images.shape == (4, 3, 224, 224) and a.images.is_contiguous()
        assert (a.images - b.images).abs().max() <= one_level
        n += 1
    assert n == len(host) == 4

    def make():
        return loader(imagenet_shards, batch_size=4, seed=5, mix=RecursiveMix(alpha=1.0, box="sample", seed=9))

    full = []
    ref = make()
    for b in ref:
        full.append((b.images.clone(), b.targets.clone()))
        ref.record_logits(b.images.mean((2, 3)))
    run = make()
    it = iter(run)
    for _ in range(2):
        run.record_logits(next(it).images.mean((2, 3)))
    state = run.state_dict()
    del it, run
    resumed = make()
    resumed.load_state_dict(state)
    rest = [(b.images.clone(), b.targets.clone()) for b in resumed]
    assert len(rest) == len(full) - 2
    assert all(torch.equal(i1, i2) and torch.equal(t1, t2) for (i1, t1), (i2, t2) in zip(full[2:], rest))
    with pytest.raises(ValueError, match="host_crop needs an ImageNet training preset"):
        DaliLoader(manifest, "train", batch_size=4, train=True, host_crop=True,
                   preset=get_preset("imagenet_train_plus", "imagenet", True))


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
    assert L.device == torch.device("cuda", torch.cuda.current_device())  # bare 'cuda' gets its index
    if backend == "dali":
        assert L._device_id == torch.cuda.current_device()  # a GPU graph, not device_id=None
    for b in L:
        assert b.images.is_cuda and b.targets.is_cuda and b.labels.is_cuda
        L.record_logits(torch.zeros(b.images.shape[0], 10, device="cuda"))


@pytest.mark.gpu
def test_memory_loader_on_cuda_gives_the_cpu_batches(cifar_shards):
    """The GPU is one switch away: the memory path with RecursiveMix gives the same batches, targets, boxes and lams
    on CUDA (torch crop, the mix's own paste) as on the CPU (the fused crop kernel), bit for bit (seen on an H200
    with 50,000 photograph crops, batch 512)."""
    root, _ = cifar_shards

    def run(device):
        L = loader(root, backend="memory", device=device, seed=1, mix=RecursiveMix(alpha=1.0, seed=3))
        out = []
        for b in L:
            out.append((b.images.cpu(), b.targets.cpu(), None if b.boxes is None else b.boxes.cpu(), b.lam.cpu()))
            L.record_logits(torch.zeros(b.images.shape[0], 10, device=b.images.device))
        return out

    cpu, gpu = run("cpu"), run("cuda")
    assert len(cpu) == len(gpu) >= 3 and any(b[2] is not None for b in cpu)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
        assert (a[2] is None and b[2] is None) or torch.equal(a[2], b[2])


def test_dali_split_smaller_than_the_ranks_is_one_line(cifar_shards):
    root, _ = cifar_shards  # 30 val samples
    with pytest.raises(ValueError, match=r"split 'val': 30 sample\(s\) for 40 ranks.*at most 30 ranks") as e:
        loader(root, "val", "dali", rank=0, world_size=40)
    assert "\n" not in str(e.value)


def test_torch_backend_uneven_shards_still_give_equal_steps(cifar_shards):
    root, _ = cifar_shards  # 10 train shards over 3 ranks: 4 / 3 / 3 shards
    counts = [sum(1 for _ in loader(root, "train", "torch", batch_size=8, rank=r, world_size=3)) for r in range(3)]
    assert counts == [4, 4, 4]


# -- issue 8: structure and defects -------------------------------------------------------------

def test_dali_graph_is_the_module_level_factory(cifar_shards, monkeypatch):
    """The loader builds its graph with pipelines.dali.wds_pipeline (a @pipeline_def factory, reader
    named 'reader'), and the factory alone reads our shards back exactly."""
    import numpy as np
    from shards.manifest import load_manifest

    import pipelines.dali as dali

    root, arrays = cifar_shards
    m = load_manifest(root)
    shards = m["splits"]["train"]["wds"]["shards"]
    pipe = dali.wds_pipeline(files=[f"{m['root']}/{s['tar']}" for s in shards],
                             index_files=[f"{m['root']}/{s['idx']}" for s in shards], ext="png", preset=None,
                             batch_size=16, num_threads=1, device_id=None, seed=0)
    pipe.build()
    n = pipe.reader_meta("reader")["epoch_size"]
    assert n == 100
    seen = []
    while len(seen) < n:
        imgs, cls = pipe.run()
        labels = decode_ascii_labels(torch.from_numpy(np.stack([np.array(cls.at(j)) for j in range(len(cls))])))
        seen += [(np.array(imgs.at(j)).tobytes(), int(labels[j])) for j in range(len(imgs))]
    src = sorted((im.tobytes(), int(l)) for im, l in zip(*arrays["train"]))
    assert sorted(seen[:n]) == src

    calls = []
    real = dali.wds_pipeline

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    monkeypatch.setattr(dali, "wds_pipeline", spy)
    L = loader(root, backend="dali", seed=4, rank=1, world_size=2)
    assert len(calls) == 1 and calls[0]["shard_id"] == 1 and calls[0]["num_shards"] == 2
    assert calls[0]["preset"] is L.preset and calls[0]["device_id"] is None and calls[0]["gpu"] is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_seed_comes_from_derive_seed(cifar_shards, backend, monkeypatch):
    """One seed rule: each backend's random streams are pipelines.seeds.derive_seed(seed, rank, epoch,
    stream[, index]); no formula of its own."""
    import importlib

    from pipelines.seeds import derive_rng, derive_seed

    module = importlib.import_module({"dali": "pipelines.dali", "memory": "pipelines.memory",
                                      "torch": "pipelines.torch_wds", "ffcv": "pipelines.ffcv_loader"}[backend])
    calls = []

    def spy(seed, rank=0, epoch=0, stream="augment", index=0):
        calls.append((seed, rank, epoch, stream))
        return derive_seed(seed, rank, epoch, stream, index)

    monkeypatch.setattr(module, "derive_seed", spy)
    L = loader(root=cifar_shards[0], backend=backend, seed=11, batch_size=8)
    L.set_epoch(2)
    first = next(iter(L))
    streams = {c[3] for c in calls}
    expected = {"dali": {"reader"}, "memory": {"reader", "augment"}, "torch": {"reader", "shuffle", "workers"},
                "ffcv": {"reader", "augment"}}[backend]
    assert streams == expected and all(c[0] == 11 for c in calls)
    # the order streams are rank-independent where every rank must agree (memory, torch, ffcv)
    assert all(c[1] == 0 for c in calls if c[3] == "reader")
    # the lighting stream of the base loader is the same rule
    assert L._lighting_rng.bit_generator.state == derive_rng(11, 0, 0, "lighting").bit_generator.state
    if backend == "memory":  # the epoch's order is exactly the derived permutation
        perm = torch.randperm(100, generator=torch.Generator().manual_seed(derive_seed(11, 0, 2, "reader")))
        assert first.labels.tolist() == L.labels[perm[:8]].tolist()


def test_device_resolution_and_dali_device_id(monkeypatch):
    """A bare 'cuda' is the current CUDA device everywhere (DALI gets device_id=N, not None); device
    strings are validated. CPU test: CUDA is faked."""
    from pipelines.dali import dali_device_id
    from pipelines.loader import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert dali_device_id(resolve_device("cuda")) == 1
    assert dali_device_id(resolve_device("cuda:0")) == 0
    assert dali_device_id(resolve_device("cpu")) is None
    with pytest.raises(ValueError, match="indexed CUDA device"):
        dali_device_id(torch.device("cuda"))
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\)"):
        resolve_device("cuda:2")
    for bad in ("banana", "cuda:", "CUDA", "cuda:0 ", "gpu", "mps", "cpu:0"):
        with pytest.raises(ValueError, match=r"device must be auto, cpu, cuda or cuda:N") as e:
            resolve_device(bad)
        assert "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for want in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(want)


def test_batch_color_jitter_is_torchvision_colorjitter_on_uint8():
    import numpy as np
    from torchvision.transforms import functional as TF

    from pipelines.ffcv_loader import batch_color_jitter, color_jitter_factors
    from pipelines.seeds import derive_rng

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 9, 7), dtype=torch.uint8, generator=g)
    factors = color_jitter_factors(derive_rng(0, 0, 0, "augment", 1), 6, 0.4)
    assert factors.shape == (6, 3) and factors.min() >= 0.6 and factors.max() <= 1.4
    out = batch_color_jitter(images.contiguous(memory_format=torch.channels_last), factors)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for x, y, (b, c, s) in zip(images, out, factors):
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, float(b)), float(c)), float(s))
        assert torch.equal(y, ref)
    assert not torch.equal(out, images)
    np.testing.assert_array_equal(color_jitter_factors(derive_rng(0, 0, 0, "augment", 1), 6, 0.4), factors)


def test_ffcv_applies_aug_plus_colour_jitter(imagenet_shards, monkeypatch):
    """aug_plus on FFCV: ColorJitter 0.4 after FFCV on the uint8 batch, from the derive_rng stream of
    (seed, rank, epoch, batch); eval never jitters."""
    import pipelines.ffcv_loader as fl
    from pipelines.seeds import derive_rng

    seen = []
    real = fl.batch_color_jitter

    def spy(images, factors):
        assert images.dtype == torch.uint8  # before normalisation
        seen.append(factors)
        return real(images, factors)

    monkeypatch.setattr(fl, "batch_color_jitter", spy)
    L = loader(imagenet_shards, backend="ffcv", batch_size=6, preset="imagenet_train_plus", seed=2)
    L.set_epoch(1)
    batches = list(L)
    assert len(seen) == len(batches) == len(L) == 3
    for b, factors in enumerate(seen):
        assert (factors == fl.color_jitter_factors(derive_rng(2, 0, 1, "augment", b), 6, 0.4)).all()
    plain = loader(imagenet_shards, backend="ffcv", batch_size=6, preset="imagenet_train", seed=2)
    list(plain)
    E = loader(imagenet_shards, "val", backend="ffcv", batch_size=4)
    list(E)
    assert len(seen) == 3


def _damaged_copy(root, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    return copy


def _member_offsets(idx_path):
    """(header offset, name) of every member an .idx lists."""
    out = []
    for line in idx_path.read_text().splitlines()[1:]:
        f = line.split()
        out += [(int(f[g + 1]) - 512, f[g + 3]) for g in range(0, len(f), 4)]
    return out


def _poke(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("backend", ["dali", "memory", "torch"])
def test_damaged_tar_header_of_the_right_size_fails_at_start(cifar_shards, tmp_path, backend):
    """A tar whose bytes are damaged but whose size is right: one ShardError line at build time
    (DALI reads by .idx offsets and never sees the header; tarfile stops quietly at it)."""
    copy = _damaged_copy(cifar_shards[0], tmp_path)
    tar = copy / "wds" / "train-000003.tar"
    header, name = _member_offsets(copy / "wds" / "train-000003.idx")[3]
    size = tar.stat().st_size
    _poke(tar, header + 2, b"X")  # inside the member name: the header checksum no longer matches
    assert tar.stat().st_size == size
    with pytest.raises(ShardError, match=r"train-000003\.tar: damaged tar header of member") as e:
        loader(copy, backend=backend)
    assert "\n" not in str(e.value) and "rmix verify" in str(e.value)


@pytest.mark.parametrize("backend", ["dali", "memory", "torch"])
def test_damaged_index_fails_at_start(cifar_shards, tmp_path, backend):
    copy = _damaged_copy(cifar_shards[0], tmp_path)
    idx = copy / "wds" / "val-000001.idx"
    text = idx.read_text()
    line = text.splitlines()[2]
    idx.write_text(text.replace(line, line.replace(" 512 ", " 513 ", 1) if " 512 " in line
                                else line[:-1] + ("0" if line[-1] != "0" else "1"), 1))
    with pytest.raises(ShardError, match=r"corrupt DALI index .*val-000001\.idx"):
        loader(copy, "val", backend=backend)
    idx.unlink()
    with pytest.raises(ShardError, match=r"missing DALI index .*val-000001\.idx") as e:
        loader(copy, "val", backend=backend)
    assert "\n" not in str(e.value)


def test_damaged_index_offsets_against_tar_headers(cifar_shards, tmp_path):
    """An .idx whose offsets point elsewhere in its tar (a manifest without idx checksums): the tar
    header check still catches it before DALI reads wrong bytes."""
    import json

    copy = _damaged_copy(cifar_shards[0], tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    for s in manifest["splits"]["train"]["wds"]["shards"]:
        s.pop("idx_sha256")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    idx = copy / "wds" / "train-000002.idx"
    lines = idx.read_text().splitlines()
    a, b = lines[3].split(), lines[4].split()
    a[1], b[1] = b[1], a[1]  # two samples' .cls offsets swapped: DALI would read the wrong labels
    lines[3], lines[4] = " ".join(a), " ".join(b)
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardError, match=r"train-000002\.tar: the tar header at byte \d+ is"):
        loader(copy, backend="dali")


def test_torch_worker_errors_come_back_as_one_line(cifar_shards, tmp_path, monkeypatch):
    """A read error inside a DataLoader worker (start check bypassed): one ShardError line naming the
    shard, not a worker traceback."""
    import pipelines.torch_wds as tw

    copy = _damaged_copy(cifar_shards[0], tmp_path)
    monkeypatch.setattr(tw, "check_wds_split", lambda *a, **k: None)
    tar = copy / "wds" / "val-000000.tar"
    _poke(tar, 100, b"\xff" * 8)  # the first member's mode field: tarfile cannot open the stream
    L = loader(copy, "val", backend="torch", batch_size=4, num_workers=2)
    with pytest.raises(ShardError, match=r"val-000000\.tar") as e:
        list(L)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_corrupt_ffcv_metadata_is_one_line_before_ffcv_allocates(cifar_shards, tmp_path):
    import numpy as np
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import FieldDescType, HeaderType, get_metadata_type

    copy = _damaged_copy(cifar_shards[0], tmp_path)
    beton = copy / "ffcv" / "val.beton"
    original = beton.read_bytes()
    meta_type = get_metadata_type([RGBImageField(), IntField()])
    meta_at = HeaderType.itemsize + 2 * FieldDescType.itemsize
    image = meta_type.fields[meta_type.names[0]]
    width_at = meta_at + 5 * meta_type.itemsize + image[1] + image[0].fields["width"][1]
    cases = [
        (width_at, np.array([65535], "<u2").tobytes(), r"sample 5 is 65535x32 px"),  # 192 GiB territory
        (HeaderType.fields["num_samples"][1], np.array([31], "<u8").tobytes(), r"header says 31 samples, manifest says 30"),
        (HeaderType.itemsize, bytes([1]), r"fields image:IntField"),
        (HeaderType.fields["version"][1], np.array([7], "<u2").tobytes(), "format version 7"),
    ]
    for offset, data, message in cases:
        beton.write_bytes(original)
        _poke(beton, offset, data)
        with pytest.raises(ShardError, match=rf"corrupt FFCV beton .*val\.beton: {message}") as e:
            loader(copy, "val", backend="ffcv")
        assert "\n" not in str(e.value)


def _uint8_digests(images, mean, std):
    x = (images.float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1))
    return [hashlib.sha1(v.round().clamp(0, 255).to(torch.uint8).numpy().tobytes()).hexdigest() for v in x]


@pytest.mark.parametrize("world_size", [1, 2])
def test_same_model_same_val_accuracy_through_every_backend(cifar_shards, world_size):
    """Issue 8 item 12: the same model evaluated through dali, memory, torch and ffcv on the same val
    split sees the same multiset of (image, label) pairs, exactly once across ranks, and scores the
    same accuracy (a one-epoch Acc@5 gap between backends came from training, not evaluation)."""
    root, arrays = cifar_shards
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    src = sorted(zip(_uint8_digests((torch.from_numpy(arrays["val"][0]).permute(0, 3, 1, 2).float()
                                      - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1),
                                     CIFAR_MEAN, CIFAR_STD), arrays["val"][1].tolist()))
    results = {}
    for backend in BACKENDS:
        pairs, correct = [], torch.zeros(2, dtype=torch.int64)
        for rank in range(world_size):
            for b in loader(root, "val", backend, batch_size=8, rank=rank, world_size=world_size):
                assert b.images.dtype == torch.float32 and b.labels.dtype == torch.int64
                pairs += zip(_uint8_digests(b.images, CIFAR_MEAN, CIFAR_STD), b.labels.tolist())
                with torch.no_grad():
                    top5 = model(b.images).topk(5, 1).indices
                correct += torch.stack([(top5[:, 0] == b.labels).sum(), (top5 == b.labels[:, None]).any(1).sum()])
        assert sorted(pairs) == src, backend  # every val sample exactly once, same pixels, same label
        results[backend] = correct.tolist()
    assert len(set(map(tuple, results.values()))) == 1, results


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_are_fresh_tensors_and_record_logits_feeds_the_mix(cifar_shards, backend):
    root, _ = cifar_shards
    L = loader(root, backend=backend, mix=RecursiveMix(alpha=1.0, box="sample", seed=3))
    kept, copies, with_history = [], [], []
    for b in L:
        kept.append((b.images, b.labels, b.targets))
        copies.append((b.images.clone(), b.labels.clone(), b.targets.clone()))
        logits = torch.full((b.images.shape[0], 10), float(len(kept)))
        L.record_logits(logits)
        if b.history_logits is not None:  # the history's logits are what record_logits got last
            assert torch.equal(b.history_logits, torch.full_like(b.history_logits, len(kept) - 1))
            with_history.append(len(kept))
    assert with_history and L.mix.uses_logits
    for (i, l, t), (ic, lc, tc) in zip(kept, copies):
        assert torch.equal(i, ic) and torch.equal(l, lc) and torch.equal(t, tc)
    assert len({i.data_ptr() for i, _, _ in kept}) == len(kept)
    assert len({l.data_ptr() for _, l, _ in kept}) == len(kept)


# -- issue 11: every torch worker busy whatever the shard count; the CPU normalisation of torch/ffcv ----

@pytest.fixture(scope="module")
def cifar_one_shard(tmp_path_factory):
    """The same kind of set in one shard per split (the default 1 GB shard size on a small set)."""
    tmp = tmp_path_factory.mktemp("cifar1")
    src, arrays = write_cifar10(tmp / "src", per_batch=20, test=30)  # 100 train, 30 val
    build(ShardParams(dataset="cifar10", samples_per_shard=1000), src, tmp / "out", workers=2, progress=False)
    return tmp / "out" / "cifar10", arrays


class _PidRecorder:
    """Wraps the workers' transform and appends the pid of the process that ran it to a file."""

    def __init__(self, inner, path):
        self.inner, self.path = inner, path

    def __call__(self, image):
        import os
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self.inner(image)


def _record_worker_pids(monkeypatch, path):
    import pipelines.torch_wds as tw

    original = tw.torchvision_transform
    monkeypatch.setattr(tw, "torchvision_transform", lambda preset, to_tensor=True: _PidRecorder(
        original(preset, to_tensor), path))
    return lambda: [int(p) for p in path.read_text().split()]


@pytest.mark.parametrize("split", ["train", "val"])
def test_torch_one_shard_keeps_every_worker_busy_with_the_same_batches(cifar_one_shard, tmp_path, monkeypatch, split):
    """One shard, two workers: both workers decode (each its own batches, each sample once), and the
    batches are exactly those of one worker reading alone (augmentation is seeded per batch)."""
    import os

    root, arrays = cifar_one_shard
    pids = _record_worker_pids(monkeypatch, tmp_path / "pids")
    two = [(b.images.clone(), b.labels.clone())
           for b in loader(root, split, "torch", batch_size=8, num_workers=2, seed=4)]
    decoded = pids()
    assert len(set(decoded)) == 2 and os.getpid() not in decoded
    n = len(arrays[split][1])
    assert len(decoded) == (n // 8) * 8 if split == "train" else n  # no sample decoded twice, none skipped after
    one = [(b.images.clone(), b.labels.clone())
           for b in loader(root, split, "torch", batch_size=8, num_workers=1, seed=4)]
    assert len(two) == len(one) == len(loader(root, split, "torch", batch_size=8))
    for (i2, l2), (i1, l1) in zip(two, one):
        assert torch.equal(i2, i1) and torch.equal(l2, l1)
    if split == "val":  # every sample exactly once, the last batch partial
        assert sorted(torch.cat([l for _, l in two]).tolist()) == sorted(arrays["val"][1].tolist())
        assert [i.shape[0] for i, _ in two] == [8, 8, 8, 6]


def test_torch_many_shards_give_each_worker_its_own_shards(cifar_shards, tmp_path, monkeypatch):
    """Ten shards, two workers (training): each worker reads only its own shards -- both decode, and
    their label sets come from disjoint shards -- and the rank still takes len() full batches."""
    from pipelines.torch_wds import _RankStream

    root, _ = cifar_shards
    pids = _record_worker_pids(monkeypatch, tmp_path / "pids")
    L = loader(root, "train", "torch", batch_size=8, num_workers=2, seed=1)
    stream = L._stream
    stream.set_pass(0, 0)
    own = stream.worker_shards(int(stream.state[1]), 2)
    assert own is not None and not set(own[0]) & set(own[1]) and sorted(own[0] + own[1]) == list(range(10))
    batches = [b.images.shape[0] for b in L]
    assert batches == [8] * len(L) and len(set(pids())) == 2
    # a rank whose shards cannot be shared evenly among its workers reads them all (sample split)
    assert _RankStream.worker_shards(stream, int(stream.state[1]), 3) is None  # 10 shards: 4/3/3 is uneven


@pytest.mark.parametrize("fixture", ["cifar_one_shard", "cifar_shards"])
def test_torch_resume_is_exact_in_both_splits_and_skips_without_decoding(fixture, request, tmp_path, monkeypatch):
    """Mid-epoch resume, sample split (one shard) and shard split (ten): the rest of the epoch is the
    same batches, and the workers skip the batches already seen without decoding them."""
    root, _ = request.getfixturevalue(fixture)
    full = [(b.images.clone(), b.labels.clone()) for b in loader(root, "train", "torch", batch_size=8, seed=6)]
    L = loader(root, "train", "torch", batch_size=8, seed=6)
    it = iter(L)
    for _ in range(5):
        next(it)
    state = L.state_dict()
    del it, L
    pids = _record_worker_pids(monkeypatch, tmp_path / "pids")
    resumed = loader(root, "train", "torch", batch_size=8, seed=6)
    resumed.load_state_dict(state)
    rest = [(b.images.clone(), b.labels.clone()) for b in resumed]
    assert len(rest) == len(full) - 5 and len(pids()) == 8 * len(rest)
    for (i1, l1), (i2, l2) in zip(full[5:], rest):
        assert torch.equal(i1, i2) and torch.equal(l1, l2)


def test_torch_workers_persist_across_epochs(cifar_shards):
    root, _ = cifar_shards
    L = loader(root, "train", "torch", batch_size=8)
    first = [b.labels.clone() for b in L]
    workers = L._loader._iterator._workers
    second = [b.labels.clone() for b in L]
    assert L._loader._iterator._workers is workers and all(w.is_alive() for w in workers)
    assert len(first) == len(second) and any(not torch.equal(a, b) for a, b in zip(first, second))


def test_torch_train_needs_a_shard_per_rank(cifar_one_shard):
    with pytest.raises(ValueError, match=r"1 webdataset shard\(s\) for 2 ranks"):
        loader(cifar_one_shard[0], "train", "torch", rank=1, world_size=2)
    # eval still reads every sample exactly once: rank 1 simply has none
    lens = [len(loader(cifar_one_shard[0], "val", "torch", rank=r, world_size=2, batch_size=8)) for r in (0, 1)]
    assert lens == [4, 0]


@pytest.mark.parametrize("numba_available", [True, False])
def test_normalise_is_loader_finish_bit_for_bit_and_fresh(monkeypatch, numba_available):
    import pipelines.normalise as nm

    if not numba_available:
        monkeypatch.setattr(nm, "numba", None)
    norm = nm.Normalise(IMAGENET_MEAN, IMAGENET_STD)
    g = torch.Generator().manual_seed(0)
    hwc = torch.randint(0, 256, (5, 17, 9, 3), dtype=torch.uint8, generator=g)
    images = hwc.permute(0, 3, 1, 2)  # FFCV's channels-last view
    ref = (images.float() - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = norm(images)
    assert out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, ref)
    assert norm(images).data_ptr() != out.data_ptr()
    # contiguous NCHW rows (the vectorised loop), every level in every channel
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(2, 3, 5, 256).contiguous()
    want = (levels.float() - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(norm(levels), want)
    # channels last in blocks of rows: several blocks per image with a short last one, one row wider than a
    # block, every level in every channel
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for shape in [(3, 30, 300, 3), (1, 2, 4100, 3)]:
        view = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
        assert torch.equal(norm(view), (view.float() - mean) / std)
    last = levels.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not last.is_contiguous() and torch.equal(norm(last), want)
    with pytest.raises(ValueError, match="uint8"):
        norm(images.float())


def test_fresh_empty_maps_large_batches_and_frees_them(monkeypatch):
    import gc

    import pipelines.normalise as nm

    monkeypatch.setattr(nm, "HUGE_BATCH_BYTES", 1 << 20)
    big = nm.fresh_empty((4, 3, 256, 256))  # 3 MiB: a mapping of its own
    small = nm.fresh_empty((4, 3, 8, 8))
    assert big.shape == (4, 3, 256, 256) and big.dtype == torch.float32 and small.shape == (4, 3, 8, 8)
    big.fill_(2.0)
    gc.collect()
    assert float(big.sum()) == 2.0 * big.numel()  # the tensor keeps its mapping alive
    other = nm.fresh_empty((4, 3, 256, 256))
    assert other.data_ptr() != big.data_ptr()


def test_ffcv_leaves_the_callers_torch_threads_alone(cifar_shards):
    """FFCV sets torch's intra-op threads to its worker count on import, on building its Loader and at every
    iter(); our backend gives the caller its own count back each time."""
    root, _ = cifar_shards
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        L = loader(root, "train", "ffcv", num_workers=1)
        assert torch.get_num_threads() == 3
        seen = []
        for _ in range(2):  # two epochs: two iter() calls
            for b in L:
                seen.append(torch.get_num_threads())
        assert seen and set(seen) == {3}
    finally:
        torch.set_num_threads(threads)


def test_ffcv_cpu_batches_are_normalised_in_the_loader(cifar_shards, monkeypatch):
    """On the CPU the FFCV backend yields float32 already normalised (one pass from FFCV's uint8
    view), so Loader._finish passes it through; the pixels are the exact normalisation."""
    import pipelines.ffcv_loader as fl

    calls = []
    original = fl.Normalise.__call__

    def spy(self, images):
        calls.append(images.dtype)
        return original(self, images)

    monkeypatch.setattr(fl.Normalise, "__call__", spy)
    L = loader(cifar_shards[0], "val", "ffcv", batch_size=8)
    images = torch.cat([b.images for b in L])
    assert calls and set(calls) == {torch.uint8}
    arrays = cifar_shards[1]
    src = torch.from_numpy(arrays["val"][0]).permute(0, 3, 1, 2).float()
    ref = (src - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert sorted(digest(images)) == sorted(digest(ref))  # bit for bit, not rounded


def test_ffcv_os_cache_when_the_beton_fits(tmp_path, monkeypatch):
    import os

    from pipelines.ffcv_loader import os_cache_fits

    beton = tmp_path / "x.beton"
    beton.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 4}[name])
    assert os_cache_fits(str(beton))
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 3}[name])
    assert not os_cache_fits(str(beton))


@pytest.mark.parametrize("backend, expected", [("dali", 1), ("memory", None)])
def test_work_after_the_iterator_runs_single_threaded_beside_a_parallel_decoder(cifar_shards, backend, expected):
    """On the CPU the mix runs on one thread while DALI/FFCV/torch workers decode (no contention for the
    same cores); the memory path has no decoder beside it and keeps every thread. The trainer always
    gets its own thread count back."""
    from rmix import NoMix

    root, _ = cifar_shards
    seen = []

    class Spy(NoMix):
        def _mix(self, images, targets):
            seen.append(torch.get_num_threads())
            return super()._mix(images, targets)

    before = torch.get_num_threads()
    L = loader(root, backend=backend, mix=Spy(num_classes=10))
    for _ in L:
        assert torch.get_num_threads() == before
    assert seen and set(seen) == {expected or before}


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("size,pad", [((32, 32), 4), ((24, 40), 4), ((32, 32), 40)])
def test_memory_fused_select_crop_flip_equals_the_torch_ops(flip, size, pad):
    """The memory path's one-pass CPU kernel is select + pad + crop + flip in torch, bit for bit (non-square
    images, and a pad wider than the image: whole rows and columns of padding)."""
    from pipelines.memory import batch_crop_flip, select_crop_flip

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (300, 3, *size), dtype=torch.uint8, generator=g)
    sel = torch.randperm(300, generator=g)[:128]
    for seed in range(3):
        want = batch_crop_flip(images.index_select(0, sel), pad, torch.Generator().manual_seed(seed), flip)
        got = select_crop_flip(images, sel, pad, torch.Generator().manual_seed(seed), flip)
        assert torch.equal(got, want)
    assert not torch.equal(got, images.index_select(0, sel))  # it did crop or flip


@pytest.mark.parametrize("shuffles", [True, False])
@pytest.mark.parametrize("history_size", [(32, 32), (24, 40), (5, 3)])
def test_memory_crop_copies_a_planned_paste_as_the_mix_would(history_size, shuffles, monkeypatch):
    """The crop kernel's fused paste equals the torch crop followed by the plan's own paste (paste_one_box),
    bit for bit: random boxes (zero area, touching every edge, 1 pixel wide), a history of another size than
    the batch, fewer history rows than samples, rows entirely of zero padding (pad 40); boxes at least 16
    wide with byte shuffles and without them (a CPU without SSSE3), narrower ones row by row."""
    import numpy as np
    from pipelines.memory import batch_crop_flip, fuses_paste, select_crop_flip
    from rmix import byte_shuffle
    from rmix.boxes import PastePlan

    shuffled = []
    if shuffles:
        assert byte_shuffle.AVAILABLE  # the Makefile installs numba: on this CPU the shuffles must run
        inside_plan = byte_shuffle.inside_plan
        monkeypatch.setattr(byte_shuffle, "inside_plan", lambda *a: shuffled.append(inside_plan(*a)) or shuffled[-1])
    else:
        monkeypatch.setattr(byte_shuffle, "AVAILABLE", False)
    g = torch.Generator().manual_seed(2)
    rng = np.random.default_rng(2)
    images = torch.randint(0, 256, (60, 3, 32, 32), dtype=torch.uint8, generator=g)
    assert fuses_paste(images)  # else this would compare the reference with itself
    pasted = 0
    for t in range(60):
        sel = torch.randperm(60, generator=g)[: int(rng.integers(1, 50))]
        history = torch.randint(0, 256, (int(rng.integers(1, 40)), 3, *history_size), dtype=torch.uint8, generator=g)
        x1, x2 = sorted(int(v) for v in rng.integers(0, 33, 2))
        y1, y2 = sorted(int(v) for v in rng.integers(0, 33, 2))
        plan = PastePlan.nearest((x1, y1, x2, y2), history, sel.shape[0])
        pad = 40 if t % 5 == 0 else 4
        want = batch_crop_flip(images.index_select(0, sel), pad, torch.Generator().manual_seed(t))
        plan.apply(want)
        got = select_crop_flip(images, sel, pad, torch.Generator().manual_seed(t), paste=plan)
        assert torch.equal(got, want), (t, plan.box)
        pasted += (x2 - x1) * (y2 - y1) > 0
    assert pasted > 40
    if shuffles and history_size[1] >= 16:  # some boxes went by shuffles, others row by row
        assert 5 < sum(p is not None for p in shuffled) < pasted
    # a float dataset tensor pastes element by element (the shuffles move bytes): a box as wide as the image
    floats, history = images.float() / 255, torch.rand(8, 3, *history_size, generator=g)
    sel = torch.arange(8)
    plan = PastePlan.nearest((0, 3, 32, 29), history, 8)
    want = batch_crop_flip(floats.index_select(0, sel), 4, torch.Generator().manual_seed(0))
    plan.apply(want)
    assert torch.equal(select_crop_flip(floats, sel, 4, torch.Generator().manual_seed(0), paste=plan), want)


def test_memory_loader_fuses_the_paste_and_gives_the_unfused_batches(cifar_shards, monkeypatch):
    """RecursiveMix on the memory path: the crop kernel copies the paste (the mix only plans it), and the batches,
    targets, boxes and lams are those of the plain route (torch crop, then the mix's own paste), bit for bit;
    a resume in the middle of the epoch gives the same rest."""
    import pipelines.memory as memory

    root, _ = cifar_shards

    def run(start_state=None):
        mix = RecursiveMix(alpha=1.0, seed=9)
        plans = []
        plan_paste = mix.plan_paste
        mix.plan_paste = lambda *a: plans.append(plan_paste(*a)) or plans[-1]
        L = loader(root, backend="memory", seed=5, mix=mix)
        if start_state is not None:
            L.load_state_dict(start_state)
        out, states = [], []
        for b in L:
            out.append((b.images.clone(), b.targets.clone(), b.boxes, b.lam.clone(), b.history_logits))
            L.record_logits(b.images.mean((2, 3)).repeat(1, 4)[:, :10])
            states.append(L.state_dict())
        return out, states, [p for p in plans if p is not None]

    fused, states, plans = run()
    assert len(fused) >= 4 and len(plans) == len(fused) - 1  # every batch after the first was planned
    monkeypatch.setattr(memory, "fuses_paste", lambda images: False)
    plain, _, no_plans = run()
    assert no_plans == []
    for a, b in zip(fused, plain):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
        assert (a[2] is None and b[2] is None) or torch.equal(a[2], b[2])
        assert (a[4] is None and b[4] is None) or torch.equal(a[4], b[4])
    assert any(b[2] is not None for b in fused)
    monkeypatch.undo()
    rest, _, _ = run(states[1])
    assert len(rest) == len(fused) - 2
    for a, b in zip(fused[2:], rest):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_forked_child_never_shuts_down_the_parents_dali_pipelines(cifar_shards):
    """A DALI loader that is garbage only through a reference cycle, then a fork (as a DataLoader starting its
    workers does): the child's garbage collector finalises the inherited pipeline. DALI's Shutdown would join
    executor threads that do not exist in the child (SIGSEGV); ours leaves them alone and the child exits 0."""
    import gc
    import os
    import signal
    import time

    root, _ = cifar_shards
    L = loader(root, backend="dali")
    next(iter(L))
    cycle = [L]
    cycle.append(cycle)
    del L, cycle
    gc.disable()  # the cycle must survive until the child collects it
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            gc.collect()
            os._exit(0)
    finally:
        gc.enable()
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child hung finalising the parent's DALI pipeline")
    status = done[1]
    assert not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV), "the child crashed in DALI"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    gc.collect()  # and the parent still shuts its own pipeline down cleanly


def test_ffcv_random_resized_crop_is_seeded_and_resumes_exactly(imagenet_shards):
    """The decoder's own draws (RandomResizedCrop), then the flip: two runs of the same seed give the same
    pixels, and a run resumed after batch 1 gives the rest of them (FFCV single-threaded)."""
    def make(seed=2):
        return loader(imagenet_shards, backend="ffcv", batch_size=6, seed=seed, num_workers=1)

    first = [b.images.clone() for b in make()]
    assert len(first) == 3 and all(torch.equal(x, y) for x, y in zip(first, [b.images for b in make()]))
    run = make()
    it = iter(run)
    next(it)
    state = run.state_dict()
    del it, run
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b.images.clone() for b in resumed]
    assert len(rest) == 2 and all(torch.equal(x, y) for x, y in zip(first[1:], rest))
    other = [b.images for b in make(seed=3)]
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


# -- rmix bench loaders: what it prints and draws ---------------------------------------------------------

def _bench_rows():
    """Rows as tools.bench.loaders.run records them: 3 repeats each, ours and the anchors."""
    from tools.bench.loaders import ANCHOR_FFCV, ANCHOR_TV, DECODE

    def row(dataset, backend, mix, kind, walls):
        return dict(dataset=dataset, backend=backend, mix=mix, kind=kind, images=1000, s_median=sorted(walls)[1],
                    walls=walls, cpus=[2 * w for w in walls], img_per_s=1000 / sorted(walls)[1],
                    img_per_cpu_s=500 / sorted(walls)[1], device="cpu")

    rows = [row("imagenet", DECODE, "-", "reference", [0.5, 0.52, 0.55]),
            row("imagenet", ANCHOR_TV, "-", "anchor", [4.0, 4.2, 4.4]),
            row("imagenet", ANCHOR_FFCV, "-", "anchor", [2.0, 2.1, 2.3])]
    for i, backend in enumerate(("dali", "ffcv", "torch")):
        for j, mix in enumerate(("off", "recursive_mix", "cutmix")):
            rows.append(row("imagenet", backend, mix, "ours", [1.0 + i + 0.1 * j, 1.05 + i + 0.1 * j, 1.1 + i + 0.1 * j]))
    return rows


def test_bench_loaders_prints_measurements_with_their_spread_and_anchor_not_goals():
    from tools.bench.loaders import summary

    lines = summary(_bench_rows())
    text = "\n".join(lines)
    assert "goal" not in text
    line = next(ln for ln in lines if ln.startswith("imagenet dali vs torchvision DataLoader: "))
    # ours and the anchor, each median (min-max over the repeats), then the ratio and its verdict
    assert line.startswith("imagenet dali vs torchvision DataLoader: 952 img/s (909-1,000) vs 238 img/s (227-250) = "
                           "4.000x (faster; spread +-"), line
    assert any(ln.startswith("imagenet ffcv vs FFCV direct: ") for ln in lines)
    rm = next(ln for ln in lines if ln.startswith("imagenet dali: RecursiveMix "))
    assert "vs mix off 952 img/s (909-1,000)" in rm and "per round" in rm


def test_bench_loaders_plot_labels_do_not_overlap(tmp_path, monkeypatch):
    import matplotlib
    from matplotlib.figure import Figure

    from tools.bench.loaders import plot

    matplotlib.use("Agg")
    drawn = []  # each axes' x tick label boxes, as drawn into the PNG

    def save(self, *a, **k):
        Figure_savefig(self, *a, **k)
        renderer = self.canvas.get_renderer()
        drawn.extend([t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
                     for ax in self.axes)

    Figure_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", save)
    plot(_bench_rows(), tmp_path / "bench.png")
    assert len(drawn) == 2
    for boxes in drawn:
        assert len(boxes) == 6
        for a, b in zip(boxes, boxes[1:]):
            assert a.x1 < b.x0, (a, b)  # each name ends before the next begins


def test_bench_loaders_help_is_whole_sentences(capsys):
    from tools.bench.loaders import main

    with pytest.raises(SystemExit):
        main(["--help"])
    description = " ".join(capsys.readouterr().out.split("\n\n")[1].split())
    assert description.endswith(".") and "FFCV used directly" in description, description


def test_bench_loaders_ffcv_direct_writer_prints_lines_not_tqdm_frames(tmp_path, capsys):
    """FFCV's own writer (the FFCV-direct anchor's beton) prints our progress lines into a log, not
    tqdm's carriage-return frames."""
    from tools.bench.loaders import ffcv_direct

    src, _ = write_cifar10(tmp_path / "src", per_batch=8, test=4)
    ffcv_direct(src, tmp_path / "direct.beton", "cifar", 8, 1, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "\r" not in err and "cifar FFCV direct beton: 40/40 img (100.0%)" in err, err
