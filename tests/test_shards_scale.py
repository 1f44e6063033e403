"""shards/ at scale: the packed file index, bounded encoding, and a job split with ``--part K/N`` then
merged (the same shards and manifest as one run), with its errors as one line."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import WNIDS, Killed, die_after_shards, write_imagefolder
from shards.build import ShardParams, build, encode_in_order, merge
from shards.errors import ShardError
from shards.manifest import load_manifest, sha256_file
from shards.sources import FileIndex, CifarSource, _class_dirs
from shards.verify import verify
from test_shards import read_wds


def shard(dataset, src, out, part=None, **kw):
    workers = kw.pop("workers", 2)
    return build(ShardParams(dataset=dataset, **kw), src, out, workers=workers, progress=False, part=part)


def files(root: Path) -> dict:
    """Every file a loader or a user sees, by relative path: sha256 (the manifest without ``seconds``)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir() or rel.startswith(("source", ".")) or rel == "manifest.json":
            continue
        out[rel] = sha256_file(p)
    manifest = load_manifest(root)
    manifest.pop("seconds")
    manifest.pop("root")
    out["manifest.json"] = manifest
    return out


def run_parts(src, out, n, dataset="imagenet", order=None, **kw):
    for k in order or range(n):
        rec = shard(dataset, src, out, part=f"{k}/{n}", **kw)
        assert rec["part"] == [k, n]
    assert not (out / dataset / "manifest.json").exists()
    return merge(out / dataset)


@pytest.mark.parametrize("n", [2, 3])
def test_parts_merged_are_the_single_run(tmp_path, n):
    """ImageNet with its oddities and a rejected file: every part's shards and the merged manifest and
    rejects.tsv are byte for byte those of one run; with 3 parts, val (2 shards) leaves a part empty."""
    src = write_imagefolder(tmp_path / "src")
    kw = dict(formats=["wds"], samples_per_shard=3)
    single = shard("imagenet", src, tmp_path / "single", **kw)
    merged = run_parts(src, tmp_path / "parts", n, order=reversed(range(n)), **kw)
    assert merged["splits"]["train"]["rejected"] == 1
    one, many = tmp_path / "single" / "imagenet", tmp_path / "parts" / "imagenet"
    assert files(one) == files(many)
    assert {k: v for k, v in merged.items() if k != "seconds"} == {k: v for k, v in single.items() if k != "seconds"}
    assert not (many / "parts").exists() and not list(many.glob(".lock.part-*"))
    for split in ("train", "val"):
        got = read_wds(load_manifest(many), split)
        assert got.keys() == read_wds(load_manifest(one), split).keys()
    assert verify(many, progress=False) == {"train/wds": 16, "val/wds": 6}
    # what is merged stays merged: merging again, or rerunning a part, changes nothing
    merge(many)
    shard("imagenet", src, tmp_path / "parts", part=f"0/{n}", **kw)
    assert files(one) == files(many)


def test_a_shard_holds_its_positions_even_with_rejects(tmp_path):
    """Cut by --samples-per-shard, shard i holds plan positions [i*S, (i+1)*S): a reject makes its shard
    shorter instead of moving every later boundary (which is what lets a part know where to start)."""
    src = write_imagefolder(tmp_path / "src")
    m = shard("imagenet", src, tmp_path / "out", formats=["wds"], splits=["train"], samples_per_shard=3)
    shards = m["splits"]["train"]["wds"]["shards"]
    assert [s["end"] for s in shards] == [3, 6, 9, 12, 15, 17]
    assert sorted(s["num_samples"] for s in shards) == [2, 2, 3, 3, 3, 3]


def test_cifar_parts_read_back_by_our_loader(tmp_path, cifar10):
    import torch

    from pipelines import build_loader

    src, arrays = cifar10
    kw = dict(formats=["wds"], samples_per_shard=7)
    shard("cifar10", src, tmp_path / "single", **kw)
    run_parts(src, tmp_path / "parts", 2, dataset="cifar10", **kw)
    assert files(tmp_path / "single" / "cifar10") == files(tmp_path / "parts" / "cifar10")
    loader = build_loader(tmp_path / "parts" / "cifar10", "val", backend="memory", batch_size=8, train=False,
                          device="cpu", num_workers=1)
    labels = torch.cat([b.labels for b in loader]).numpy()
    assert sorted(labels.tolist()) == sorted(arrays["val"][1].tolist())


def test_a_killed_part_resumes(tmp_path, cifar10, monkeypatch):
    src, _ = cifar10
    kw = dict(formats=["wds"], samples_per_shard=5)
    shard("cifar10", src, tmp_path / "single", **kw)

    out = tmp_path / "parts"
    shard("cifar10", src, out, part="0/2", **kw)
    die_after_shards(monkeypatch, 2)
    with pytest.raises(Killed):
        shard("cifar10", src, out, part="1/2", **kw)
    assert (out / "cifar10" / ".progress.part-1-of-2.json").is_file()
    monkeypatch.undo()
    with pytest.raises(ShardError, match=r"part\(s\) 1 of 2 not complete"):
        merge(out / "cifar10")
    shard("cifar10", src, out, part="1/2", **kw)
    merge(out / "cifar10")
    assert files(tmp_path / "single" / "cifar10") == files(out / "cifar10")


# -- errors: one line each -------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--part", "2/2"], "--part 2/2: K is this machine's part, 0..1"),
    (["--part=-1/2"], "--part -1/2: K is this machine's part, 0..1"),
    (["--part", "1/0"], "N is the number of parts"),
    (["--part", "half"], "--part takes K/N"),
    (["--part", "1/2/3"], "--part takes K/N"),
    (["--part", "0/2", "--formats", "wds,ffcv"], "--part splits the webdataset pass only"),
    (["--part", "0/2", "--formats", "wds", "--samples-per-shard", "0"], "--samples-per-shard must be"),
])
def test_bad_part_flags_are_one_line(tmp_path, cifar10, args, message):
    from tools.shards import main as shards_main

    base = ["--dataset", "cifar10", "--src", str(cifar10[0]), "--out", str(tmp_path / "out"), "--no-progress"]
    if "--samples-per-shard" not in args and "ffcv" not in " ".join(args):
        base += ["--formats", "wds", "--samples-per-shard", "5"]
    with pytest.raises(SystemExit) as e:
        shards_main(base + args)
    line = str(e.value.code)
    assert line.startswith("rmix shards: ") and message in line and "\n" not in line, line
    assert not (tmp_path / "out").exists()


def test_part_needs_samples_per_shard(tmp_path, cifar10):
    for kw in (dict(), dict(shard_bytes=10_000)):
        with pytest.raises(ShardError, match="--part needs --samples-per-shard"):
            shard("cifar10", cifar10[0], tmp_path / "out", part="0/2", formats=["wds"], **kw)
    assert not (tmp_path / "out").exists()


def _merge_line(root) -> str:
    from tools.shards import main as shards_main

    with pytest.raises(SystemExit) as e:
        shards_main(["merge", str(root)])
    line = str(e.value.code)
    assert line.startswith("rmix shards merge: ") and "\n" not in line, line
    return line


def test_merge_errors_are_one_line(tmp_path, cifar10):
    src, _ = cifar10
    kw = dict(formats=["wds"], samples_per_shard=7)
    out, root = tmp_path / "out", tmp_path / "out" / "cifar10"
    assert "no dataset folder" in _merge_line(root)
    root.mkdir(parents=True)
    assert "no parts under" in _merge_line(root)
    shard("cifar10", src, out, part="0/2", **kw)
    assert "part(s) 1 of 2 not complete" in _merge_line(root)
    # a part with other arguments, made elsewhere and copied in (each machine its own --out)
    shard("cifar10", src, tmp_path / "other", part="1/2", seed=1, **kw)
    other = tmp_path / "other" / "cifar10"
    shutil.copytree(other / "wds", root / "wds", dirs_exist_ok=True)
    shutil.copy(other / "parts" / "part-1-of-2.json", root / "parts")
    line = _merge_line(root)
    assert "part-1-of-2.json and part-0-of-2.json differ in params (seed 0 vs 1)" in line, line
    # the right part 1, but its shards were not copied: the other job's files with the same names are there
    (root / "parts" / "part-1-of-2.json").unlink()
    shard("cifar10", src, tmp_path / "third", part="1/2", **kw)
    third = tmp_path / "third" / "cifar10"
    shutil.copy(third / "parts" / "part-1-of-2.json", root / "parts")
    line = _merge_line(root)
    assert "missing or differs" in line and "copy every part's wds/ folder here" in line, line
    shutil.copytree(third / "wds", root / "wds", dirs_exist_ok=True)
    m = merge(root)
    assert m["splits"]["train"]["num_samples"] == 60


def test_parts_and_whole_jobs_do_not_mix(tmp_path, cifar10):
    src, _ = cifar10
    kw = dict(formats=["wds"], samples_per_shard=7)
    shard("cifar10", src, tmp_path / "out", part="0/2", **kw)
    with pytest.raises(ShardError, match="split 2 ways .*use --part K/2"):
        shard("cifar10", src, tmp_path / "out", part="0/3", **kw)
    with pytest.raises(ShardError, match="written with other arguments; every part must get the same arguments"):
        shard("cifar10", src, tmp_path / "out", part="1/2", seed=3, **kw)
    with pytest.raises(ShardError, match="holds a job split in parts .*rmix shards merge"):
        shard("cifar10", src, tmp_path / "out", **kw)


# -- the file index and the encoder ------------------------------------------------------------------

def test_file_index_is_packed_and_matches_a_plain_listing(tmp_path):
    root = tmp_path / "train"
    names = ["b.JPEG", "a.jpg", "é ü.JPEG", "a.b.c.png", "z.JPEG", "notes.txt"]
    for w in WNIDS:
        (root / w).mkdir(parents=True)
        for i in range(300):
            (root / w / f"{w}_{i}.JPEG").write_bytes(b"")
        for name in names:
            (root / w / name).write_bytes(b"")
    (root / WNIDS[1] / "folder.jpg").mkdir()  # a folder named like an image is no file
    index = FileIndex(str(root), _class_dirs(root), threads=3)
    expected = [os.path.join(root, w, f) for w in WNIDS for f in sorted(os.listdir(root / w))
                if f != "notes.txt" and (root / w / f).is_file()]
    assert len(index) == len(expected) == 3 * 305
    assert [index.path(i) for i in range(len(index))] == expected
    assert index.rel(len(index) - 1) == f"{WNIDS[2]}/é ü.JPEG" and index.folder(0) == 0
    assert isinstance(index.names, bytes) and index.offsets.dtype == np.uint32
    assert index.nbytes() < 30 * len(index)  # the names (~15 bytes) and one offset each
    with pytest.raises(IndexError):
        index.folder(len(index))


def test_encode_in_order_is_ordered_and_bounded(tmp_path, cifar10):
    source = CifarSource("cifar10", cifar10[0], "train")
    order = np.random.default_rng(0).permutation(len(source))
    serial = [(p, e.key) for p, e in encode_in_order(source, order, 5, workers=1, chunk=4, stop=50)]
    assert [p for p, _ in serial] == list(range(5, 50))
    parallel = encode_in_order(source, order, 5, workers=2, chunk=4, stop=50, ahead=2)
    assert [(p, e.key) for p, e in parallel] == serial
