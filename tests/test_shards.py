"""shards/: real formats in, webdataset + DALI index + FFCV out, read back by the upstream libraries."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import WNIDS, write_cifar100
from shards.build import ShardParams, build
from shards.errors import ShardError
from shards.manifest import load_manifest, sha256_file
from shards.verify import verify
from shards import wds_writer


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
    from nvidia.dali import fn, pipeline_def, types

    src, arrays = cifar10
    m = shard("cifar10", src, tmp_path / "out", formats=["wds"], samples_per_shard=16)
    root = Path(load_manifest(tmp_path / "out" / "cifar10")["root"])
    shards = m["splits"]["train"]["wds"]["shards"]

    @pipeline_def(batch_size=10, num_threads=1, device_id=None)
    def pipe():
        img, cls = fn.readers.webdataset(
            paths=[str(root / s["tar"]) for s in shards], index_paths=[str(root / s["idx"]) for s in shards],
            ext=["png", "cls"], missing_component_behavior="error", random_shuffle=False, name="reader")
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), cls

    p = pipe()
    p.build()
    n = p.reader_meta("reader")["epoch_size"]
    assert n == 60
    seen = []
    while len(seen) < n:
        imgs, clss = p.run()
        for j in range(len(imgs)):
            seen.append((np.array(imgs.at(j)), int(bytes(np.array(clss.at(j))).decode())))
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
        assert label == WNIDS.index(key[:9])
        # content encodes the label: brightness survives JPEG and conversion
        assert abs(img.mean() - [20, 127, 234][label]) < 12, key
    # sizes kept (those under max_side), labels by sorted wnid
    src = imagefolder / "train" / WNIDS[1] / f"{WNIDS[1]}_0.JPEG"
    w, h = Image.open(src).size
    img, _ = got[f"{WNIDS[1]}_{WNIDS[1]}_0"]
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
                key = mem.name[: -len(".jpg")]
                wnid = key[:9]
                original = (imagefolder / "val" / wnid / (key[10:] + ".JPEG")).read_bytes()
                assert tf.extractfile(mem).read() == original


def test_kill_and_resume_gives_the_same_shards(tmp_path, cifar10, monkeypatch):
    src, _ = cifar10
    whole = tmp_path / "whole"
    shard("cifar10", src, whole, samples_per_shard=7, formats=["wds"])

    class Killed(BaseException):
        pass

    real_finish = wds_writer.WdsShardWriter._finish
    calls = {"n": 0}

    def finish_then_die(self, end):
        real_finish(self, end)
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed()

    monkeypatch.setattr(wds_writer.WdsShardWriter, "_finish", finish_then_die)
    part = tmp_path / "part"
    with pytest.raises(Killed):
        shard("cifar10", src, part, samples_per_shard=7, formats=["wds"])
    assert not (part / "cifar10" / "manifest.json").exists()
    assert (part / "cifar10" / ".progress.json").exists()
    monkeypatch.setattr(wds_writer.WdsShardWriter, "_finish", real_finish)
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
    return subprocess.run([sys.executable, "-m", "rmix.cli", *args], capture_output=True, text=True, timeout=300)


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


def test_unknown_dataset_flag_is_rejected():
    r = run_cli("shards", "--dataset", "mnist", "--out", "/tmp/x")
    assert r.returncode == 2 and "invalid choice: 'mnist'" in r.stderr


def test_real_kill_9_then_rerun_gives_the_same_shards(tmp_path):
    """A real SIGKILL in the middle of writing (possibly mid-shard), then the same command again."""
    import json
    import signal
    import time

    from shards.synthetic import write_cifar_like

    src = write_cifar_like(tmp_path / "src", n_train=15000, n_val=500)
    args = ["shards", "--dataset", "cifar10", "--src", str(src), "--formats", "wds", "--samples-per-shard", "500",
            "--workers", "1", "--no-progress"]
    whole = run_cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "rmix.cli", *args, "--out", str(out)],
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
