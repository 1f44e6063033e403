"""Shards by URL: a dataset whose ``manifest.json`` or files are on an HTTP server or in object storage.

Locations (``--data_dir``, the first argument of ``build_loader``, :func:`shards.manifest.load_manifest`):

* a local folder or ``manifest.json``, as always; any file entry in it (a shard's ``tar`` and ``idx``,
  the beton's ``path``) may itself be a URL of the forms below;
* ``http(s)://host/dir/manifest.json`` or the folder URL ``http(s)://host/dir/``: each file is
  ``http(s)://host/dir/<its path in the manifest>``, read with ``curl``;
* ``pipe:CMD`` with ``{}`` where a file's path goes, e.g. ``pipe:aws s3 cp s3://bucket/cifar10/{} -``:
  each file is the standard output of CMD (webdataset's ``pipe:`` idiom). A mounted bucket
  (mountpoint-s3, s3fs, gcsfuse) is a local folder and needs none of this.

How each backend reads them:

* ``torch`` streams every shard from its URL through webdataset's own opener and tar iterators
  (:func:`shard_samples`: ``webdataset.gopen`` -- a ``curl`` ``gopen.Pipe`` for http(s), ``gopen.gopen``
  for ``pipe:`` and webdataset's other schemes -- then ``tariterators.tar_file_expander`` and
  ``group_by_keys``, the stages of ``wds.tarfile_samples``). Nothing is written to disk.
* ``dali``, ``memory`` and ``ffcv`` read local files (DALI reads each sample at the offset its ``.idx``
  lists; FFCV maps the beton): :class:`ShardCache` downloads the split's files into a node-local cache
  directory before the loader is built, each checked against the manifest's size and sha256 and
  renamed into place only then; the loader then runs unchanged on the copies, start checks included.
  The ranks of one node share the cache (a lock per file: each file is downloaded once, by whichever
  rank gets to it first) and a later run finds the files there.

Integrity. A streamed shard is hashed as it passes: at its end the byte count, sha256 and sample count
must be the manifest's. A short stream is a failed attempt and retried: a transfer cut off at a member
boundary leaves a valid but shorter tar, and a sample is handed on only once it is known whole (the next
sample has begun, or the stream has passed its checks), so a cut between two members of one sample
never gives a sample with members missing. A complete stream with other bytes is not retried (the
server holds another file) and fails the run. Its samples before the last have reached the consumer by
then: a stream is checked at its end, so reading integrity-first means the node-local cache of the
dali, memory and ffcv backends (every file checked before a loader sees it) or ``rmix verify`` where
the files are written. A cached file must match before it is renamed into place.

Retries (:class:`RemoteOptions`, trainer flags ``--shard_retries`` etc.). An attempt that fails -- no
connection, an HTTP 5xx/408/429, a transfer cut off mid-shard, no data for ``timeout`` seconds, a
command that exits non-zero -- is retried up to ``retries`` times after ``retry_wait`` seconds, doubled
each time (at most 60). A retry reads the shard from its start and skips, without decoding, the
samples the failed attempt already delivered, so the epoch's samples are exactly those of a clean
read. HTTP 4xx (other than 408/429) is not retried. Then the shard fails the run with one
:class:`ShardError` line naming its URL and the last cause -- unless ``skip_failed_shards`` is set,
which logs each skipped shard (``logging`` WARNING, ``shards.remote``) and goes on: the samples it
delivered before failing stay in the epoch (the line says how many; for a shard whose hash differs,
how many were used before the hash was known), the rest of it is missing. A URL that no attempt can
read (a scheme without a reader, no ``curl``) is a setup error: one line, never retried nor skipped.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import select
import shlex
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union
from urllib.parse import quote, urlparse

from .errors import ShardError
from .manifest import MANIFEST, parse_manifest
from .reader import split_entry

log = logging.getLogger(__name__)

CACHE_ENV = "RMIX_SHARD_CACHE"
MAX_WAIT = 60.0  # seconds: the longest backoff between two attempts
CHUNK = 1 << 20
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HTTP_STATUS = re.compile(r"error:? (\d{3})")


def default_cache_dir() -> str:
    """``$RMIX_SHARD_CACHE``, else ``~/.cache/rmix/shards``: point it at a node-local disk."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "rmix", "shards")


@dataclass(frozen=True)
class RemoteOptions:
    """How files named by URL are read; each field is a trainer flag (in brackets)."""

    retries: int = 3  # attempts after the first before a shard fails the run [--shard_retries]
    retry_wait: float = 1.0  # seconds before the first retry, doubled for each next [--shard_retry_wait]
    timeout: float = 60.0  # an attempt fails after this long waiting for a byte [--shard_timeout]
    skip_failed_shards: bool = False  # log and skip a shard that still fails [--skip_failed_shards]
    cache_dir: str = ""  # dali/ffcv/memory: node-local cache; "" = default_cache_dir() [--shard_cache]
    cache_max_gb: float = 0.0  # evict other datasets' files above this size; 0 = no limit [--shard_cache_max_gb]
    parallel: int = 4  # concurrent downloads into the cache

    def __post_init__(self):
        for name, ok, rule in (("retries", self.retries >= 0, ">= 0"), ("retry_wait", self.retry_wait >= 0, ">= 0"),
                               ("timeout", self.timeout > 0, "> 0"), ("cache_max_gb", self.cache_max_gb >= 0, ">= 0"),
                               ("parallel", self.parallel >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"RemoteOptions.{name} must be {rule}, got {getattr(self, name)}")

    def wait(self, attempt: int) -> float:
        """Seconds to sleep before retry number ``attempt`` (1, 2, ...)."""
        return min(self.retry_wait * 2 ** (attempt - 1), MAX_WAIT)


def format_bytes(n: int) -> str:
    """A byte count in the largest decimal unit that keeps it >= 1: ``1.4 MB``, ``512.0 KB``, ``90 B``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# -- locations ----------------------------------------------------------------------------------

def is_url(location: Union[str, Path]) -> bool:
    """True for ``scheme://...`` (except ``file://``) and ``pipe:...``: what is read by :mod:`shards.remote`."""
    s = str(location)
    return s.startswith("pipe:") or (bool(_SCHEME.match(s)) and not s.startswith("file://"))


def file_url(manifest: dict, rel: str) -> str:
    """Where a file named in the manifest is: ``rel`` itself when it is a URL, else ``rel`` under the
    manifest's ``root`` (a folder, a base URL, or a ``pipe:`` command with ``{}``)."""
    if is_url(rel):
        return rel
    root = manifest["root"]
    if root.startswith("pipe:"):
        return root.replace("{}", shlex.quote(rel))
    if is_url(root):
        return root.rstrip("/") + "/" + quote(rel)
    return os.path.join(root, rel)


def split_is_remote(manifest: dict, split: str, fmt: str) -> bool:
    """Whether the files of ``split`` in ``fmt`` ('wds' or 'ffcv') are read by URL."""
    if is_url(manifest["root"]):
        return True
    entry = manifest["splits"].get(split, {})
    if fmt == "ffcv":
        return "ffcv" in entry and is_url(entry["ffcv"]["path"])
    return "wds" in entry and any(is_url(s["tar"]) or is_url(s["idx"]) for s in entry["wds"]["shards"])


def _wds_entry(manifest: dict, split: str) -> dict:
    entry = split_entry(manifest, split)
    if "wds" not in entry:
        raise ShardError(f"{manifest['root']} has no wds files for split {split!r}; rerun `rmix shards --formats wds`")
    return entry["wds"]


def split_urls(manifest: dict, split: str) -> list[str]:
    """The URLs of the webdataset shards of ``split``, in manifest order."""
    return [file_url(manifest, s["tar"]) for s in _wds_entry(manifest, split)["shards"]]


def shard_checks(manifest: dict, split: str) -> list[tuple[int, int, str]]:
    """(samples, bytes, sha256) of each shard of ``split``: what a streamed shard is checked against."""
    shards = _wds_entry(manifest, split)["shards"]
    return [(int(s["num_samples"]), int(s["bytes"]), s.get("sha256", "")) for s in shards]


def _manifest_location(location: str) -> tuple[str, str]:
    """(root, URL of manifest.json) of a location."""
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise ShardError(f"{location}: a pipe: location needs {{}} where each file's path goes, "
                             f"e.g. 'pipe:aws s3 cp s3://bucket/cifar10/{{}} -'")
        return location, location.replace("{}", MANIFEST)
    u = urlparse(location)
    if u.path.endswith(".json"):  # the manifest itself (a query string, if any, is its alone)
        return f"{u.scheme}://{u.netloc}{u.path.rsplit('/', 1)[0]}", location
    name = u.path.rsplit("/", 1)[-1]
    if "." in name.strip("."):  # a file (a shard, a beton, an archive): never a folder to append to
        folder = f"{u.scheme}://{u.netloc}{u.path.rsplit('/', 1)[0]}"
        raise ShardError(f"{location} names a file, not a dataset: give the folder that holds {MANIFEST} "
                         f"({folder}/) or the manifest itself ({folder}/{MANIFEST}); a folder whose name has a "
                         f"dot is given with a trailing /")
    return location.rstrip("/"), location.rstrip("/") + "/" + MANIFEST


def load_manifest_url(location: str, options: Optional[RemoteOptions] = None) -> dict:
    """The manifest at a URL location (module header), fetched with retries; ``root`` is the base
    every relative file name is read from."""
    options = options or RemoteOptions()
    root, url = _manifest_location(location)
    manifest = parse_manifest(fetch_bytes(url, options), url)
    manifest["root"] = root
    return manifest


# -- one read of a URL ----------------------------------------------------------------------------

class _Permanent(Exception):
    """A failure that a retry would repeat (the file's content, a 404, a full disk)."""


class _Mismatch(_Permanent):
    """A complete stream whose size, sha256 or sample count is not the manifest's: known only at its end."""


class _Stalled(OSError):
    """No byte arrived for ``timeout`` seconds while the reader waited for one."""


def _curl_args(url: str, timeout: float) -> list[str]:
    # no --retry: retries are ours (bounded, and a retry must not append a second copy to the stream);
    # no --speed-limit: curl's own stall check also fires while the consumer is busy and the pipe is
    # full, and takes ~6 s longer than asked; _Attempt.read times only the waits for data instead
    return ["curl", "--silent", "--show-error", "--fail", "--location", "--connect-timeout",
            str(max(1, round(timeout))), url]


class _Attempt:
    """One read of a URL from its start with webdataset's opener; the bytes are counted and hashed
    as they pass (a file-like object for ``tarfile``).

    The command's output is read unbuffered, one ``read`` per call (``tarfile`` asks for 10 KiB records
    and takes short reads), after a ``select`` that waits at most ``timeout`` seconds for data: a
    stalled server or command fails the attempt, while a consumer that stops reading for a while (a
    DataLoader worker with a full queue) is never timed.
    """

    def __init__(self, url: str, timeout: float):
        from webdataset.gopen import Pipe, gopen, gopen_schemes

        self.url, self.timeout, self.nbytes, self.sha = url, timeout, 0, hashlib.sha256()
        scheme = urlparse(url).scheme
        if scheme and not url.startswith("pipe:") and scheme not in gopen_schemes:
            raise _Permanent(f"no reader for {scheme}:// URLs: give a command instead, e.g. "
                             f"'pipe:aws s3 cp s3://bucket/dir/{{}} -' as --data_dir, or mount the bucket")
        if scheme in ("http", "https"):
            if shutil.which("curl") is None:
                raise _Permanent("reading http(s) shards needs curl on PATH")
            # webdataset's gopen_curl, without its 30 built-in retries, with the command's message kept
            self.pipe = Pipe(_curl_args(url, timeout), mode="rb", bufsize=0, ignore_status=[141, 23],
                             stderr=subprocess.PIPE)
        elif url.startswith("pipe:"):
            # webdataset's gopen_pipe, in a session of its own: a stalled command is killed with its shell
            self.pipe = Pipe(url[5:], mode="rb", shell=True, bufsize=0, ignore_status=[141], start_new_session=True)
        else:  # gs://, ais://, hf://, ...: webdataset's own handler for the scheme
            self.pipe = gopen(url, "rb", bufsize=0)
        self.proc = getattr(self.pipe, "proc", None)
        self.stream = getattr(self.pipe, "stream", self.pipe)  # a Pipe's output; a local file as it is

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        if self.proc is not None and not select.select([self.stream], [], [], self.timeout)[0]:
            raise _Stalled(f"no data for {self.timeout:g} s (--shard_timeout)")
        data = self.stream.read(n)
        self.sha.update(data)
        self.nbytes += len(data)
        return data

    def finish(self, nbytes: int = 0, sha256: str = "") -> None:
        """Read to the end (a tar's zero blocks after its last member) and wait for the command; then
        the manifest's size and checksum, when given, must match."""
        while self.read(CHUNK):
            pass
        self.pipe.close()  # a command that failed raises here (webdataset's Pipe checks its exit status)
        if nbytes and self.nbytes < nbytes:
            raise OSError(f"the transfer ended after {self.nbytes} of {nbytes} bytes")
        if nbytes and self.nbytes != nbytes:
            raise _Mismatch(f"{self.nbytes} bytes, the manifest says {nbytes}")
        if sha256 and self.sha.hexdigest() != sha256:
            raise _Mismatch("its sha256 differs from the manifest's (another file at this URL?)")

    def close(self) -> None:
        """End the attempt: stop the command if it still runs (a consumer that stopped early, a failed
        attempt) and reap it. Called after :meth:`finish` or :meth:`failure`, always; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                if self.url.startswith("pipe:"):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the shell and the command it runs
                else:
                    self.proc.kill()
            except ProcessLookupError:  # exited meanwhile
                pass
        try:
            self.pipe.close()
        except Exception:  # noqa: BLE001 -- a killed command's exit status is expected
            pass
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def failure(self, exn: BaseException) -> tuple[str, bool]:
        """(one-line cause, permanent) of a failed attempt: the command's own message when it gave one."""
        detail = str(exn.args[0]).split(" @ ")[0] if exn.args else ""  # webdataset appends " @ <stream>"
        if isinstance(exn, (_Permanent, _Stalled)):
            return detail, isinstance(exn, _Permanent)
        if self.proc is not None:
            try:  # the tar reader may see the end of the stream just before the command exits
                status = self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                status = None
            message = ""
            if self.proc.stderr is not None and status is not None:
                lines = self.proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
                message = lines[-1] if lines else ""
            if status not in (None, 0, 141, 23):
                m = _HTTP_STATUS.search(message)
                code = int(m.group(1)) if m else 0
                permanent = 400 <= code < 500 and code not in (408, 429)
                return message or f"the command exited with status {status}", permanent
        return f"{type(exn).__name__}: {detail}" if detail else type(exn).__name__, False


def _tries(attempt: int) -> str:
    return f"{attempt} attempt{'s' if attempt > 1 else ''}"


def _give_up(url: str, attempt: int, cause: str, permanent: bool, options: RemoteOptions,
             skippable: bool = True) -> Optional[str]:
    """After failed attempt number ``attempt``: sleep and return None to retry, or the one-line
    message when there is no retry left. The advice names only the flags that could change the
    outcome: ``--shard_retries`` where another attempt could succeed, ``--skip_failed_shards`` where a
    shard (not the manifest) failed."""
    if permanent or attempt > options.retries:
        if permanent:
            note = f"{_tries(attempt)}, not retried: another attempt would get the same answer"
            flags = ["--skip_failed_shards"] if skippable else []
        else:
            note = _tries(attempt)
            flags = ["--shard_retries"] + (["--skip_failed_shards"] if skippable else [])
        return f"{url}: {cause} ({note}" + (f"; see {', '.join(flags)})" if flags else ")")
    time.sleep(options.wait(attempt))
    return None


class _Unreadable(ShardError):
    """A URL that no attempt can read (no handler for its scheme, no curl): a setup error, never
    retried nor skipped."""


def _failed(dl: Optional["_Attempt"], exn: Exception, url: str) -> tuple[str, bool]:
    """(cause, permanent) of a failed attempt, the attempt ended; a URL that no attempt can read
    raises :class:`_Unreadable` instead."""
    if dl is None:
        if isinstance(exn, _Permanent):
            raise _Unreadable(f"{url}: {exn.args[0] if exn.args else type(exn).__name__}") from None
        return str(exn), True
    cause = dl.failure(exn)
    dl.close()  # before the backoff sleep
    return cause


def fetch_bytes(url: str, options: Optional[RemoteOptions] = None) -> bytes:
    """The whole content of a (small) file by URL, with the retries of ``options``."""
    options = options or RemoteOptions()
    attempt = 0
    while True:
        attempt += 1
        dl = None
        try:
            dl = _Attempt(url, options.timeout)
            chunks = []
            while chunk := dl.read(CHUNK):
                chunks.append(chunk)
            dl.finish()
            return b"".join(chunks)
        except Exception as e:  # noqa: BLE001 -- every failure is retried or named in one line
            cause, permanent = _failed(dl, e, url)
            message = _give_up(url, attempt, cause, permanent, options, skippable=False)
            if message:
                raise ShardError(message) from None
        finally:
            if dl is not None:
                dl.close()


# -- streamed shards (torch backend) ----------------------------------------------------------------

def shard_samples(url: str, num_samples: int = 0, nbytes: int = 0, sha256: str = "",
                  options: Optional[RemoteOptions] = None) -> Iterator[dict]:
    """The raw webdataset samples (``{"__key__", "__url__", ext: bytes}``) of the shard at ``url``, as
    ``wds.tarfile_samples`` gives them, checked against the manifest's sample count, size and sha256
    and retried (module header).

    A sample leaves only once it is known complete: when the next sample's first member has arrived,
    or, for the last one, when the stream has ended with the manifest's size and sha256. A stream cut
    between two members of one sample ends like a valid shorter tar, and ``group_by_keys`` would give
    that sample with members missing; held back, it is read again by the retry instead."""
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import group_by_keys, tar_file_expander

    options = options or RemoteOptions()
    done, attempt = 0, 0  # samples delivered so far (a retry skips them), attempts made
    while True:
        attempt += 1
        dl = None
        try:
            dl = _Attempt(url, options.timeout)
            files = tar_file_expander([{"url": url, "stream": dl}], handler=reraise_exception)
            seen, last = 0, None  # samples read in this attempt; the last one, not yet known complete
            for sample in group_by_keys(files, handler=reraise_exception):
                if last is not None:  # this sample began, so the one before it is whole
                    done = seen
                    yield last
                seen += 1
                last = sample if seen > done else None
            dl.finish(nbytes, sha256)
            if num_samples and seen != num_samples:
                raise _Mismatch(f"{seen} samples, the manifest says {num_samples}")
            if last is not None:
                done = seen
                yield last
            return
        except Exception as e:  # noqa: BLE001 -- every failure is retried or named in one line
            cause, permanent = _failed(dl, e, url)
            message = _give_up(url, attempt, cause, permanent, options)
            if message and options.skip_failed_shards:
                if isinstance(e, _Mismatch):
                    fate = (f"{done} samples of it were used before the hash was known (a streamed shard is "
                            f"checked at its end; to check first, `rmix verify` the files or read them through "
                            f"--shard_cache with --loader dali, memory or ffcv)")
                else:
                    rest = f", the other {num_samples - done} are missing" if num_samples else ""
                    fate = f"the {done} samples read before it failed stay in this epoch{rest}"
                log.warning("skipping %s: %s (%s; --skip_failed_shards); %s", url, cause, _tries(attempt), fate)
                return
            if message:
                raise ShardError(message) from None
        finally:  # also when the consumer stops early (a training quota): end the transfer
            if dl is not None:
                dl.close()


def stream_samples(urls: Iterable[str], checks: Iterable[tuple[int, int, str]],
                   options: Optional[RemoteOptions] = None) -> Iterator[dict]:
    """The samples of several shards in turn (:func:`shard_samples` of each ``(url, check)``)."""
    for url, (num_samples, nbytes, sha256) in zip(urls, checks):
        yield from shard_samples(url, num_samples, nbytes, sha256, options)


# -- node-local cache (dali, ffcv, memory backends) -------------------------------------------------

def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:  # removed meanwhile by another process
                pass
    return total


class ShardCache:
    """A node-local directory of a dataset's downloaded files, for the loaders that read local files.

    Layout: ``<cache_dir>/<dataset>-<hash of the manifest>/<the manifest's relative paths>`` (a file
    named by an absolute URL becomes ``<split>/<field>-<index>.<ext>``); a changed manifest gets a new
    folder, so a stale copy is never read. A file appears under its name only complete and verified
    (downloaded to ``.part`` then renamed); a hit is checked by size.
    """

    def __init__(self, options: Optional[RemoteOptions] = None):
        self.options = options or RemoteOptions()
        self.dir = Path(self.options.cache_dir or default_cache_dir())

    def dataset_dir(self, manifest: dict) -> Path:
        body = {k: v for k, v in manifest.items() if k != "root"}
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
        return self.dir / f"{manifest.get('dataset', 'data')}-{key}"

    def localise(self, manifest: dict, split: str, fmt: str) -> dict:
        """A copy of ``manifest`` whose ``split`` files in ``fmt`` are local copies in the cache,
        downloaded now unless already there: the manifest to hand the loader. With
        ``skip_failed_shards`` a shard that cannot be downloaded is dropped from the copy (logged)."""
        entry = split_entry(manifest, split)
        if fmt not in entry:
            raise ShardError(f"{manifest['root']} has no {fmt} files for split {split!r}; "
                             f"rerun `rmix shards --formats {fmt}`")
        root = self.dataset_dir(manifest)
        local = copy.deepcopy(manifest)
        local["root"], local["source"] = str(root), manifest["root"]
        lentry = local["splits"][split]
        jobs = []  # (url, local relative path, bytes, sha256, shard index or None)
        if fmt == "ffcv":
            e = lentry["ffcv"]
            rel = self._local_name(split, "ffcv", 0, e["path"], ".beton")
            jobs.append((file_url(manifest, e["path"]), rel, int(e["bytes"]), e.get("sha256", ""), None))
            e["path"] = rel
        else:
            for i, s in enumerate(lentry["wds"]["shards"]):
                tar = self._local_name(split, "tar", i, s["tar"], ".tar")
                idx = self._local_name(split, "idx", i, s["idx"], ".idx")
                jobs.append((file_url(manifest, s["tar"]), tar, int(s["bytes"]), s.get("sha256", ""), i))
                jobs.append((file_url(manifest, s["idx"]), idx, int(s.get("idx_bytes", 0)), s.get("idx_sha256", ""), i))
                s["tar"], s["idx"] = tar, idx
        failed = self._fill(root, jobs)
        if failed:
            if fmt == "ffcv":
                raise ShardError(failed[0][1])
            for i, message in failed:
                log.warning("skipping %s (skip_failed_shards)", message)
            bad = {i for i, _ in failed}
            shards = lentry["wds"]["shards"]
            lentry["wds"]["shards"] = [s for i, s in enumerate(shards) if i not in bad]
            lentry["num_samples"] = sum(int(s["num_samples"]) for s in lentry["wds"]["shards"])
        return local

    @staticmethod
    def _local_name(split: str, field: str, index: int, rel: str, ext: str) -> str:
        if not is_url(rel) and not os.path.isabs(rel) and ".." not in Path(rel).parts:
            return rel
        return f"{split}/{field}-{index:06d}{ext}"

    def _fill(self, root: Path, jobs: list) -> list[tuple[Optional[int], str]]:
        """Download the files of ``jobs`` that are not in ``root`` yet, ``parallel`` at a time; return
        the (shard index, message) of the ones that failed when skipping, else raise the first."""
        root.mkdir(parents=True, exist_ok=True)
        (root / ".used").touch()  # the dataset's last use, for eviction
        missing = [j for j in jobs if not self._present(root / j[1], j[2])]
        if not missing:
            return []
        self._make_room(root, sum(j[2] for j in missing))
        # each process starts at another file, so the ranks of a node download different files at once
        random.Random(os.getpid()).shuffle(missing)
        failed = []
        with ThreadPoolExecutor(self.options.parallel) as pool:
            futures = [(j, pool.submit(self._download, j[0], root / j[1], j[2], j[3], j[4] is not None))
                       for j in missing]
            for job, fut in futures:
                try:
                    fut.result()
                except ShardError as e:
                    if not self.options.skip_failed_shards or job[4] is None or isinstance(e, _Unreadable):
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
                    failed.append((job[4], str(e)))
        return failed

    @staticmethod
    def _present(path: Path, nbytes: int) -> bool:
        try:
            return path.is_file() and (not nbytes or path.stat().st_size == nbytes)
        except OSError:
            return False

    def _download(self, url: str, dest: Path, nbytes: int, sha256: str, skippable: bool = False) -> None:
        """One file into the cache: under a per-file lock (another process may be fetching it), to a
        ``.part`` name, checked, then renamed; retried as a streamed shard is. ``skippable``: a shard's
        file that ``skip_failed_shards`` may drop (its error line then names that flag)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{dest}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if self._present(dest, nbytes):
                return  # another rank of this node fetched it while we waited
            tmp = dest.with_name(f"{dest.name}.part{os.getpid()}")
            attempt = 0
            while True:
                attempt += 1
                dl = None
                try:
                    dl = _Attempt(url, self.options.timeout)
                    with open(tmp, "wb") as f:
                        while chunk := dl.read(CHUNK):
                            try:
                                f.write(chunk)
                            except OSError as e:
                                raise _Permanent(f"cannot write {tmp}: {e.strerror}") from None
                        dl.finish(nbytes, sha256)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, dest)
                    return
                except Exception as e:  # noqa: BLE001 -- every failure is retried or named in one line
                    cause, permanent = _failed(dl, e, url)
                    message = _give_up(url, attempt, cause, permanent, self.options, skippable=skippable)
                    if message:
                        raise ShardError(message) from None
                finally:
                    if dl is not None:
                        dl.close()
                    tmp.unlink(missing_ok=True)

    def _make_room(self, root: Path, need: int) -> None:
        """With ``cache_max_gb``: remove other datasets' folders, least recently used first, until
        ``need`` more bytes fit; a dataset that cannot fit is one error line."""
        limit = int(self.options.cache_max_gb * 1e9)
        if not limit:
            return
        used = _dir_bytes(self.dir)
        others = sorted((d for d in self.dir.iterdir() if d.is_dir() and d != root),
                        key=lambda d: (d / ".used").stat().st_mtime if (d / ".used").exists() else 0.0)
        for d in others:
            if used + need <= limit:
                return
            used -= _dir_bytes(d)
            log.info("shard cache: evicting %s", d)
            shutil.rmtree(d, ignore_errors=True)
        if used + need > limit:
            raise ShardError(f"the shard cache {self.dir} needs {format_bytes(used + need)} for this split "
                             f"(limit {format_bytes(limit)}, --shard_cache_max_gb {self.options.cache_max_gb:g}): "
                             f"raise the limit or point --shard_cache at a larger node-local disk")
