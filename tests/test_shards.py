"""shards/: real formats in, webdataset + DALI index + FFCV out, read back by the upstream libraries."""

import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from conftest import WNIDS, Killed, die_after_shards, write_cifar100, write_imagefolder
from shards.build import ShardParams, build
from shards.errors import ShardError
from shards.manifest import load_manifest, sha256_file, write_json_atomic
from shards.reader import iter_tar, split_files
from shards.sources import image_key
from shards.verify import verify


def shard(dataset, src, out, **kw):
    workers = kw.pop("workers", 2)
    return build(ShardParams(dataset=dataset, **kw), src, out, workers=workers, progress=False)


def read_wds(manifest, split):
    """All samples of a split through webdataset's own reader: {key: (HWC uint8, label)}."""
    import webdataset as wds

    root = Path(manifest["root"])
    urls = [str(root / s["tar"]) for s in manifest["splits"][split]["wds"]["shards"]]
    ext = manifest["splits"][split]["wds"]["ext"]
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("__key__", ext, "cls"):
        assert s[0] not in out, "duplicate key"
        out[s[0]] = (s[1], int(s[2]))
    return out


def test_cifar10_round_trip_is_pixel_and_label_exact(tmp_path, cifar10):
    src, arrays = cifar10
    m = shard("cifar10", src.parent, tmp_path / "out", samples_per_shard=16)  # the parent is accepted too
    for split in ("train", "val"):
        images, labels = arrays[split]
        got = read_wds(load_manifest(tmp_path / "out" / "cifar10"), split)
        assert len(got) == len(labels) == m["splits"][split]["num_samples"]
        for key, (img, label) in got.items():
            i = int(key.split("_")[1])
            assert np.array_equal(img, images[i]), key
            assert label == labels[i]
    assert m["classes"][0] == "airplane" and m["num_classes"] == 10
    counts = [s["num_samples"] for s in m["splits"]["train"]["wds"]["shards"]]
    assert counts == [16, 16, 16, 12]


def test_write_order_is_shuffled_by_seed(tmp_path, cifar10):
    src, _ = cifar10
    keys = []
    for seed in (0, 0, 1):
        out = tmp_path / f"o{len(keys)}"
        shard("cifar10", src, out, formats=["wds"], seed=seed, samples_per_shard=100)
        keys.append(list(read_wds(load_manifest(out / "cifar10"), "train")))
    assert keys[0] == keys[1]
    assert keys[0] != keys[2]
    assert keys[0] != sorted(keys[0])


def test_cifar100_fine_labels(tmp_path):
    src, arrays = write_cifar100(tmp_path / "src")
    m = shard("cifar100", src, tmp_path / "out", formats=["wds"])
    assert m["num_classes"] == 100
    got = read_wds(load_manifest(tmp_path / "out" / "cifar100"), "train")
    for key, (img, label) in got.items():
        i = int(key.split("_")[1])
        assert label == arrays["train"][1][i]
        assert np.array_equal(img, arrays["train"][0][i])


def test_dali_index_equals_wds2idx(tmp_path, cifar10):
    src, _ = cifar10
    m = shard("cifar10", src, tmp_path / "out", formats=["wds"], samples_per_shard=25)
    root = Path(load_manifest(tmp_path / "out" / "cifar10")["root"])
    wds2idx = Path(sys.executable).parent / "wds2idx"
    for s in m["splits"]["train"]["wds"]["shards"]:
        ref = tmp_path / "ref.idx"
        subprocess.run([str(wds2idx), str(root / s["tar"]), str(ref)], check=True, capture_output=True)
        assert ref.read_bytes() == (root / s["idx"]).read_bytes()


def test_dali_reader_reads_our_shards_with_our_index(tmp_path, cifar10):
    """DALI's own ``fn.readers.webdataset`` (through our module-level pipeline factory, decode only)
    reads every sample of our shards with our ``.idx``."""
    from pipelines.dali import wds_pipeline

    src, arrays = cifar10
    m = shard("cifar10", src, tmp_path / "out", formats=["wds"], samples_per_shard=16)
    root = Path(load_manifest(tmp_path / "out" / "cifar10")["root"])
    shards = m["splits"]["train"]["wds"]["shards"]
    p = wds_pipeline(files=[str(root / s["tar"]) for s in shards], index_files=[str(root / s["idx"]) for s in shards],
                     ext="png", preset=None, batch_size=10, num_threads=1, device_id=None)
    p.build()
    n = p.reader_meta("reader")["epoch_size"]
    assert n == 60
    seen = []
    while len(seen) < n:
        imgs, clss = p.run()
        for j in range(len(imgs)):
            seen.append((np.array(imgs.at(j)), int(bytes(np.array(clss.at(j))).rstrip(b"\0").decode())))
    seen = seen[:n]
    images, labels = arrays["train"]
    # same multiset of (image, label) pairs as the source
    src_pairs = sorted((im.tobytes(), int(l)) for im, l in zip(images, labels))
    assert sorted((im.tobytes(), l) for im, l in seen) == src_pairs


def test_ffcv_loader_reads_our_beton(tmp_path, cifar10):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    src, arrays = cifar10
    m = shard("cifar10", src, tmp_path / "out", formats=["ffcv"])
    root = Path(load_manifest(tmp_path / "out" / "cifar10")["root"])
    beton = root / m["splits"]["val"]["ffcv"]["path"]
    loader = Loader(str(beton), batch_size=8, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    imgs, labels = zip(*[(np.asarray(i), np.asarray(l)) for i, l in loader])
    imgs, labels = np.concatenate(imgs), np.concatenate(labels).ravel()
    assert np.array_equal(imgs, arrays["val"][0])  # raw mode, source order: pixel exact
    assert np.array_equal(labels, arrays["val"][1])


def test_imagenet_oddities_become_rgb_and_truncated_is_rejected(tmp_path, imagefolder):
    m = shard("imagenet", imagefolder, tmp_path / "out", samples_per_shard=5, max_side=100)
    root = tmp_path / "out" / "imagenet"
    tr = m["splits"]["train"]
    assert tr["rejected"] == 1 and tr["num_samples"] == 3 * 4 + 4 and tr["num_source"] == 3 * 4 + 5
    rejects = (root / "rejects.tsv").read_text().splitlines()
    assert len(rejects) == 2 and "truncated" in rejects[1] and rejects[1].startswith("train\t")
    assert m["classes"] == WNIDS
    got = read_wds(load_manifest(root), "train")
    assert len(got) == 16
    for key, (img, label) in got.items():
        assert img.ndim == 3 and img.shape[2] == 3
        assert max(img.shape[:2]) <= 100
        assert label == WNIDS.index(unquote(key).split("/")[0])
        # content encodes the label: brightness survives JPEG and conversion
        assert abs(img.mean() - [20, 127, 234][label]) < 12, key
    # sizes kept (those under max_side), labels by sorted wnid
    src = imagefolder / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
    w, h = Image.open(src).size
    img, _ = got[image_key(f"{WNIDS[1]}/{WNIDS[1]}_0.JPEG")]
    if max(w, h) <= 100:
        assert img.shape[:2] == (h, w)
    assert m["splits"]["train"]["ffcv"]["num_samples"] == 16


def test_baseline_rgb_jpeg_bytes_are_copied(tmp_path, imagefolder):
    shard("imagenet", imagefolder, tmp_path / "out", formats=["wds"], splits=["val"])
    import tarfile

    root = tmp_path / "out" / "imagenet"
    tar = sorted((root / "wds").glob("val-*.tar"))[0]
    with tarfile.open(tar) as tf:
        for mem in tf:
            if mem.name.endswith(".jpg"):
                rel = unquote(mem.name[: -len(".jpg")])
                original = (imagefolder / "val" / rel).read_bytes()
                assert tf.extractfile(mem).read() == original


def test_kill_and_resume_gives_the_same_shards(tmp_path, cifar10, monkeypatch):
    src, _ = cifar10
    whole = tmp_path / "whole"
    shard("cifar10", src, whole, samples_per_shard=7, formats=["wds"])

    die_after_shards(monkeypatch, 3)
    part = tmp_path / "part"
    with pytest.raises(Killed):
        shard("cifar10", src, part, samples_per_shard=7, formats=["wds"])
    assert not (part / "cifar10" / "manifest.json").exists()
    assert (part / "cifar10" / ".progress.json").exists()
    monkeypatch.undo()
    shard("cifar10", src, part, samples_per_shard=7, formats=["wds"])

    def files(root):
        return {p.name: sha256_file(p) for p in sorted((root / "cifar10" / "wds").iterdir())}

    assert files(whole) == files(part)
    keys = read_wds(load_manifest(part / "cifar10"), "train")
    assert len(keys) == 60  # nothing lost, nothing duplicated (read_wds asserts unique keys)


def test_rerun_of_finished_job_is_a_noop(tmp_path, cifar10, capsys):
    src, _ = cifar10
    shard("cifar10", src, tmp_path / "out", formats=["wds"])
    tar = next((tmp_path / "out" / "cifar10" / "wds").glob("*.tar"))
    mtime = tar.stat().st_mtime_ns
    shard("cifar10", src, tmp_path / "out", formats=["wds"])
    assert "already complete" in capsys.readouterr().out
    assert tar.stat().st_mtime_ns == mtime
    with pytest.raises(ShardError, match="other arguments"):
        shard("cifar10", src, tmp_path / "out", formats=["wds"], seed=5)


def test_shard_bytes_cut(tmp_path, cifar10):
    src, _ = cifar10
    m = shard("cifar10", src, tmp_path / "out", formats=["wds"], shard_bytes=40_000)
    shards = m["splits"]["train"]["wds"]["shards"]
    assert len(shards) > 1
    assert all(s["bytes"] <= 40_000 + 1024 * 10 + 10240 for s in shards)  # + tar end-of-archive padding
    assert sum(s["num_samples"] for s in shards) == 60


def test_verify_passes_then_names_the_bad_file(tmp_path, cifar10):
    src, _ = cifar10
    shard("cifar10", src, tmp_path / "out", samples_per_shard=20)
    root = tmp_path / "out" / "cifar10"
    counts = verify(root, progress=False)
    assert counts == {"train/wds": 60, "train/ffcv": 60, "val/wds": 20, "val/ffcv": 20}
    bad = root / "wds" / "train-000001.tar"
    data = bytearray(bad.read_bytes())
    data[2000] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="train-000001.tar"):
        verify(root, progress=False)


def test_digits_goes_through_the_cifar_path(tmp_path):
    m = shard("digits", None, tmp_path / "out", formats=["wds"])
    assert m["splits"]["train"]["num_samples"] == 1500 and m["splits"]["val"]["num_samples"] == 297
    assert (tmp_path / "out" / "digits" / "source" / "cifar-10-batches-py" / "data_batch_1").is_file()
    got = read_wds(load_manifest(tmp_path / "out" / "digits"), "val")
    img, label = next(iter(got.values()))
    assert img.shape == (32, 32, 3) and 0 <= label <= 9


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["shards", "--dataset", "cifar10", "--src", "/nonexistent/cifar", "--out", "{tmp}"], "does not exist"),
        (["shards", "--dataset", "imagenet", "--out", "{tmp}"], "--src is required"),
        (["shards", "--dataset", "cifar10", "--src", "{tmp}", "--out", "{tmp}"], "is not a cifar10 directory"),
        (["shards", "--dataset", "digits", "--out", "{file}/sub"], "cannot create output directory"),
        (["verify", "{tmp}"], "no manifest.json"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    f = tmp_path / "afile"
    f.write_text("x")
    r = run_cli(*[a.format(tmp=tmp_path, file=f) for a in args])
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and message in lines[0], r.stderr


@pytest.mark.slow
def test_unknown_dataset_flag_is_rejected():
    r = run_cli("shards", "--dataset", "mnist", "--out", "/tmp/x")
    assert r.returncode == 2 and "invalid choice: 'mnist'" in r.stderr


@pytest.mark.slow
def test_real_kill_9_then_rerun_gives_the_same_shards(tmp_path):
    """A real SIGKILL in the middle of writing (possibly mid-shard), then the same command again."""
    import json
    import signal
    import time

    from tools.synthetic import write_cifar_like

    src = write_cifar_like(tmp_path / "src", n_train=15000, n_val=500)
    args = ["shards", "--dataset", "cifar10", "--src", str(src), "--formats", "wds", "--samples-per-shard", "500",
            "--workers", "1", "--no-progress"]
    whole = run_cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "tools.cli", *args, "--out", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "cifar10" / ".progress.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads(journal.read_text())["splits"]["train"]["shards"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "cifar10" / "manifest.json").exists(), "finished before the kill: make the data bigger"
    again = run_cli(*args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "resuming after" in again.stdout

    def files(root):
        return {q.name: sha256_file(q) for q in sorted((root / "cifar10" / "wds").iterdir())}

    assert files(tmp_path / "whole") == files(out)
    assert len(read_wds(load_manifest(out / "cifar10"), "train")) == 15000


# -- verify: the .idx against the manifest, streaming, one line -------------------------------------

def _wds_dataset(tmp_path, src, **kw):
    shard("cifar10", src, tmp_path / "out", formats=["wds"], samples_per_shard=kw.pop("samples_per_shard", 25), **kw)
    return tmp_path / "out" / "cifar10"


def test_verify_missing_idx_is_one_line(tmp_path, cifar10, capsys):
    from tools.verify import main as verify_main

    root = _wds_dataset(tmp_path, cifar10[0])
    idx = root / "wds" / "train-000001.idx"
    idx.unlink()
    with pytest.raises(ShardError, match="missing DALI index .*train-000001.idx"):
        verify(root, progress=False)
    with pytest.raises(SystemExit) as e:
        verify_main([str(root), "--no-progress"])
    line = str(e.value.code)
    assert line.startswith("rmix verify: missing DALI index") and "\n" not in line and "train-000001.idx" in line


def test_verify_compares_the_idx_with_the_manifest(tmp_path, cifar10):
    root = _wds_dataset(tmp_path, cifar10[0])
    m = load_manifest(root)
    shard0 = m["splits"]["train"]["wds"]["shards"][0]
    idx = root / shard0["idx"]
    assert shard0["idx_bytes"] == idx.stat().st_size
    verify(root, progress=False)
    good = idx.read_bytes()
    idx.write_bytes(good + b"\n")  # one byte longer: the size differs from the manifest's
    with pytest.raises(ShardError, match=r"train-000000.idx: .* bytes, manifest says"):
        verify(root, progress=False)
    with pytest.raises(ShardError, match="corrupt DALI index"):  # the loaders' cheap check sees it too
        split_files(m, "train", "wds")
    idx.write_bytes(good[:-2] + b"9\n")  # same size, other content
    with pytest.raises(ShardError, match="train-000000.idx: sha256 differs"):
        verify(root, progress=False)
    idx.write_bytes(good)
    # a manifest written before idx_bytes existed still verifies (sha256 only)
    raw = load_manifest(root)
    for entry in raw["splits"].values():
        for s in entry["wds"]["shards"]:
            del s["idx_bytes"]
    del raw["root"]
    write_json_atomic(root / "manifest.json", raw)
    assert verify(root, progress=False) == {"train/wds": 60, "val/wds": 20}


def test_verify_sample_decodes_k_images_and_checks_every_label(tmp_path, cifar10, monkeypatch):
    root = _wds_dataset(tmp_path, cifar10[0], samples_per_shard=20)
    reads = []
    real = tarfile.TarFile.extractfile

    def counting(self, member):
        reads.append(member.name.rsplit(".", 1)[1])
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting)
    assert verify(root, sample=2, progress=False) == {"train/wds": 60, "val/wds": 20}
    tars = 3 + 1
    assert reads.count("png") == 2 * tars  # only the sampled images are read
    assert reads.count("cls") == 80  # every label is read and range-checked


def test_verify_streams_a_tar_instead_of_loading_it(tmp_path):
    """A shard of big images: verify --sample 1 keeps far less than the tar in memory."""
    import tracemalloc

    rng = np.random.default_rng(0)
    src = tmp_path / "big"
    for i in range(8):
        d = src / "train" / WNIDS[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)).save(d / f"{i}.JPEG", quality=95)
    shard("imagenet", src, tmp_path / "out", formats=["wds"], splits=["train"], samples_per_shard=100)
    root = tmp_path / "out" / "imagenet"
    tar_bytes = load_manifest(root)["splits"]["train"]["wds"]["shards"][0]["bytes"]
    assert tar_bytes > 6 << 20
    tracemalloc.start()
    try:
        verify(root, sample=1, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < tar_bytes / 3, (peak, tar_bytes)


def test_iter_tar_only_reads_the_asked_samples(tmp_path, cifar10):
    root = _wds_dataset(tmp_path, cifar10[0], samples_per_shard=100)
    tar = next((root / "wds").glob("train-*.tar"))
    full = list(iter_tar(tar))
    some = list(iter_tar(tar, only={0, 5}, always=("cls",)))
    assert [k for k, _ in full] == [k for k, _ in some] and len(full) == 60
    for pos, ((_, a), (_, b)) in enumerate(zip(full, some)):
        assert b["cls"] == a["cls"]
        assert (b["png"] == a["png"]) if pos in (0, 5) else (b["png"] is None)


# -- ImageNet: one class index from train; keys unique; empty folders and symlink loops --------------

def test_val_labels_come_from_the_train_class_index(tmp_path):
    src = write_imagefolder(tmp_path / "src", oddities=False)
    import shutil

    shutil.rmtree(src / "val" / WNIDS[0])  # val lacks the first class: its others keep train's numbers
    for splits, out in ((["train", "val"], "both"), (["val"], "valonly")):
        m = shard("imagenet", src, tmp_path / out, formats=["wds"], splits=splits)
        assert m["classes"] == WNIDS
        got = read_wds(load_manifest(tmp_path / out / "imagenet"), "val")
        assert len(got) == 2 * 2
        for key, (img, label) in got.items():
            assert label == WNIDS.index(unquote(key).split("/")[0]) and label > 0
            assert abs(img.mean() - [20, 127, 234][label]) < 12  # content agrees with the label


def test_val_class_missing_from_train_is_an_error(tmp_path):
    src = write_imagefolder(tmp_path / "src", oddities=False)
    (src / "val" / "n09999999").mkdir()
    (src / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG").rename(src / "val" / "n09999999" / "a.JPEG")
    with pytest.raises(ShardError, match="n09999999 not in .*train"):
        shard("imagenet", src, tmp_path / "out", formats=["wds"])
    assert not list((tmp_path / "out").rglob("*.tar"))  # found before the train split is written


def test_keys_are_unique_by_construction(tmp_path):
    src = write_imagefolder(tmp_path / "src", oddities=False)
    d = src / "train" / WNIDS[0]
    jpeg = (d / f"{WNIDS[0]}_0.JPEG").read_bytes()
    names = ["a.b.c.JPEG", "a_b_c.JPEG", "a_b.c.JPEG", "x.JPEG", "x.jpeg", "x jpg.JPEG", "é.JPEG"]
    for name in names:
        (d / name).write_bytes(jpeg)
    Image.open(d / f"{WNIDS[0]}_0.JPEG").save(d / "x.png")
    m = shard("imagenet", src, tmp_path / "out", formats=["wds"], splits=["train"], samples_per_shard=5)
    n = 3 * 4 + len(names) + 1
    assert m["splits"]["train"]["num_samples"] == n
    got = read_wds(load_manifest(tmp_path / "out" / "imagenet"), "train")  # asserts the keys are unique
    paths = {unquote(k) for k in got}
    assert len(got) == n and {f"{WNIDS[0]}/{x}" for x in names + ["x.png"]} <= paths
    assert verify(tmp_path / "out" / "imagenet", progress=False) == {"train/wds": n}


def test_every_class_folder_empty_is_one_error(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val"):
        for w in WNIDS:
            (src / split / w).mkdir(parents=True)
    (src / "train" / WNIDS[0] / "notes.txt").write_text("not an image")
    with pytest.raises(ShardError, match=r"train: no images in any of its 3 class folders"):
        shard("imagenet", src, tmp_path / "out")


def test_symlink_loops_in_the_tree(tmp_path):
    src = write_imagefolder(tmp_path / "src", oddities=False)
    loop = src / "train" / WNIDS[0] / "loop.JPEG"
    os.symlink(loop.name, loop)  # a file that points at itself: rejected with its reason
    m = shard("imagenet", src, tmp_path / "out", formats=["wds"], splits=["train"])
    assert m["splits"]["train"]["rejected"] == 1 and m["splits"]["train"]["num_samples"] == 12
    rejects = (tmp_path / "out" / "imagenet" / "rejects.tsv").read_text()
    assert "loop.JPEG" in rejects and "symbolic links" in rejects
    os.symlink("nloop", src / "train" / "nloop")  # a class folder that points at itself: one error
    with pytest.raises(ShardError, match="cannot read .*nloop: Too many levels of symbolic links"):
        shard("imagenet", src, tmp_path / "out2", formats=["wds"], splits=["train"])


# -- CIFAR: shapes, counts, ranges checked while reading -----------------------------------------------

def _edit_pickle(path, change):
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    change(d)
    with open(path, "wb") as f:
        pickle.dump(d, f)


def _set(key, fn):
    return lambda d: d.__setitem__(key, fn(d[key]))


@pytest.mark.parametrize("fname, change, message", [
    ("data_batch_3", _set(b"labels", lambda l: l[:-2]), "12 images but 10 labels"),
    ("data_batch_3", _set(b"labels", lambda l: [15] + l[1:]), "label 15 outside 0..9"),
    ("test_batch", _set(b"labels", lambda l: l[:-1] + [-1]), "label -1 outside 0..9"),
    ("data_batch_2", _set(b"data", lambda a: a.reshape(-1, 3, 32, 32)), r"shape \(12, 3, 32, 32\)"),
    ("data_batch_2", _set(b"data", lambda a: a[:, :3000]), r"shape \(12, 3000\)"),
    ("data_batch_2", _set(b"data", lambda a: a.astype(np.int64) * 2), "must be uint8 pixels"),
    ("batches.meta", lambda d: d.pop(b"label_names"), "has no b'label_names'"),
    ("batches.meta", _set(b"label_names", lambda n: n[:9]), "lists 9 classes, expected 10"),
])
def test_bad_cifar_files_are_one_error_naming_the_file(tmp_path, cifar10, fname, change, message):
    src, _ = cifar10
    _edit_pickle(src / fname, change)
    with pytest.raises(ShardError, match=message) as e:
        shard("cifar10", src, tmp_path / "out", formats=["wds"])
    assert fname in str(e.value)


def test_cifar100_label_range(tmp_path):
    src, _ = write_cifar100(tmp_path / "src")
    _edit_pickle(src / "train", _set(b"fine_labels", lambda l: l[:-1] + [100]))
    with pytest.raises(ShardError, match=r"train: label 100 outside 0..99"):
        shard("cifar100", src, tmp_path / "out", formats=["wds"])


# -- flags -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, kw, flag", [
    ("imagenet", dict(max_side=0), "--max-side"),
    ("cifar10", dict(max_side=64), "--max-side"),
    ("cifar10", dict(shard_bytes=0), "--shard-bytes"),
    ("cifar10", dict(samples_per_shard=0), "--samples-per-shard"),
    ("cifar10", dict(quality=500), "--quality"),
    ("cifar10", dict(quality=0), "--quality"),
    ("cifar10", dict(seed=-1), "--seed"),
    ("cifar10", dict(ffcv_compress_probability=1.5), "--ffcv-compress-probability"),
    ("cifar10", dict(ffcv_compress_probability=-0.1), "--ffcv-compress-probability"),
    ("cifar10", dict(ffcv_max_resolution=0), "--ffcv-max-resolution"),
    ("cifar10", dict(ffcv_write_mode="png"), "--ffcv-write-mode"),
    ("cifar10", dict(formats=[]), "--formats"),
    ("cifar10", dict(splits=["train", "train"]), "--split"),
    ("mnist", {}, "unknown dataset"),
])
def test_shard_params_validate_every_field(tmp_path, dataset, kw, flag):
    with pytest.raises(ShardError, match=flag):
        ShardParams(dataset=dataset, **kw).validate()
    with pytest.raises(ShardError, match=flag):  # build() checks before it touches the output
        build(ShardParams(dataset=dataset, **kw), tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_defaults_are_valid():
    for dataset in ("cifar10", "cifar100", "imagenet", "digits"):
        ShardParams(dataset=dataset).validate()
    ShardParams(dataset="imagenet", max_side=1, quality=100, ffcv_compress_probability=1.0, shard_bytes=1).validate()


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet", "--max-side", "0"], "--max-side must be an integer >= 1, got 0"),
    (["--dataset", "cifar10", "--shard-bytes", "0"], "--shard-bytes must be"),
    (["--dataset", "cifar10", "--workers", "-3"], "--workers must be an integer >= 0"),
    (["--dataset", "cifar10", "--quality", "500"], "--quality is a JPEG quality 1..100, got 500"),
    (["--dataset", "cifar10", "--samples-per-shard", "0"], "--samples-per-shard must be"),
    (["--dataset", "cifar10", "--ffcv-compress-probability", "2"], "--ffcv-compress-probability"),
    (["--dataset", "cifar10", "--ffcv-max-resolution", "0"], "--ffcv-max-resolution"),
    (["--dataset", "digits"], "digits is built in"),
])
def test_bad_flags_are_one_line(tmp_path, args, message):
    from tools.shards import main as shards_main

    with pytest.raises(SystemExit) as e:
        shards_main(args + ["--src", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "out"), "--no-progress"])
    line = str(e.value.code)
    assert line.startswith("rmix shards: ") and message in line and "\n" not in line, line
    assert not (tmp_path / "out").exists()


# -- two jobs, one output; disk full inside FFCV's workers ---------------------------------------------

def _script(tmp_path, body: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.slow
def test_second_job_into_the_same_out_is_refused(tmp_path, cifar10):
    """Two real `rmix shards` processes: the one that holds the lock finishes, the other exits at once."""
    src, _ = cifar10
    out, go = tmp_path / "out", tmp_path / "go"
    args = ["--dataset", "cifar10", "--src", str(src), "--out", str(out), "--formats", "wds", "--workers", "1",
            "--no-progress"]
    # the first job waits (holding the lock) until the test says go
    first = _script(tmp_path, f"""
        import os, sys, time
        import shards.build as b
        real = b._run
        def waiting(*a, **k):
            while not os.path.exists({str(go)!r}):
                time.sleep(0.05)
            return real(*a, **k)
        b._run = waiting
        from tools.shards import main
        main(sys.argv[1:])
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    a = subprocess.Popen([sys.executable, str(first), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        lock = out / "cifar10" / ".lock"
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.is_file() and lock.read_text().strip() == str(a.pid)):
            assert a.poll() is None, a.communicate()
            time.sleep(0.05)
        second = run_cli("shards", *args)
        assert second.returncode != 0
        lines = [l for l in second.stderr.strip().splitlines() if l]
        assert len(lines) == 1 and "being written by another `rmix shards`" in lines[0], second.stderr
        assert f"pid {a.pid}" in lines[0]
        go.write_text("go")
        stdout, stderr = a.communicate(timeout=300)
    finally:
        a.kill()
    assert a.returncode == 0, stderr
    assert verify(out / "cifar10", progress=False) == {"train/wds": 60, "val/wds": 20}


@pytest.mark.slow
def test_disk_full_inside_ffcv_workers_is_one_line_not_a_hang(tmp_path):
    """ENOSPC where FFCV's worker flushes a page (the real failure point): one line, no leaked shared
    memory, no beton left behind, the job resumable."""
    from tools.synthetic import write_cifar_like

    src = write_cifar_like(tmp_path / "src", n_train=600, n_val=60)
    script = _script(tmp_path, """
        import errno, sys
        from ffcv.memory_allocator import MemoryAllocator
        def flush_page(self):
            if self.my_page >= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
        MemoryAllocator.flush_page = flush_page
        from tools.shards import main
        main(sys.argv[1:])
    """)
    out = tmp_path / "out"
    try:
        r = subprocess.run([sys.executable, str(script), "--dataset", "cifar10", "--src", str(src), "--out", str(out),
                            "--formats", "ffcv", "--split", "train", "--workers", "2", "--no-progress"],
                           capture_output=True, text=True, timeout=180, env={**os.environ, "PYTHONPATH": os.getcwd()})
    except subprocess.TimeoutExpired:
        pytest.fail("rmix shards hung after ENOSPC in an FFCV worker")
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("rmix shards: disk full while writing"), r.stderr
    assert "ffcv" in lines[0] and "leaked" not in r.stderr
    root = out / "cifar10"
    assert not list((root / "ffcv").glob("*.tmp")) and not (root / "manifest.json").exists()
    # the same command again, with space: the lock was released and the job completes
    m = shard("cifar10", src, out, formats=["ffcv"], splits=["train"], workers=2)
    assert m["splits"]["train"]["ffcv"]["num_samples"] == 600


def test_progress_off_a_terminal_is_plain_lines(tmp_path):
    """Off a terminal no carriage-return frames: a plain line every ``every`` seconds and at the end."""
    import io

    from shards.progress import Progress

    out = io.StringIO()  # not a TTY, like CI or `> log.txt`
    bar = Progress(1000, desc="train wds", enabled=True, every=0.0, stream=out)
    for _ in range(3):
        bar.update(10)
    bar.note("2 rejected")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    assert lines[0].startswith("train wds: 10/1000 img (1.0%)") and lines[-1].startswith("train wds: 30/1000 img (3.0%)")
    assert lines[-1].endswith("2 rejected")
    quiet = io.StringIO()
    q = Progress(10, enabled=False, every=0.0, stream=quiet)
    q.update(5)
    q.close()
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_encode_pool_ends_even_when_the_parent_handles_sigterm(tmp_path, cifar10):
    """Pool.__exit__ stops its workers with SIGTERM; forked from a process with its own SIGTERM handler
    (a trainer in the same process), they must still die, or the job hangs after its last shard."""
    src, _ = cifar10
    code = ("import signal, sys; from pathlib import Path; from shards.build import ShardParams, build; "
            "signal.signal(signal.SIGTERM, lambda *a: None); "
            f"build(ShardParams(dataset='cifar10', formats=['wds']), Path({str(src)!r}), Path({str(tmp_path / 'o')!r}), "
            "workers=2, progress=False); print('done')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and r.stdout.strip().endswith("done"), r.stderr[-2000:]


# -- ImageFolder as torchvision reads it; every split checked before writing; reproducible outputs -------

def test_nested_files_reach_the_shards_in_torchvisions_order(tmp_path):
    """torchvision's ImageFolder takes every image under a class folder, nested folders included (its
    ``os.walk``): those files reach the shards, labelled by their class folder, numbered in its order."""
    from torchvision.datasets import ImageFolder

    from shards.sources import ImageFolderSource, imagefolder_classes

    src = write_imagefolder(tmp_path / "src", oddities=False)
    jpeg = (src / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG").read_bytes()
    for rel in ("sub/a.JPEG", "sub/deeper/b.JPEG", "sub-2/c.JPEG", "sub.d/e.JPEG"):
        (src / "train" / WNIDS[1] / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / "train" / WNIDS[1] / rel).write_bytes(jpeg)
    source = ImageFolderSource(src, "train", imagefolder_classes(src))
    torchvision = [(os.path.relpath(p, src / "train").replace(os.sep, "/"), y)
                   for p, y in ImageFolder(str(src / "train")).samples]
    assert [(source.files.rel(i), source.label(i)) for i in range(len(source))] == torchvision
    m = shard("imagenet", src, tmp_path / "out", formats=["wds"], splits=["train"], samples_per_shard=5)
    assert m["splits"]["train"]["num_samples"] == 3 * 4 + 4
    got = read_wds(load_manifest(tmp_path / "out" / "imagenet"), "train")
    img, label = got[image_key(f"{WNIDS[1]}/sub/deeper/b.JPEG")]
    assert label == 1 and abs(img.mean() - 127) < 12


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_class_folder_is_one_error_before_anything_is_written(tmp_path, split):
    """torchvision's ImageFolder raises FileNotFoundError for a class folder without images; so does
    ``rmix shards``, in one line naming it, for either split, before a shard of any split is written."""
    src = write_imagefolder(tmp_path / "src", oddities=False)
    empty = src / split / WNIDS[2]
    for f in empty.iterdir():
        f.unlink()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(ShardError, match=rf"{split}: no images in class folder\(s\) {WNIDS[2]} \(looked for"):
        shard("imagenet", src, tmp_path / "out", formats=["wds"])
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_rejects_name_the_file_and_a_merge_equals_one_run(tmp_path):
    """A file PIL cannot identify is rejected with its name, not PIL's ``<_io.BytesIO object at 0x...>``,
    so ``rejects.tsv`` is the same in every run and the merge of parts is byte for byte a single run's."""
    from shards.build import merge

    src = write_imagefolder(tmp_path / "src", oddities=True)
    (src / "train" / WNIDS[1] / "junk.JPEG").write_bytes(b"not an image at all")
    kw = dict(formats=["wds"], samples_per_shard=4)
    shard("imagenet", src, tmp_path / "one", **kw)
    for k in (1, 0):
        build(ShardParams(dataset="imagenet", **kw), src, tmp_path / "parts", workers=2, progress=False, part=f"{k}/2")
    merge(tmp_path / "parts" / "imagenet")
    one = (tmp_path / "one" / "imagenet" / "rejects.tsv").read_bytes()
    assert one == (tmp_path / "parts" / "imagenet" / "rejects.tsv").read_bytes()
    text = one.decode()
    assert f"cannot identify image file '{WNIDS[1]}/junk.JPEG'" in text and "0x" not in text, text


def test_ffcv_proportion_mode_is_seeded_so_runs_write_the_same_beton(tmp_path, monkeypatch):
    """'proportion' mode draws which images FFCV compresses from numpy's global generator; seeded per
    chunk from --seed, two runs from processes in different numpy states write byte-identical betons
    (one worker), and with two workers taking chunks in any order each sample is stored the same way."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.reader import Reader

    from shards import ffcv_writer

    monkeypatch.setattr(ffcv_writer, "CHUNK", 4)  # several chunks for two workers to share
    src = write_imagefolder(tmp_path / "src", per_class=10, oddities=False)

    def beton(name, workers, numpy_state, seed=0):
        np.random.seed(numpy_state)  # the caller's numpy state: another process, another state
        shard("imagenet", src, tmp_path / name, formats=["ffcv"], splits=["train"], workers=workers,
              ffcv_write_mode="proportion", seed=seed)
        return tmp_path / name / "imagenet" / "ffcv" / "train.beton"

    def modes(path):
        return Reader(str(path)).metadata["f0"]["mode"]

    a, b = beton("a", 1, 1), beton("b", 1, 2)
    assert a.read_bytes() == b.read_bytes()
    jpg = modes(a) == IMAGE_MODES["jpg"]
    assert 0 < jpg.sum() < len(jpg)  # a proportion compressed, the rest raw
    for name, state in (("c", 3), ("d", 4)):
        assert np.array_equal(modes(beton(name, 2, state)), modes(a))
    assert not np.array_equal(modes(beton("e", 1, 1, seed=1)), modes(a))  # another --seed, another subset


def test_part_with_a_negative_k_is_one_line_about_k_of_n(tmp_path, cifar10):
    from tools.shards import main as shards_main

    src, _ = cifar10
    with pytest.raises(SystemExit) as e:
        shards_main(["--dataset", "cifar10", "--src", str(src), "--out", str(tmp_path / "out"), "--formats", "wds",
                     "--samples-per-shard", "10", "--part", "-1/2", "--no-progress"])
    line = str(e.value.code)
    assert line == "rmix shards: --part -1/2: K is this machine's part, 0..1 (parts are numbered from 0)", line


def test_ffcv_writer_progress_off_a_terminal_is_plain_lines(tmp_path, cifar10, capsys):
    """FFCV's writer draws a tqdm bar of its own: off a terminal it becomes our plain progress lines."""
    src, _ = cifar10
    build(ShardParams(dataset="cifar10", formats=["ffcv"], splits=["val"]), src, tmp_path / "out", workers=1)
    err = capsys.readouterr().err
    assert "\r" not in err and "val ffcv: 20/20 img (100.0%)" in err, err
    build(ShardParams(dataset="cifar10", formats=["ffcv"], splits=["val"]), src, tmp_path / "quiet", workers=1,
          progress=False)
    assert capsys.readouterr().err == ""


def test_verify_help_is_not_cut_off(capsys):
    from tools.verify import main

    with pytest.raises(SystemExit):
        main(["--help"])
    description = " ".join(capsys.readouterr().out.split("\n\n")[1].split())
    assert description.endswith(".") and "the full check" in description, description
