"""``rmix bench remote``: reading shards by URL (:mod:`shards.remote`) against reading them from disk.

Data: an ImageNet-like set of photograph crops (``tools.photos``, 300-500 px JPEGs, quality 90),
sharded by ``rmix shards`` (webdataset + DALI index), served by ``python -m http.server`` on
127.0.0.1 in a process of its own. Rows, each the median of ``--repeats`` runs with the min-max spread:

* ``torch`` from disk, and over HTTP (shards streamed by curl through webdataset's opener, hashed as
  they pass);
* ``dali`` from disk, over HTTP with a cold cache (a fresh cache directory each run: the split is
  downloaded and verified before the reader starts) and with a warm cache (the files already there).

Each run builds the loader and reads one training epoch. Time to first batch counts from the loader's
construction (manifest fetch, start checks or downloads, worker start) to the first batch in hand;
images/s is the epoch's images over the same span to the last batch. A warm-up epoch per backend from
disk comes first (imports, DALI's first graph, the page cache); the rows then run round robin. Last,
the raw read rate (samples grouped, not decoded, one process) from disk and over HTTP.

Loopback HTTP measures the machinery (processes, pipes, hashing, the cache's copy and fsync), not a
network: over a real link the download and the first shard of each torch worker take the link's time
on top.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines import build_loader
from shards.build import ShardParams, build
from shards.manifest import load_manifest
from shards.remote import RemoteOptions, shard_checks, split_urls, stream_samples
from tools.photos import write_photo_imagefolder


def serve(root: Path) -> tuple[subprocess.Popen, str]:
    """``python -m http.server`` on 127.0.0.1 (a free port) in its own process; (process, base URL)."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    port = int(line.split(" port ")[1].split()[0])
    return proc, f"http://127.0.0.1:{port}"


def one_run(location, backend: str, batch_size: int, workers: int, remote: RemoteOptions) -> tuple[float, float, int]:
    """Build a training loader and read one epoch: (seconds to the first batch, images/s of the whole
    epoch from the loader's construction on, images)."""
    t0 = time.perf_counter()
    loader = build_loader(location, "train", backend=backend, batch_size=batch_size, train=True, device="cpu",
                          num_workers=workers, remote=remote)
    n, t1 = 0, None
    for b in loader:
        t1 = t1 or time.perf_counter()
        n += b.images.shape[0]
    t2 = time.perf_counter()
    del loader
    return t1 - t0, n / (t2 - t0), n


def raw_read(manifest: dict, remote: bool) -> float:
    """MB/s of reading the train split's raw samples (no decode) in one process: webdataset's
    ``tarfile_samples`` over the local tars, or :func:`shards.remote.stream_samples` over HTTP."""
    import webdataset as wds

    entry = manifest["splits"]["train"]["wds"]
    mb = sum(s["bytes"] for s in entry["shards"]) / 1e6
    t = time.perf_counter()
    if remote:
        n = sum(1 for _ in stream_samples(split_urls(manifest, "train"), shard_checks(manifest, "train")))
    else:
        n = sum(1 for _ in wds.tarfile_samples({"url": f"{manifest['root']}/{s['tar']}"} for s in entry["shards"]))
    assert n == manifest["splits"]["train"]["num_samples"], n
    return mb / (time.perf_counter() - t)


def row(name: str, runs: list) -> dict:
    ttfb, rate = [r[0] for r in runs], [r[1] for r in runs]
    return {"row": name, "first_batch_s": statistics.median(ttfb), "first_batch_range": [min(ttfb), max(ttfb)],
            "img_s": statistics.median(rate), "img_s_range": [min(rate), max(rate)], "images": runs[0][2]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rmix bench remote", description=__doc__.splitlines()[0])
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "rmix-bench-remote"),
                   help="data and shards (reused when complete)")
    p.add_argument("--images", type=int, default=1024, help="training images")
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["torch", "dali"], choices=["torch", "dali"])
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)

    work = Path(args.work) / f"imagenet-{args.images}-{args.samples_per_shard}"  # reused only when these match
    src = write_photo_imagefolder(work / "src", n_train=args.images, n_val=16)
    build(ShardParams(dataset="imagenet", formats=["wds"], samples_per_shard=args.samples_per_shard), src,
          work / "www", workers=args.workers, progress=False)
    local = work / "www" / "imagenet"
    manifest = json.loads((local / "manifest.json").read_text())
    mb = sum(s["bytes"] for s in manifest["splits"]["train"]["wds"]["shards"]) / 1e6
    server, base = serve(work / "www")
    url = f"{base}/imagenet/manifest.json"
    cache = work / "cache"
    plan = []  # (row name, backend, location, cold cache)
    for backend in args.backends:
        plan.append((f"{backend} local disk", backend, local, False))
        if backend == "torch":
            plan.append(("torch http (streamed)", backend, url, False))
        else:
            plan += [("dali http, cold cache", backend, url, True), ("dali http, warm cache", backend, url, False)]
    results = {name: [] for name, *_ in plan}
    try:
        for backend in args.backends:  # warm-up, not counted: imports, DALI's first graph, the page cache
            one_run(local, backend, args.batch_size, args.workers, RemoteOptions(cache_dir=str(cache)))
        for _ in range(args.repeats):  # round robin: a load that drifts during the run hits every row alike
            for name, backend, location, cold in plan:
                if cold:
                    shutil.rmtree(cache, ignore_errors=True)
                results[name].append(one_run(location, backend, args.batch_size, args.workers,
                                             RemoteOptions(cache_dir=str(cache))))
        raw = {"local": [], "http": []}
        for _ in range(args.repeats):
            raw["local"].append(raw_read(load_manifest(local), remote=False))
            raw["http"].append(raw_read(load_manifest(url), remote=True))
    finally:
        server.terminate()
        server.wait()
    rows = [row(name, runs) for name, runs in results.items()]
    print(f"{rows[0]['images']} train images in {len(manifest['splits']['train']['wds']['shards'])} shards "
          f"({mb:.1f} MB), batch {args.batch_size}, {args.workers} workers, cpu, medians of {args.repeats} (min-max)")
    print(f"{'row':<26}{'first batch s':>22}{'epoch img/s':>22}")
    for r in rows:
        lo, hi = r["first_batch_range"]
        rlo, rhi = r["img_s_range"]
        print(f"{r['row']:<26}{r['first_batch_s']:>8.2f} ({lo:.2f}-{hi:.2f}){r['img_s']:>10.0f} ({rlo:.0f}-{rhi:.0f})")
    for where, rates in raw.items():
        lo, hi = min(rates), max(rates)
        print(f"raw samples, no decode, {where:<5} {statistics.median(rates):>8.0f} MB/s ({lo:.0f}-{hi:.0f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "raw_mb_s": raw}, indent=1))


if __name__ == "__main__":
    main()
