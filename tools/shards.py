"""``rmix shards`` / ``make shards``: the command line of :func:`shards.build.build`;
``rmix shards merge OUT/<dataset>``: of :func:`shards.build.merge` (the parts of ``--part K/N`` jobs)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from shards.build import DATASETS, FORMATS, ShardParams, build, merge
from shards.errors import ShardError
from shards.ffcv_writer import WRITE_MODES

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'1GB' -> 10**9, '512MiB' -> 2**29, '4096' -> 4096."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 1GB, 500MB, 64MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        items = ["val" if t == "test" else t for t in items]  # CIFAR users say test
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rmix shards", description="Write webdataset (+ DALI .idx) and FFCV shards with a manifest.",
        epilog="Across machines: run the same command with --part K/N on each (K = 0..N-1), then "
               "`rmix shards merge OUT/<dataset>` once, where all parts' files are.")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--src", type=Path, help="dataset directory (CIFAR dir or its parent; ImageNet root with train/ val/); not for digits")
    p.add_argument("--out", type=Path, required=True, help="output root; shards go to OUT/<dataset>/")
    p.add_argument("--formats", type=_csv(FORMATS), default=list(FORMATS), help="comma list of wds,ffcv (default both)")
    p.add_argument("--split", type=_csv(("train", "val")), default=["train", "val"], help="comma list of train,val")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="cut shards by sample count")
    size.add_argument("--shard-bytes", type=parse_size, help="cut shards by size (default 1GB)")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (default 0: all cores)")
    p.add_argument("--max-side", type=int, help="imagenet only: resize images whose longer side exceeds this (>= 1)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 of re-encoded images")
    p.add_argument("--seed", type=int, default=0, help="seed (>= 0) of the write-time shuffle and of the images "
                   "FFCV's 'proportion' mode compresses")
    p.add_argument("--ffcv-write-mode", choices=WRITE_MODES, help="default: raw for CIFAR/digits, proportion for ImageNet")
    p.add_argument("--ffcv-max-resolution", type=int, help="longer side of images in the beton (>= 1)")
    p.add_argument("--ffcv-compress-probability", type=float, default=0.5, help="in [0, 1]")
    p.add_argument("--part", metavar="K/N", help="write only part K (0..N-1) of N of the webdataset shards "
                   "(needs --samples-per-shard and --formats wds); then `rmix shards merge OUT/<dataset>`")
    p.add_argument("--no-progress", action="store_true")
    return p


def merge_main(argv) -> None:
    p = argparse.ArgumentParser(
        prog="rmix shards merge", description="Check the parts of an `rmix shards --part K/N` job and write its manifest.")
    p.add_argument("root", type=Path, help="OUT/<dataset>, holding every part's wds/ and parts/ files")
    args = p.parse_args(argv)
    try:
        manifest = merge(args.root)
    except ShardError as e:
        sys.exit(f"rmix shards merge: {e}")
    total = sum(s["num_samples"] for s in manifest["splits"].values())
    shards = sum(len(s.get("wds", {}).get("shards", [])) for s in manifest["splits"].values())
    print(f"rmix shards merge: {args.root}/manifest.json: {total} samples in {shards} shards")


def _attach_part_value(argv: list) -> list:
    """``--part -1/2`` as ``--part=-1/2``: argparse takes a value that starts with ``-`` for a flag and
    stops with "expected one argument"; attached, the value reaches :func:`shards.build.parse_part`,
    whose one line says what K/N must be."""
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "--part" and out[i + 1].startswith("-"):
            out[i : i + 2] = [f"--part={out[i + 1]}"]
            break
    return out


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return merge_main(argv[1:])
    args = parser().parse_args(_attach_part_value(argv))
    params = ShardParams(
        dataset=args.dataset, splits=args.split, formats=args.formats,
        samples_per_shard=args.samples_per_shard, shard_bytes=args.shard_bytes, max_side=args.max_side,
        quality=args.quality, seed=args.seed, ffcv_write_mode=args.ffcv_write_mode,
        ffcv_max_resolution=args.ffcv_max_resolution, ffcv_compress_probability=args.ffcv_compress_probability,
    )
    try:  # every flag is checked by build() (ShardParams.validate), so library callers get the same checks
        manifest = build(params, args.src, args.out, workers=args.workers, progress=not args.no_progress,
                         part=args.part)
    except ShardError as e:
        sys.exit(f"rmix shards: {e}")
    except KeyboardInterrupt:
        sys.exit("rmix shards: interrupted; rerun the same command to resume")
    if "part" in manifest:
        k, n = manifest["part"]
        shards = sum(len(s["shards"]) for s in manifest["splits"].values())
        print(f"rmix shards: part {k}/{n}: {shards} shards in {args.out / args.dataset}/wds, "
              f"{manifest.get('seconds', 0):.1f} s; when all {n} are done: rmix shards merge {args.out / args.dataset}")
        return
    total = sum(s["num_samples"] for s in manifest["splits"].values())
    rej = sum(s["rejected"] for s in manifest["splits"].values())
    print(f"rmix shards: {args.out / args.dataset}/manifest.json: {total} samples, {rej} rejected, "
          f"{manifest.get('seconds', 0):.1f} s")


if __name__ == "__main__":
    main()
