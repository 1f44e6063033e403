"""Multi-node DDP, simulated on one machine: two torchrun launchers ("nodes") meet through c10d
rendezvous on 127.0.0.1 and train on the CPU (gloo) through the DALI loader with RecursiveMix.

What a second node must not change: every rank takes the same number of steps, each validation sample is
counted once across nodes, only global rank 0 writes, and ``--resume latest`` after the whole job was
stopped continues exactly. What a lost node must not do: leave the other waiting (it exits within a bound,
naming the rank it lost). And ``torchrun --max-restarts`` with ``--resume auto`` continues from
``latest.pth`` after one worker is killed.

With c10d rendezvous torchrun ignores ``--node_rank``: ranks go to nodes in rendezvous order, so each test
reads which global rank ran where from the ``rank R of W: node N on HOST`` line every rank prints.
"""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from shards.build import ShardParams, build
from trainers import peers

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
STEPS_PER_EPOCH = 15  # 1500 digits over 2 ranks of 50 (global batch 100), the last partial batch dropped
EPOCHS = 2
VAL_SAMPLES = 297  # odd on purpose: one rank gets a padded last batch the loader must not count



@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    build(ShardParams(dataset="digits", formats=["wds"], samples_per_shard=400), None, out, workers=2, progress=False)
    return out / "digits"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(digits, save_dir, *extra, dist_timeout=30):
    return ["--data", "digits", "--data_dir", str(digits), "--save_dir", str(save_dir), "--name", "mn",
            "--model_file", "small", "--model_name", "small_cnn", "--epoch", str(EPOCHS), "--batch_size", "100",
            "--lr", "0.05", "--print_freq", "1", "--num_workers", "2", "--aug", "recursive_mix", "--loader", "dali",
            "--random_seed", "1", "--dist_timeout", str(dist_timeout), *extra]


class Node:
    """One torchrun launcher (a "node" of one worker) in its own session, its output in a file."""

    def __init__(self, index: int, port: int, log: Path, args, max_restarts: int = 0, env=None, rdzv_conf="",
                 worker_logs: Path = None):
        """``worker_logs``: a folder where torchrun also writes each worker's own stdout and stderr
        (``--log-dir --tee``), apart from the launcher's output."""
        self.index, self.log, self.worker_logs = index, log, worker_logs
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={index}",
               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=mn",
               # node 0 hosts the rendezvous store, as the node whose address is the endpoint does
               f"--rdzv_conf=is_host={int(index == 0)}{rdzv_conf}", f"--max-restarts={max_restarts}",
               *([f"--log-dir={worker_logs}", "--tee=3"] if worker_logs else []),
               "-m", "trainers.classify", *args]
        with open(log, "w") as out:
            self.p = subprocess.Popen(cmd, cwd=REPO, env=dict(ENV, **(env or {})), stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def worker_text(self, stream: str = "stderr") -> str:
        """What this node's worker wrote to ``stream``, without the launcher's own output (``worker_logs``)."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.worker_logs.rglob(f"{stream}.log")))

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.text(), re.M)
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"node {self.index}: no {pattern!r} (exit {self.p.poll()}):\n{self.text()[-3000:]}")

    def ranks(self) -> dict[int, int]:
        """Global rank -> torchrun's node (GROUP_RANK) of this launcher's workers, from their first line."""
        return {int(r): int(g) for r, g in re.findall(r"^rank (\d+) of 2: node (\d+) on ", self.text(), re.M)}

    def tree(self) -> list:
        """The launcher (torchrun's agent) and every process under it. Its workers run in sessions of their
        own, so a signal to the launcher's process group reaches the agent alone."""
        try:
            agent = psutil.Process(self.p.pid)
            return [agent] + agent.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal_tree(self, sig) -> None:
        """What losing the whole node does to its processes: every one of them gets ``sig``."""
        for proc in self.tree():
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {self.index} still running after {timeout} s:\n{self.text()[-3000:]}")


@pytest.fixture
def nodes():
    """``nodes(tmp, args, tag)`` starts both nodes with the same arguments (logs ``tmp/TAG.nodeI.log``);
    whatever is left of them is killed at the end of the test."""
    started = []

    def start(tmp: Path, args, tag="run", **kw):
        port = free_port()
        pair = [Node(i, port, tmp / f"{tag}.node{i}.log", args, **kw) for i in range(2)]
        started.extend(pair)
        return pair

    yield start
    for node in started:
        node.signal_tree(signal.SIGKILL)
        node.p.wait(30)


def rank0_node(pair) -> Node:
    """The node global rank 0 runs on (the one that prints the log lines), once both nodes' ranks are known."""
    for node in pair:
        node.wait_for(r"^rank \d+ of 2: node \d+ on ")
    return next(node for node in pair if 0 in node.ranks())


def finals(*pair) -> dict[int, dict]:
    """Each rank's ``rank R: final {...}`` line (its own step count, the reduced metrics)."""
    out = {}
    for node in pair:
        for r, d in re.findall(r"^rank (\d+): final (\{.*\})$", node.text(), re.M):
            out[int(r)] = json.loads(d)
    return out


def model_of(run_dir: Path) -> dict:
    return torch.load(run_dir / "latest.pth", weights_only=False, map_location="cpu")["model"]


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    """The reference run: two nodes, two epochs, each node with a save_dir of its own (a node without a
    shared filesystem), so what each rank wrote can be told apart."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    port = free_port()
    pair = [Node(i, port, tmp / f"node{i}.log", train_args(digits, tmp / f"node{i}")) for i in range(2)]
    t0 = time.time()
    codes = [node.wait(300) for node in pair]
    print(f"\nuninterrupted 2-node run: {time.time() - t0:.1f} s")
    assert codes == [0, 0], pair[0].text()[-3000:] + pair[1].text()[-3000:]
    return dict(tmp=tmp, pair=pair, finals=finals(*pair), ranks=[node.ranks() for node in pair])


@pytest.mark.slow
def test_every_rank_steps_alike_val_counted_once_rank0_writes_once(uninterrupted):
    tmp, fin, ranks = uninterrupted["tmp"], uninterrupted["finals"], uninterrupted["ranks"]
    assert sorted(r for rr in ranks for r in rr) == [0, 1] and all(len(rr) == 1 for rr in ranks)
    assert set(fin) == {0, 1}
    assert [fin[r]["step"] for r in (0, 1)] == [EPOCHS * STEPS_PER_EPOCH] * 2  # every rank, the same steps
    assert [fin[r]["val_samples"] for r in (0, 1)] == [VAL_SAMPLES] * 2  # each val sample once across nodes
    assert fin[0] == fin[1]  # metrics reduced across nodes
    writer = next(i for i in (0, 1) if 0 in ranks[i])  # the node global rank 0 ran on
    run_dir = tmp / f"node{writer}" / "digits" / "mn"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "latest.pth", "metrics.csv"]
    other = tmp / f"node{1 - writer}"
    assert not other.exists() or not any(other.rglob("*")), sorted(other.rglob("*"))  # rank 1 wrote nothing
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [(r["epoch"], r["val_samples"]) for r in rows] == [(str(e), str(VAL_SAMPLES)) for e in range(1, EPOCHS + 1)]
    ckpt = torch.load(run_dir / "latest.pth", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"], ckpt["mid_epoch"]) == (EPOCHS, EPOCHS * STEPS_PER_EPOCH, False)
    assert [s["rank"] for s in ckpt["loader"]] == [0, 1]  # both nodes' loader states, gathered to rank 0


def reference_dir(uninterrupted) -> Path:
    writer = next(i for i in (0, 1) if 0 in uninterrupted["ranks"][i])
    return uninterrupted["tmp"] / f"node{writer}" / "digits" / "mn"


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without its wall-clock columns (img_per_s, data_wait)."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("img_per_s", "data_wait")} for row in csv.DictReader(f)]


def assert_same_as_uninterrupted(run_dir: Path, fin: dict, uninterrupted) -> None:
    assert set(fin) == {0, 1} and [fin[r]["step"] for r in (0, 1)] == [EPOCHS * STEPS_PER_EPOCH] * 2
    assert [fin[r]["val_samples"] for r in (0, 1)] == [VAL_SAMPLES] * 2
    assert fin[0]["val_acc1"] == uninterrupted["finals"][0]["val_acc1"]
    a, b = model_of(reference_dir(uninterrupted)), model_of(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: the resumed run is the uninterrupted one


@pytest.mark.slow
def test_resume_latest_after_the_whole_job_is_stopped(uninterrupted, digits, tmp_path, nodes):
    """SIGTERM to both launchers in epoch 1: torchrun passes it to the workers, which agree on the stop at
    the next multiple of 20 steps (mid-epoch 2), rank 0 saves every rank's loader state; the relaunch with
    --resume latest continues from that step and ends bitwise where the uninterrupted run ended."""
    run_dir = tmp_path / "digits" / "mn"
    pair = nodes(tmp_path, train_args(digits, tmp_path), tag="first")
    rank0_node(pair).wait_for(r"Epoch \[1/2\]\[3/15\]")
    for node in pair:
        os.killpg(node.p.pid, signal.SIGTERM)  # the launcher's group: the agent, as a scheduler would
    codes = [node.wait(120) for node in pair]
    assert all(c != 0 for c in codes), codes
    ckpt = torch.load(run_dir / "latest.pth", weights_only=False)
    assert ckpt["mid_epoch"] and ckpt["epoch"] == 2 and ckpt["step"] == 20, (ckpt["epoch"], ckpt["step"])
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "latest.pth", "metrics.csv"]  # no .tmp
    text = "".join(node.text() for node in pair)
    assert "stopped at step 20 (SIGTERM)" in text

    again = nodes(tmp_path, train_args(digits, tmp_path, "--resume", "latest"), tag="resumed")
    assert [node.wait(300) for node in again] == [0, 0], again[0].text()[-3000:] + again[1].text()[-3000:]
    text = "".join(node.text() for node in again)
    assert re.search(r"=> resumed \S+latest\.pth \(epoch 2, mid-epoch, step 20\)", text), text[-3000:]
    assert_same_as_uninterrupted(run_dir, finals(*again), uninterrupted)
    assert len(list(csv.DictReader(open(run_dir / "metrics.csv")))) == EPOCHS
    # the interrupted epoch's row too: every rank's running sums came back from latest.pth
    assert metrics_rows(run_dir) == metrics_rows(reference_dir(uninterrupted))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_node_ends_the_job_on_the_other_naming_the_rank(digits, tmp_path, nodes, how):
    """Node 1 loses every process (SIGKILL: its connections close) or freezes (SIGSTOP: they stay open,
    as with a cut network). Node 0 must exit non-zero within a bound either way, with a line naming the
    rank it lost; frozen, the bound is --dist_timeout."""
    timeout = 10
    pair = nodes(tmp_path, train_args(digits, tmp_path, dist_timeout=timeout))
    rank0_node(pair).wait_for(r"Epoch \[1/2\]\[3/15\]")
    (lost_rank, lost_node), = pair[1].ranks().items()
    (kept_rank, _), = pair[0].ranks().items()
    pair[1].signal_tree(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    t0 = time.time()
    code = pair[0].wait(90)
    took = time.time() - t0
    print(f"\nnode 1 {how}: node 0's launcher exited {code} after {took:.1f} s (--dist_timeout {timeout})")
    assert code != 0
    m = re.search(rf"^rmix train: rank {kept_rank} lost its peers: rank {lost_rank} \(node {lost_node} on \S+\) "
                  r"did not answer within 5 s \[(.*)\]; exiting$", pair[0].text(), re.M)
    assert m, pair[0].text()[-3000:]
    assert "exitcode  : 75" in pair[0].text()  # EXIT_PEER_LOST, in torchrun's summary
    if how == "killed":
        assert took < timeout + 20  # a closed connection is seen at once, not after the timeout
    else:
        assert timeout <= took < timeout + 60
    pair[1].signal_tree(signal.SIGKILL)


@pytest.mark.slow
def test_the_store_host_lost_leaves_the_survivor_one_line(digits, tmp_path):
    """Node 0 hosts the rendezvous store the workers share: when it dies, the survivor's worker says in its one
    line that the store's node was lost, with no traceback and no C++ frames of the store's client before it
    (torchrun's own agent on the survivor reports the lost rendezvous in its own words: not the trainer's)."""
    port, pair = free_port(), []
    try:
        for i in range(2):
            pair.append(Node(i, port, tmp_path / f"node{i}.log", train_args(digits, tmp_path, dist_timeout=10),
                             worker_logs=tmp_path / f"workers{i}"))
        deadline = time.time() + 240
        while not any(re.search(r"Epoch \[1/2\]\[3/15\]", node.text()) for node in pair):
            assert time.time() < deadline and all(node.p.poll() is None for node in pair), pair[0].text()[-3000:]
            time.sleep(0.05)
        pair[0].signal_tree(signal.SIGKILL)
        assert pair[1].wait(90) != 0
        err = pair[1].worker_text("stderr")
        assert re.search(r"^rmix train: rank \d lost its peers: the store at \S+ is gone too: the node hosting it "
                         r"\(node 0, or rank 0's\) was lost \[.*\]; exiting$", err, re.M), err[-3000:]
        for noise in ("Traceback", "Exception in thread", "frame #", "TCPStore.cpp"):
            assert noise not in err, err[-3000:]
    finally:
        for node in pair:
            node.signal_tree(signal.SIGKILL)
            node.p.wait(30)


@pytest.mark.slow
def test_max_restarts_restarts_every_worker_and_resume_auto_continues(uninterrupted, digits, tmp_path, nodes):
    """One worker killed in epoch 2 (its agent lives): with --max-restarts=1 both agents restart their
    workers, which pick up latest.pth (end of epoch 1) by themselves with --resume auto. The launchers
    run with a fresh store per round (trainers.peers.restart_warning says why)."""
    run_dir = tmp_path / "digits" / "mn"
    pair = nodes(tmp_path, train_args(digits, tmp_path, "--resume", "auto"), max_restarts=1,
                 env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    rank0_node(pair).wait_for(r"Epoch \[2/2\]\[2/15\]")
    worker, = [p for p in pair[1].tree()[1:] if "trainers.classify" in " ".join(p.cmdline())]
    worker.send_signal(signal.SIGKILL)
    assert [node.wait(300) for node in pair] == [0, 0], pair[0].text()[-3000:] + pair[1].text()[-3000:]
    text = "".join(node.text() for node in pair)
    assert len(re.findall(r"^rank \d of 2: ", text, re.M)) == 4  # two rounds of two workers
    assert re.search(r"=> resumed \S+latest\.pth \(epoch 1, step 15\)", text), text[-4000:]
    assert "warning: torchrun --max-restarts" not in text
    assert_same_as_uninterrupted(run_dir, finals(*pair), uninterrupted)
    assert len(list(csv.DictReader(open(run_dir / "metrics.csv")))) == EPOCHS


@pytest.mark.slow
def test_nodes_launched_with_different_flags_end_at_once_naming_them(digits, tmp_path):
    """Node 1 launched with another --batch_size and --aug: both nodes end within seconds (not after
    --dist_timeout) with one line naming the flags; each node's own --save_dir may differ (PER_NODE_FLAGS)."""
    port, started = free_port(), []
    try:
        for i, extra in enumerate(([], ["--batch_size", "50", "--aug", "none"])):
            args = train_args(digits, tmp_path / f"node{i}", dist_timeout=60)
            args[args.index("--batch_size"):args.index("--batch_size") + 2] = []
            args[args.index("--aug"):args.index("--aug") + 2] = []
            args += extra or ["--batch_size", "100", "--aug", "recursive_mix"]
            started.append(Node(i, port, tmp_path / f"node{i}.log", args))
        codes = [node.wait(50) for node in started]  # well before --dist_timeout
        assert all(c != 0 for c in codes), codes
        for node in started:
            lines = re.findall(r"^rmix train: .*$", node.text(), re.M)
            assert lines[-1].startswith("rmix train: the ranks were launched with different flags: --batch_size "), lines
            assert re.search(r"--batch_size 100 on rank \d, 50 on rank \d; --aug recursive_mix on rank \d, none on "
                             r"rank \d; launch every node with the same flags$", lines[-1]), lines[-1]
    finally:
        for node in started:
            node.signal_tree(signal.SIGKILL)
            node.p.wait(30)


# -- the pieces, without processes -------------------------------------------------------------------
def test_differing_flags_are_named_by_rank():
    from trainers.classify import differing_flags

    base = {"batch_size": 128, "aug": "recursive_mix", "save_dir": "/n0/logs", "schedule": [100, 150]}
    configs = [dict(base, save_dir=f"/n{r}/logs") for r in range(6)]  # a node-local save_dir is no difference
    assert differing_flags(configs) is None
    configs[3]["batch_size"] = configs[4]["batch_size"] = configs[5]["batch_size"] = 256
    configs[5]["schedule"] = [100]
    assert differing_flags(configs) == ("the ranks were launched with different flags: --batch_size 128 on ranks 0-2, "
                                        "256 on ranks 3-5; --schedule 100 150 on ranks 0-4, 100 on rank 5; launch "
                                        "every node with the same flags")

def test_roll_call_names_the_ranks_that_did_not_answer(monkeypatch):
    store = dist.HashStore()
    monkeypatch.setattr(peers, "_store", lambda: store)
    monkeypatch.setattr(peers, "_round", "r1")
    for r, where in enumerate(("node 0 on a3", "node 1 on b7", "node 1 on b7")):
        store.set(peers._key("where", r), where)
    store.set(peers._key("alive", 2), "1")  # rank 2 survived and answered; rank 1 is silent
    t0 = time.monotonic()
    silent = peers.roll_call(0, 3, grace=0.5)
    assert silent == {1: "node 1 on b7"} and time.monotonic() - t0 >= 0.5
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[10.0.0.2]:945. This is typically caused by a remote worker crashing. GLHF!")
    assert peers.is_peer_failure(gloo) and peers.is_peer_failure(dist.DistBackendError("watchdog"))
    assert peers.is_peer_failure(RuntimeError("Application timeout caused pair closure"))
    assert not peers.is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert peers.lost_line(0, gloo, silent, 0.5) == (
        "rmix train: rank 0 lost its peers: rank 1 (node 1 on b7) did not answer within 0.5 s "
        "[Connection closed by peer [10.0.0.2]:945]; exiting")
    store.set(peers._key("alive", 1), "1")
    assert peers.roll_call(2, 3, grace=5) == {}  # everyone answered: at once, no grace spent


def test_without_the_store_the_line_blames_its_host(monkeypatch):
    monkeypatch.setattr(peers, "_store", lambda: None)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    assert peers.roll_call(3, 4, grace=1) is None
    line = peers.lost_line(3, RuntimeError("Connection reset by peer"), None, 1)
    assert "the store at 10.0.0.1:29400 is gone too: the node hosting it (node 0, or rank 0's) was lost" in line


@pytest.mark.parametrize("max_restarts, shared, warned", [("1", "True", True), ("1", "False", False),
                                                          ("0", "True", False)])
def test_restart_warning_only_where_restarts_meet_the_shared_store(monkeypatch, max_restarts, shared, warned):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", max_restarts)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
    assert (peers.restart_warning() is not None) == warned
