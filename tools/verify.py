"""``rmix verify OUT/<dataset>``: re-read every shard and beton against the manifest (the full check;
loaders check only what they can in a few seconds at start)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shards.errors import ShardError
from shards.verify import verify


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="rmix verify",
        description="Re-read every shard and beton of a dataset against its manifest.json: sizes and sha256 of "
                    "every file, each .idx against the manifest and the tar, every label, and a decode of every "
                    "image. This is the full check; loaders check at start only what takes seconds.")
    p.add_argument("path", type=Path, help="OUT/<dataset> (the directory holding manifest.json)")
    p.add_argument("--sample", type=int, default=0,
                   help="decode only K random images per file (default 0: all); sizes, hashes, the .idx, keys "
                        "and labels are still checked for every sample, and tars are streamed either way")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        counts = verify(args.path, args.sample, not args.no_progress)
    except ShardError as e:
        sys.exit(f"rmix verify: {e}")
    print("rmix verify: OK " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
