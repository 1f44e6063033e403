"""shards/remote.py: datasets by URL -- the torch backend streaming shards over HTTP, DALI/FFCV through
the node-local cache, bounded retries, one-line errors naming the URL, the trainer on a manifest URL.

Everything runs against a local HTTP server (a ``ThreadingHTTPServer`` in a thread of this process, port
0) serving shards written by ``rmix shards``; its handler injects faults per path: ``503`` (an HTTP
error), ``cut`` (the full Content-Length announced, half the bytes sent, the connection closed),
``stall`` (half the bytes, then silence), ``corrupt`` (the right size, one byte changed) and
``member-full`` / ``member-cut`` (the bytes up to the second member of the shard's fifth sample, with
the full or the cut Content-Length announced: a transfer cut between two members of one sample).
"""

import hashlib
import json
import logging
import tarfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import write_cifar10
from pipelines import build_loader
from shards.build import ShardParams, build
from shards.errors import ShardError
from shards.manifest import load_manifest
from shards.remote import RemoteOptions, ShardCache, is_url, shard_samples, split_is_remote

FAST = dict(retries=2, retry_wait=0.05, timeout=3)  # tests: short backoff and stall timeout


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that went away mid-response (the reader killed a stalled transfer)


class _FaultyHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        with srv.lock:
            srv.hits[path] += 1
            n = srv.hits[path]
        kind, times = srv.faults.get(path, (None, 0))
        if kind is None or (0 <= times < n):
            return super().do_GET()
        if kind == "503":
            return self.send_error(503, "Service Unavailable")
        with open(self.translate_path(path), "rb") as f:
            data = f.read()
        if kind == "corrupt":
            data = data[:600] + bytes([data[600] ^ 0xFF]) + data[601:]
        if kind.startswith("member-"):
            with tarfile.open(self.translate_path(path)) as tar:
                members = tar.getmembers()
            cut = members[2 * 4 + 1].offset  # the header of sample 4's second member (.png after .cls)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data) if kind == "member-full" else cut))
            self.end_headers()
            self.wfile.write(data[:cut])
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind == "corrupt":
            self.wfile.write(data)
            return
        self.wfile.write(data[: len(data) // 2])  # cut / stall: half the announced bytes
        self.wfile.flush()
        if kind == "stall":
            srv.stop.wait(60)
        # returning closes the connection (HTTP/1.0): curl sees the transfer cut short


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """cifar10 (wds + ffcv; 100 train in 10 shards, 30 val in 3) and digits (wds) under one HTTP root."""
    tmp = tmp_path_factory.mktemp("remote")
    src, _ = write_cifar10(tmp / "src", per_batch=20, test=30)
    build(ShardParams(dataset="cifar10", samples_per_shard=10), src, tmp / "www", workers=2, progress=False)
    build(ShardParams(dataset="digits", formats=["wds"], samples_per_shard=400), None, tmp / "www", workers=2,
          progress=False)
    srv = _Server(("127.0.0.1", 0), partial(_FaultyHandler, directory=str(tmp / "www")))
    srv.faults, srv.hits, srv.lock, srv.stop = {}, Counter(), threading.Lock(), threading.Event()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.www = tmp / "www"
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()
    thread.join(10)


@pytest.fixture
def http(served):
    """The server with no faults and fresh hit counts; faults set by a test are cleared after it."""
    served.faults.clear()
    served.hits.clear()
    yield served
    served.faults.clear()


def batches(loader):
    """(labels, per-image digests) of one pass, in order."""
    labels, digests = [], []
    for b in loader:
        labels += b.labels.cpu().tolist()
        digests += [hashlib.sha1(x.float().cpu().numpy().tobytes()).hexdigest() for x in b.images]
    return labels, digests


def make(location, split="val", backend="torch", **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("train", split == "train")
    kw.setdefault("num_workers", 2)
    kw.setdefault("device", "cpu")
    return build_loader(location, split, backend=backend, **kw)


def shard_path(srv, split: str, i: int) -> str:
    """The server path of cifar10's shard ``i`` of ``split``."""
    m = json.loads((srv.www / "cifar10" / "manifest.json").read_text())
    return "/cifar10/" + m["splits"][split]["wds"]["shards"][i]["tar"]


# -- locations --------------------------------------------------------------------------------------

def test_locations(http):
    assert is_url("http://h/x/manifest.json") and is_url("pipe:cat {}") and is_url("s3://b/k")
    assert not is_url("/data/shards/cifar10") and not is_url("file:///data") and not is_url("data/x")
    for loc in (f"{http.base}/cifar10/manifest.json", f"{http.base}/cifar10/", f"{http.base}/cifar10"):
        m = load_manifest(loc)
        assert m["root"] == f"{http.base}/cifar10" and split_is_remote(m, "train", "wds")
    with pytest.raises(ShardError, match=r"^pipe:cat /x: .*needs \{\}"):
        load_manifest("pipe:cat /x")
    with pytest.raises(ShardError, match=r"^s3://b/ds/manifest.json: no reader for s3:// URLs: .*pipe:aws s3 cp") as e:
        load_manifest("s3://b/ds/")
    assert "--shard_retries" not in str(e.value) and "attempt" not in str(e.value)  # no retry can fix it
    with pytest.raises(ShardError) as e:
        load_manifest(f"{http.base}/nothing-here/manifest.json", RemoteOptions(**FAST))
    msg = str(e.value)
    assert "\n" not in msg and f"{http.base}/nothing-here/manifest.json" in msg and "404" in msg
    assert "(1 attempt, not retried" in msg and "--shard_retries" not in msg  # a 404 is not retried
    assert "--skip_failed_shards" not in msg  # the manifest is not a shard to skip
    assert http.hits["/nothing-here/manifest.json"] == 1


def test_a_url_to_a_file_is_refused_not_extended(http):
    """A shard's or beton's URL given as the dataset: one line naming the folder and manifest URLs to
    give instead, and nothing fetched (no ``.../val-000000.tar/manifest.json``)."""
    tar = f"{http.base}{shard_path(http, 'val', 0)}"
    with pytest.raises(ShardError) as e:
        load_manifest(tar, RemoteOptions(**FAST))
    msg = str(e.value)
    folder = tar.rsplit("/", 1)[0]
    assert "\n" not in msg and msg.startswith(f"{tar} names a file, not a dataset"), msg
    assert f"{folder}/manifest.json" in msg
    assert sum(http.hits.values()) == 0
    # a folder whose name has a dot is a folder when it ends with /
    with pytest.raises(ShardError, match="404"):
        load_manifest(f"{http.base}/cifar10.v2/", RemoteOptions(**FAST))


# -- torch backend: streamed by URL ---------------------------------------------------------------------

def test_torch_by_url_reads_what_it_reads_locally(http):
    local = http.www / "cifar10"
    url = f"{http.base}/cifar10/manifest.json"
    want = batches(make(local))
    got = batches(make(url))
    assert got == want and len(got[0]) == 30 and len(set(got[1])) == 30  # eval: every sample once
    # eval splits by sample: each of the 2 workers streams the rank's shards (torch_wds module header)
    assert all(http.hits[shard_path(http, "val", i)] == 2 for i in range(3))
    # training: the same seeded shard order, shuffle and augmentation over HTTP as from disk
    assert batches(make(url, "train", seed=3)) == batches(make(local, "train", seed=3))


def test_pipe_location_and_local_manifest_with_shard_urls(http, tmp_path):
    local = http.www / "cifar10"
    want = batches(make(local))
    assert batches(make(f"pipe:cat {local}/{{}}")) == want
    # a local manifest whose shards are URLs (what a user writes for presigned or scattered files)
    m = json.loads((local / "manifest.json").read_text())
    for s in m["splits"]["val"]["wds"]["shards"]:
        s["tar"], s["idx"] = f"{http.base}/cifar10/{s['tar']}", f"{http.base}/cifar10/{s['idx']}"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert batches(make(tmp_path)) == want


def test_retries_give_the_same_samples(http):
    """A shard answered 503 twice, another cut off mid-shard once: retried, the samples of the cut
    attempt are not delivered twice, and the pass equals the local one."""
    http.faults[shard_path(http, "val", 0)] = ("503", 2)
    http.faults[shard_path(http, "val", 1)] = ("cut", 1)
    want = batches(make(http.www / "cifar10"))
    # one worker, so the server's hit counts are the attempts (two would each stream the split)
    got = batches(make(f"{http.base}/cifar10/manifest.json", remote=RemoteOptions(**FAST), num_workers=1))
    assert got == want
    assert http.hits[shard_path(http, "val", 0)] == 3 and http.hits[shard_path(http, "val", 1)] == 2


@pytest.mark.parametrize("announced", ["full", "cut"])
def test_a_transfer_cut_between_the_members_of_one_sample_is_retried(http, announced):
    """The stream ends after sample 4's ``.cls`` and before its ``.png``: a valid but shorter tar, whether
    the server announced the whole file (curl fails) or only what it sent (curl succeeds). The sample is
    not handed on with a member missing; the attempt is retried and the pass equals the local one, also
    with skip_failed_shards (which must not skip what a retry mends)."""
    path = shard_path(http, "val", 1)
    http.faults[path] = (f"member-{announced}", 1)
    url = f"{http.base}{path}"
    opts = RemoteOptions(**FAST, skip_failed_shards=True)
    m = json.loads((http.www / "cifar10" / "manifest.json").read_text())
    shard = m["splits"]["val"]["wds"]["shards"][1]
    samples = list(shard_samples(url, shard["num_samples"], shard["bytes"], shard["sha256"], opts))
    assert [sorted(k for k in x if not k.startswith("__")) for x in samples] == [["cls", "png"]] * 10
    assert http.hits[path] == 2
    http.hits.clear()
    want = batches(make(http.www / "cifar10"))
    assert batches(make(f"{http.base}/cifar10/manifest.json", remote=opts, num_workers=1)) == want
    assert http.hits[path] == 2


@pytest.mark.parametrize("fault", ["cut", "stall"])
def test_a_shard_that_keeps_failing_is_one_line_naming_its_url(http, fault):
    path = shard_path(http, "val", 1)
    http.faults[path] = (fault, -1)  # every attempt
    L = make(f"{http.base}/cifar10/manifest.json", remote=RemoteOptions(**FAST), num_workers=1)
    t = time.monotonic()
    with pytest.raises(ShardError) as e:
        batches(L)
    took = time.monotonic() - t
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{http.base}{path}: ") and "(3 attempts;" in msg, msg
    assert http.hits[path] == 3
    # cut: curl's own "transfer closed" line; stall: no data for FAST's 3 s, three times
    assert ("transfer closed" in msg) if fault == "cut" else ("no data for 3 s (--shard_timeout)" in msg), msg
    assert took < (20 if fault == "stall" else 10), took


def test_skip_failed_shards_logs_each_skip(http, caplog):
    path = shard_path(http, "val", 2)
    http.faults[path] = ("503", -1)
    url = f"{http.base}{path}"
    opts = RemoteOptions(**FAST, skip_failed_shards=True)
    with caplog.at_level(logging.WARNING, logger="shards.remote"):
        assert list(shard_samples(url, 10, options=opts)) == []
    assert any(url in r.getMessage() and "skip_failed_shards" in r.getMessage() for r in caplog.records)
    # through the loader: the other shards' 20 samples, no error
    labels, _ = batches(make(f"{http.base}/cifar10/manifest.json", remote=opts))
    assert len(labels) == 20


def test_streamed_shard_with_other_bytes_fails_without_retry(http):
    path = shard_path(http, "val", 0)
    http.faults[path] = ("corrupt", -1)
    with pytest.raises(ShardError, match=r"sha256 differs .*\(1 attempt, not retried: .*; see --skip_failed_shards\)$"):
        list(shard_samples(f"{http.base}{path}", 10, sha256="0" * 64, options=RemoteOptions(**FAST)))


def test_skipping_a_shard_whose_hash_differs_says_how_many_samples_were_used(http, caplog):
    """A stream is checked at its end: with skip_failed_shards the line says how many of the shard's
    samples went on before its sha256 was known (all but the last, held back until the check)."""
    path = shard_path(http, "val", 0)
    http.faults[path] = ("corrupt", -1)
    url = f"{http.base}{path}"
    opts = RemoteOptions(**FAST, skip_failed_shards=True)
    with caplog.at_level(logging.WARNING, logger="shards.remote"):
        got = list(shard_samples(url, 10, sha256="0" * 64, options=opts))
    assert len(got) == 9
    (record,) = [r for r in caplog.records if url in r.getMessage()]
    msg = record.getMessage()
    assert "\n" not in msg and msg.startswith(f"skipping {url}: its sha256 differs"), msg
    assert "9 samples of it were used before the hash was known" in msg and "rmix verify" in msg, msg
    assert "--shard_retries" not in msg  # no retry mends another file


# -- DALI (and FFCV, memory) through the node-local cache -----------------------------------------------

def test_dali_through_the_cache_reads_what_it_reads_locally(http, tmp_path):
    pytest.importorskip("nvidia.dali")
    url = f"{http.base}/cifar10/manifest.json"
    opts = RemoteOptions(**FAST, cache_dir=str(tmp_path / "cache"))
    want = batches(make(http.www / "cifar10", backend="dali"))
    got = batches(make(url, backend="dali", remote=opts))
    assert got == want and len(got[0]) == 30 and len(set(got[1])) == 30  # eval: every sample once
    # the cache holds the split, verified; a second loader downloads nothing
    fetched = sum(http.hits.values())
    assert fetched == 1 + 3 * 2  # manifest + 3 tars + 3 .idx
    assert batches(make(url, backend="dali", remote=opts)) == want
    assert sum(http.hits.values()) == fetched + 1  # the manifest only
    cached = ShardCache(opts).dataset_dir(load_manifest(url))
    assert not list(cached.rglob("*.part*"))
    # DDP: two ranks over the cached copy split the split exactly once
    ranks = [batches(make(url, backend="dali", remote=opts, rank=r, world_size=2))[1] for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(want[1])


def test_cache_retries_and_refuses_a_corrupt_file(http, tmp_path):
    url = f"{http.base}/cifar10/manifest.json"
    m = load_manifest(url)
    http.faults[shard_path(http, "val", 0)] = ("cut", 1)
    http.faults[shard_path(http, "val", 2)] = ("corrupt", -1)
    opts = RemoteOptions(**FAST, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ShardError) as e:
        ShardCache(opts).localise(m, "val", "wds")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{http.base}{shard_path(http, 'val', 2)}: ") and "sha256" in msg, msg
    root = ShardCache(opts).dataset_dir(m)
    assert not (root / m["splits"]["val"]["wds"]["shards"][2]["tar"]).exists()  # never renamed into place
    assert not list(root.rglob("*.part*"))
    # with skip_failed_shards the copy drops the shard (logged) and the loader reads the other 20
    skip = RemoteOptions(**FAST, cache_dir=str(tmp_path / "cache"), skip_failed_shards=True)
    local = ShardCache(skip).localise(m, "val", "wds")
    assert local["splits"]["val"]["num_samples"] == 20 and len(local["splits"]["val"]["wds"]["shards"]) == 2
    assert http.hits[shard_path(http, "val", 0)] == 2  # cut once, then downloaded


def test_ranks_of_a_node_download_each_file_once(http, tmp_path):
    """Three loaders of one node filling one cache at once (the ranks of a DDP job): a lock per file,
    so each file is fetched once and every rank gets the same local copy."""
    m = load_manifest(f"{http.base}/cifar10/manifest.json")
    opts = RemoteOptions(**FAST, cache_dir=str(tmp_path / "cache"))
    with ThreadPoolExecutor(3) as pool:
        copies = list(pool.map(lambda _: ShardCache(opts).localise(m, "train", "wds"), range(3)))
    assert copies[0] == copies[1] == copies[2]
    assert [http.hits[shard_path(http, "train", i)] for i in range(10)] == [1] * 10


def test_cache_bound_evicts_other_datasets(http, tmp_path):
    cache = tmp_path / "cache"
    stale = cache / "other-0123456789abcdef"
    stale.mkdir(parents=True)
    (stale / "big.tar").write_bytes(b"\0" * 400_000)
    m = load_manifest(f"{http.base}/cifar10/manifest.json")
    need = sum(s["bytes"] + s["idx_bytes"] for s in m["splits"]["val"]["wds"]["shards"])
    fits = RemoteOptions(**FAST, cache_dir=str(cache), cache_max_gb=(need + 100_000) / 1e9)
    ShardCache(fits).localise(m, "val", "wds")
    assert not stale.exists()
    too_small = RemoteOptions(**FAST, cache_dir=str(tmp_path / "c2"), cache_max_gb=need / 2e9)
    with pytest.raises(ShardError, match="shard_cache_max_gb") as e:
        ShardCache(too_small).localise(m, "val", "wds")
    # sizes in a unit that shows them: the split's ~130 KB against a ~65 KB limit, not "0.00 GB"
    assert f"needs {need / 1e3:.1f} KB for this split (limit {int(need / 2) / 1e3:.1f} KB," in str(e.value), str(e.value)


def test_ffcv_and_memory_through_the_cache(http, tmp_path):
    url = f"{http.base}/cifar10/manifest.json"
    opts = RemoteOptions(**FAST, cache_dir=str(tmp_path / "cache"))
    assert batches(make(url, backend="memory", remote=opts)) == batches(make(http.www / "cifar10", backend="memory"))
    # the beton is one file: downloaded and verified whole, then FFCV maps it as a local file
    local = ShardCache(opts).localise(load_manifest(url), "val", "ffcv")
    entry = local["splits"]["val"]["ffcv"]
    assert hashlib.sha256((Path(local["root"]) / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]
    pytest.importorskip("ffcv")
    got = make(url, backend="ffcv", remote=opts)
    assert got.manifest["root"] == local["root"] and len(batches(got)[0]) == 30


# -- the trainer ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_trainer_on_a_manifest_url(http, tmp_path, loader):
    """``--data_dir http://.../manifest.json``: one epoch, the same losses and accuracy as from disk."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    from trainers.classify import run
    from trainers.config import TrainConfig

    def train(data_dir, name):
        return run(TrainConfig(name=name, data="digits", data_dir=data_dir, save_dir=str(tmp_path), model_file="small",
                               model_name="small_cnn", epoch=1, batch_size=100, lr=0.05, print_freq=1000, num_workers=2,
                               aug="recursive_mix", random_seed=1, loader=loader, device="cpu", progress=False,
                               shard_retry_wait=0.05, shard_cache=str(tmp_path / "cache")).validate())

    remote = train(f"{http.base}/digits/manifest.json", "url")
    local = train(str(http.www / "digits"), "local")
    keys = ("train_loss", "roi_loss", "val_acc1", "val_acc5")
    assert {k: remote[k] for k in keys} == {k: local[k] for k in keys}
    saved = json.loads((tmp_path / "digits" / "url" / "config.json").read_text())
    assert saved["data_dir"] == f"{http.base}/digits/manifest.json" and saved["shard_retries"] == 3
