"""A lost peer ends the run within a bounded time, with one line naming the rank (and node) that was lost.

Every collective waits at most ``--dist_timeout`` seconds (``init_process_group(timeout=...)``): gloo
raises at once when a peer's connection closes (its process died) and after the timeout when the peer
hangs (a frozen node, a cut network); NCCL's watchdog aborts after the same timeout. Either way the
survivor does not wait forever, but what it is told names no rank: gloo says ``Connection closed by peer
[10.0.0.2]:41522`` or ``Timed out waiting 300000ms for recv operation``.

So at start every rank files where it runs (node and host) in the process group's key-value store (under
torchrun the elastic agent of node 0 hosts it), and a rank whose collective fails takes a roll call there:
it answers, waits a few seconds for the other survivors to answer, and names the ranks that did not. When
the store itself is gone, its host (node 0, ``MASTER_ADDR``) is the one that was lost: a plain TCP connect
to ``MASTER_ADDR:MASTER_PORT`` says so first, because the store's client logs every failed call with its
C++ stack frames, which would come before the one line the survivor owes. The trainer then
prints :func:`lost_line` and exits with ``EXIT_PEER_LOST``; torchrun's agent sees the failure and stops
the node's other workers (or restarts every node's workers with ``--max-restarts``).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

EXIT_PEER_LOST = 75  # EX_TEMPFAIL: the run did not fail on its own, a relaunch (--resume auto) may succeed

# what gloo says (lower-cased) when a peer's process died or hung; NCCL's errors are DistBackendError. Seen:
# "Connection closed by peer", "Read error ...: Connection reset by peer", "Timed out waiting 10000ms for recv
# operation to complete", "Application timeout caused pair closure"
PEER_FAILURE_TEXT = ("connection closed", "connection reset", "connection refused", "broken pipe", "timed out",
                     "timeout", "pair closure")


_round = ""  # this process group's namespace in the store, drawn by rank 0 in announce()


def _key(kind: str, rank: int) -> str:
    # one namespace per process group: torchrun may keep its store across restarts, and a restarted group
    # must not read the last one's answers (TORCHELASTIC_RESTART_COUNT is counted per node, so it cannot say)
    return f"rmix/{_round}/{kind}/{rank}"


def _store():
    """The default process group's store (private accessor: there is no public one); None without it."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def announce(rank: int) -> str:
    """File this rank's whereabouts (``node N on HOST``, N being torchrun's GROUP_RANK) in the store, for the
    roll call; return them. A collective: every rank calls it once, right after ``init_process_group``."""
    global _round
    drawn = [uuid.uuid4().hex[:12] if rank == 0 else None]
    dist.broadcast_object_list(drawn, src=0)
    _round = drawn[0]
    where = f"node {os.environ.get('GROUP_RANK', '?')} on {socket.gethostname()}"
    store = _store()
    if store is not None:
        store.set(_key("where", rank), where)
    return where


def restart_warning() -> Optional[str]:
    """A line for the log when torchrun may restart the workers on a store that cannot take it, else None.

    Since torch 2.4 torchrun's c10d rendezvous lends its own store to the workers and keeps it across
    restarts, so a restarted worker can read the last round's addresses and fail to connect (seen here
    with gloo; pytorch/pytorch#135712 with NCCL). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in the
    launcher's environment gives every round a fresh store (hosted by rank 0).
    """
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("warning: torchrun --max-restarts with the agent's shared store: restarted workers may fail to "
                "connect; launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")
    return None


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is what a collective raises when a peer died or hung (not a bug of this rank)."""
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e).lower() for t in PEER_FAILURE_TEXT)


def store_host_answers(timeout: float) -> bool:
    """Whether anything still listens at ``MASTER_ADDR:MASTER_PORT``, where the store is (True when the
    environment does not say). A killed host's port refuses at once; a frozen host's kernel still accepts,
    and the roll call's own timeout then bounds the wait."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not (port or "").isdigit():
        return True
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def roll_call(rank: int, world: int, grace: float) -> Optional[dict[int, str]]:
    """Answer, wait up to ``grace`` seconds for the others, and return the silent ranks with their
    whereabouts (empty: everyone answered); None when the store cannot be reached within ``grace + 2`` s.

    The store is asked from a daemon thread: on a frozen store host (its connection open, nobody
    answering) ``check`` blocks regardless of the store's timeout. An error of the store's (its host died
    meanwhile) ends the thread quietly: the answer is then None.
    """
    store = _store()
    if store is None or not store_host_answers(min(grace, 2.0)):
        return None
    answer: list = []

    def ask():
        try:
            store.set_timeout(timedelta(seconds=max(grace, 1.0)))
            store.set(_key("alive", rank), "1")
            deadline = time.monotonic() + grace
            while True:
                silent = [r for r in range(world) if not store.check([_key("alive", r)])]
                if not silent or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            answer.append({r: store.get(_key("where", r)).decode() if store.check([_key("where", r)]) else "?"
                           for r in silent})
        except Exception:  # noqa: BLE001 -- the store is gone: the caller's line says so, no thread traceback
            pass

    t = threading.Thread(target=ask, name="roll-call", daemon=True)
    t.start()
    t.join(grace + 2.0)
    return answer[0] if answer else None  # None: the thread raised (store gone) or is stuck (store frozen)


def lost_line(rank: int, e: BaseException, silent: Optional[dict[int, str]], grace: float) -> str:
    """The one line a surviving rank prints before it exits: ``silent`` from :func:`roll_call`, not empty."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = first.split("] ", 1)[-1] if first.startswith("[") else first  # drop gloo's source-file prefix
    first = first.split(". ", 1)[0]  # and its advice ("This is typically caused by ...")
    if silent is None:
        host = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        who = f"the store at {host} is gone too: the node hosting it (node 0, or rank 0's) was lost"
    else:
        who = ", ".join(f"rank {r} ({w})" for r, w in silent.items()) + f" did not answer within {grace:g} s"
    return f"rmix train: rank {rank} lost its peers: {who} [{first}]; exiting"
