"""trainers/: models with the ROI head, the DDP trainer, exact resume, SIGTERM, clear errors."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from shards.build import ShardParams, build
from trainers.checkpoint import CheckpointError
from trainers.classify import EXIT_PREEMPTED, RunState, main, resolve_device, run, train_one_epoch
from trainers.config import ConfigError, TrainConfig
from trainers.models import build_model, cifar_resnet18, pyramidnet_164_270, pyramidnet_200_240, resnet50, small_cnn

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    build(ShardParams(dataset="digits", formats=["wds"], samples_per_shard=400), None, out, workers=2, progress=False)
    return out / "digits"


def cfg(digits, tmp, **kw):
    base = dict(name="t", data="digits", data_dir=str(digits), save_dir=str(tmp), model_file="small",
                model_name="small_cnn", epoch=2, batch_size=100, lr=0.05, print_freq=1000, num_workers=2,
                aug="recursive_mix", aug_alpha=0.5, aug_omega=0.5, random_seed=1)
    base.update(kw)
    return TrainConfig(**base).validate()


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


@pytest.mark.parametrize("factory, size", [(small_cnn, 32), (cifar_resnet18, 32), (pyramidnet_164_270, 32),
                                           (pyramidnet_200_240, 32), (resnet50, 64)])
def test_models_forward_with_and_without_boxes(factory, size):
    torch.manual_seed(0)
    m = factory(num_classes=10)
    x = torch.randn(2, 3, size, size)
    assert m(x).shape == (2, 10)
    boxes = torch.tensor([[0.0, 0.0, size / 2, size / 2], [size / 4, 0.0, size, size / 3]])
    logits, roi = m(x, boxes)
    assert logits.shape == roi.shape == (2, 10)
    roi.sum().backward()
    assert m.fc_roi.weight.grad.abs().sum() > 0
    assert m.fc.weight.grad is None
    _, roi_shared = m(x, boxes, share_fc=True)
    assert torch.allclose(roi_shared, m.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(
        torchvision.ops.roi_align(m.features(x), torch.cat([torch.arange(2.0)[:, None], boxes], 1), (1, 1),
                                  spatial_scale=m.features(x).shape[-1] / size, aligned=True), 1), 1)), atol=1e-5)


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, False), (torch.float32, True)])
def test_roi_head_pools_each_samples_own_features_in_low_precision(dtype, autocast):
    """A batch of 512 in bfloat16 (a bf16 model, or bf16 autocast): each ROI pools its own sample. bfloat16 holds
    integers exactly only up to 256; a batch index in the features' dtype put sample 257 on 256's features and 511
    past the batch (an illegal memory access on an H200 under bf16 autocast, batch 512)."""
    from trainers.models.roi import RoiClassifier

    class Plain(RoiClassifier):  # features are the input: sample i pools its own constant
        def __init__(self):
            super().__init__()
            self.fc = self.fc_roi = torch.nn.Identity()

        def features(self, x):
            return x

    n = 512
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)  # neighbours differ: a rounded index shows
    x = sign.view(n, 1, 1, 1).expand(n, 1, 8, 8).to(dtype)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).expand(n, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, roi = Plain()(x.to(torch.bfloat16) if autocast else x, boxes)
    assert torch.equal(roi.float().flatten(), sign)


def test_resnet50_weights_load_into_torchvision():
    ours = resnet50(num_classes=1000)
    sd = {k: v for k, v in ours.state_dict().items() if not k.startswith("fc_roi.")}
    tv = torchvision.models.resnet50()
    tv.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 64, 64)
    ours.eval(), tv.eval()
    assert torch.allclose(ours(x), tv(x), atol=1e-5)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown CIFAR-size model .* known: pyramidnet/pyramidnet_200_240"):
        build_model("resnet", "resnet50", 10, imagenet=False)


TIMINGS = ("img_per_s", "data_wait")  # wall-clock columns of metrics.csv: they differ between any two runs


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without its timing columns."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMINGS} for row in csv.DictReader(f)]


@pytest.mark.parametrize("loader", ["dali", "memory"])
def test_exact_resume_is_bitwise(digits, tmp_path, loader):
    """Stopped mid-epoch and resumed: the weights are bitwise the uninterrupted run's, and so is every row of
    metrics.csv, the interrupted epoch's included (its running sums are saved with the checkpoint)."""
    whole = run(cfg(digits, tmp_path / "a", loader=loader))
    stopped = run(cfg(digits, tmp_path / "b", loader=loader, stop_after_steps=5))  # mid epoch 1 of 15 steps
    assert stopped == {"stopped_at_step": 5}
    ckpt = torch.load(tmp_path / "b" / "digits" / "t" / "latest.pth", weights_only=False)
    assert ckpt["mid_epoch"] and ckpt["epoch"] == 1 and ckpt["step"] == 5
    resumed = run(cfg(digits, tmp_path / "b", loader=loader, resume="latest"))
    a = torch.load(tmp_path / "a" / "digits" / "t" / "latest.pth", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "digits" / "t" / "latest.pth", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["val_acc1"] == whole["val_acc1"]
    rows = metrics_rows(tmp_path / "a" / "digits" / "t")
    assert len(rows) == 2 and metrics_rows(tmp_path / "b" / "digits" / "t") == rows
    text = (tmp_path / "b" / "digits" / "t" / "metrics.csv").read_text()
    assert not re.search(r"\.\d{7,}", text), text  # rounded where printed: no float noise


@pytest.mark.slow
def test_recursive_mix_reaches_the_loss_and_evaluate_best(digits, tmp_path):
    r = cli("train", "--data", "digits", "--data_dir", str(digits), "--save_dir", str(tmp_path), "--name", "rm",
            "--model_file", "small", "--model_name", "small_cnn", "--epoch", "1", "--batch_size", "100",
            "--print_freq", "1", "--aug", "recursive_mix", "--aug_omega", "0.5", "--loader", "memory", "--save_model",
            "--num_workers", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("rmix train: {") and '"aug": "recursive_mix"' in r.stdout.splitlines()[0]
    assert "\r" not in r.stdout + r.stderr  # off a terminal: log lines, no progress-bar frames
    roi = [float(v) for v in re.findall(r"ROI (\d+\.\d+)", r.stdout)]
    assert len(roi) == 15
    assert roi[0] == 0.0  # first step of the epoch: no history, no ROI term
    assert roi[1] > 0.0 and all(v > 0 for v in roi[1:])  # running mean of the ROI term
    e = cli("train", "--data", "digits", "--data_dir", str(digits), "--save_dir", str(tmp_path), "--name", "rm",
            "--model_file", "small", "--model_name", "small_cnn", "--loader", "memory", "--evaluate", "--resume", "best")
    assert e.returncode == 0, e.stderr[-2000:]
    m = re.search(r"Test Acc@1: (\d+\.\d+)\tTest Acc@5: (\d+\.\d+)", e.stdout)
    final = re.findall(r"Epoch\(val\) \[1\]\tTest Acc@1: (\d+\.\d+)", r.stdout)
    assert m and final and float(m.group(1)) == pytest.approx(float(final[0]))


@pytest.mark.slow
def test_sigterm_saves_latest_and_exits_non_zero(digits, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "trainers.classify", "--data", "digits", "--data_dir", str(digits),
                          "--save_dir", str(tmp_path), "--name", "term", "--model_file", "small",
                          "--model_name", "small_cnn", "--epoch", "50", "--batch_size", "20", "--print_freq", "2",
                          "--loader", "memory", "--num_workers", "1"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in p.stdout:
        if line.startswith("Epoch [1/50]") or time.time() > deadline:
            break
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_PREEMPTED, err[-2000:]  # a scheduler must not count it as finished
    assert "stopped at step" in out and "(SIGTERM)" in out
    ckpt = torch.load(tmp_path / "digits" / "term" / "latest.pth", weights_only=False)
    assert ckpt["step"] >= 2 and ckpt["mid_epoch"]


@pytest.mark.slow
def test_ctrl_c_saves_latest_and_exits_130_without_a_traceback(digits, tmp_path):
    """Ctrl-C reaches the terminal's whole process group: it is handled as SIGTERM is (latest.pth saved at
    the next step), then the run exits with the shell's status for Ctrl-C."""
    p = subprocess.Popen([sys.executable, "-m", "tools.cli", "train", "--data", "digits", "--data_dir", str(digits),
                          "--save_dir", str(tmp_path), "--name", "int", "--model_file", "small",
                          "--model_name", "small_cnn", "--epoch", "50", "--batch_size", "20", "--print_freq", "2",
                          "--loader", "memory", "--num_workers", "1"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    for line in p.stdout:
        if line.startswith("Epoch [1/50]") or time.time() > deadline:
            break
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "stopped at step" in out and "(SIGINT)" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    ckpt = torch.load(tmp_path / "digits" / "int" / "latest.pth", weights_only=False)
    assert ckpt["step"] >= 2 and ckpt["mid_epoch"]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_agree(digits, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        "-m", "trainers.classify", "--data", "digits", "--data_dir", str(digits), "--save_dir",
                        str(tmp_path), "--name", "ddp", "--model_file", "small", "--model_name", "small_cnn",
                        "--epoch", "1", "--batch_size", "100", "--aug", "recursive_mix", "--num_workers", "2"],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "find_unused_parameters" not in r.stderr  # every parameter takes part in every step
    finals = dict(re.findall(r"rank (\d): final (\{.*\})", r.stdout))
    assert set(finals) == {"0", "1"}
    assert finals["0"] == finals["1"]  # reduced metrics are the same on every rank
    ckpt = torch.load(tmp_path / "digits" / "ddp" / "latest.pth", weights_only=False)
    assert len(ckpt["loader"]) == 2 and ckpt["loader"][1]["rank"] == 1


def _bad_checkpoints(tmp):
    """A corrupt file and a pickle that is not a checkpoint."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "corrupt.pth").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save({"weights": torch.zeros(3)}, tmp / "other.pth")
    return tmp


@pytest.mark.parametrize("args, message", [
    (["--aug", "mixmatch"], "invalid choice: 'mixmatch'"),
    (["--loader", "tfdata"], "invalid choice: 'tfdata'"),
    (["--data_dir", "/nonexistent/shards"], "no manifest.json at /nonexistent/shards"),
    (["--resume", "latest", "--name", "never-ran"], "no checkpoint at"),
    (["--evaluate"], "--evaluate needs --resume"),
    (["--data", "cifar10"], "--data cifar10 but"),
    (["--aug_plus"], "--aug_plus is the ImageNet"),
    (["--device", "banana"], "--device 'banana': use auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:0"], "--device cuda:0 asked for, but CUDA is not available"),
    (["--lr", "-0.1"], "--lr must be > 0, got -0.1"),
    (["--aug", "cutmix", "--aug_alpha", "-1"], "--aug_alpha must be > 0, got -1.0"),
    (["--batch_size", "5000"], "--batch_size 5000 is larger than the train split (1500 samples"),
    (["--batch_size", "5000", "--loader", "dali"], "--batch_size 5000 is larger than the train split (1500 samples"),
    (["--model_name", "resnet999"], "unknown CIFAR-size model --model_file small --model_name resnet999"),
    (["--resume", "{tmp}/corrupt.pth"], "corrupt.pth is not a readable checkpoint"),
    (["--resume", "{tmp}/other.pth"], "other.pth is not a checkpoint of `rmix train`"),
])
def test_bad_flags_fail_at_start_with_one_line(digits, tmp_path, capsys, args, message):
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _bad_checkpoints(tmp_path / "ck")
    args = [a.replace("{tmp}", str(tmp_path / "ck")) for a in args]
    base = ["--data_dir", str(digits), "--save_dir", str(tmp_path), "--model_file", "small",
            "--model_name", "small_cnn", "--epoch", "1", "--num_workers", "1", "--loader", "memory"]
    with pytest.raises(SystemExit) as e:
        main(base + args)
    said = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code != 0 and "\n" not in said.strip()
    assert message in said, said


@pytest.mark.slow
def test_one_line_through_the_console_script(digits, tmp_path):
    r = cli("train", "--data_dir", str(digits), "--save_dir", str(tmp_path), "--model_file", "small",
            "--model_name", "small_cnn", "--device", "banana", timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["rmix train: --device 'banana': use auto, cpu, cuda or cuda:N"]


def test_checkpoint_of_another_model_is_refused(digits, tmp_path):
    run(cfg(digits, tmp_path, loader="memory", stop_after_steps=1))
    with pytest.raises(Exception, match="was trained with --data digits --model_file small --model_name small_cnn; "
                       "this run has --data digits --model_file resnet --model_name resnet18"):
        run(cfg(digits, tmp_path, loader="memory", model_file="resnet", model_name="resnet18", resume="latest"))


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu", 0, 1).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 0, 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda", 0, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", 1, 2) == torch.device("cuda", 1)  # each rank its LOCAL_RANK GPU
    assert resolve_device("cuda", 1, 2) == torch.device("cuda", 1)
    assert resolve_device("cuda:1", 0, 1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="GPU 3 does not exist"):
        resolve_device("cuda:3", 0, 1)
    with pytest.raises(ConfigError, match="with 2 processes: use --device cuda"):
        resolve_device("cuda:0", 0, 2)


class _SlowLoader:
    """Batches that take ``delay`` seconds to arrive: the trainer must report the wait as data-wait."""

    def __init__(self, batches, delay):
        self.batches, self.delay = batches, delay

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            time.sleep(self.delay)
            yield b


@pytest.mark.parametrize("delay", [0.0, 0.2])
def test_data_wait_measures_waiting(digits, tmp_path, delay):
    """data-wait is the share of the epoch spent waiting for batches: here the loader's sleeps over
    the wall time measured outside (robust to a loaded machine, where compute takes longer)."""
    from pipelines import build_loader

    c = cfg(digits, tmp_path, aug="none", progress=False, print_freq=10**6)
    made = list(build_loader(digits, "train", backend="memory", batch_size=100, train=True))[:4]
    model = small_cnn(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t0 = time.perf_counter()
    row = train_one_epoch(model, _SlowLoader(made, delay), opt, torch.amp.GradScaler("cuda", enabled=False), c, 1,
                          RunState(), device=torch.device("cpu"), log=lambda m: None)
    expected = 4 * delay / (time.perf_counter() - t0)
    assert abs(row["data_wait"] - expected) < 0.05, (row, expected)


def test_run_gives_back_the_callers_signal_handlers(digits, tmp_path):
    """A handler left behind would be inherited by every process forked later (shard encoders, DataLoader
    workers), which SIGTERM or Ctrl-C could then no longer stop."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run(cfg(digits, tmp_path, loader="memory", stop_after_steps=1))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.fixture(scope="module")
def stopped_mid_epoch(digits, tmp_path_factory):
    """A memory-loader run stopped after 3 of its 15 steps: latest.pth is mid-epoch 1."""
    tmp = tmp_path_factory.mktemp("stopped")
    run(cfg(digits, tmp, loader="memory", stop_after_steps=3))
    return tmp


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 50}, "was saved mid-epoch 1 with --batch_size 100; this run has --batch_size 50: "
                         "resume with --batch_size 100"),
    ({"loader": "dali"}, "with --loader memory; this run has --loader dali: resume with --loader memory"),
    ({"aug": "cutmix"}, "with --aug recursive_mix; this run has --aug cutmix: resume with --aug recursive_mix"),
])
def test_resume_with_flags_its_loader_state_cannot_follow_is_one_line(digits, stopped_mid_epoch, change, message):
    """A mid-epoch position counts batches of the saved size, and a loader state belongs to its backend and
    mix: resuming with another value would repeat samples or fail deep in a loader. One line names the flag."""
    before = {p.name: p.read_bytes() for p in (stopped_mid_epoch / "digits" / "t").iterdir() if p.is_file()}
    with pytest.raises(CheckpointError) as e:
        run(cfg(digits, stopped_mid_epoch, **{"loader": "memory", "resume": "latest", **change}))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    after = {p.name: p.read_bytes() for p in (stopped_mid_epoch / "digits" / "t").iterdir() if p.is_file()}
    assert after == before  # the refused run changed nothing in the run folder


def test_mid_epoch_resume_of_the_torch_loader_with_other_workers_is_one_line(digits, tmp_path):
    """The torch backend's workers read their own shards: its batches depend on --num_workers."""
    run(cfg(digits, tmp_path, loader="torch", num_workers=2, stop_after_steps=2))
    with pytest.raises(CheckpointError, match="with --num_workers 2; this run has --num_workers 1: resume with "
                                              "--num_workers 2"):
        run(cfg(digits, tmp_path, loader="torch", num_workers=1, resume="latest"))


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(digits, stopped_mid_epoch, tmp_path):
    """It would replace that run's latest.pth and metrics.csv; one line says how to continue it instead."""
    shutil.copytree(stopped_mid_epoch, tmp_path, dirs_exist_ok=True)
    run_dir = tmp_path / "digits" / "t"
    (run_dir / "metrics.csv").write_text("epoch,val_acc1\n1,50.0\n")  # as a finished epoch leaves it
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as e:
        main(["--data_dir", str(digits), "--save_dir", str(tmp_path), "--name", "t", "--model_file", "small",
              "--model_name", "small_cnn", "--loader", "memory", "--num_workers", "1", "--epoch", "1"])
    assert e.value.code == (f"rmix train: {run_dir} holds a run (latest.pth, metrics.csv): continue it with "
                            "--resume latest, or start another with another --name")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


@pytest.mark.slow
def test_torchrun_with_fewer_shards_than_ranks_is_one_line_per_rank(tmp_path):
    """The torch loader splits ranks by shard: one train shard for two ranks ends in its one line on each rank,
    not inside a traceback."""
    build(ShardParams(dataset="digits", formats=["wds"], samples_per_shard=2000), None, tmp_path, workers=1,
          progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                        "-m", "trainers.classify", "--data_dir", str(tmp_path / "digits"), "--save_dir",
                        str(tmp_path / "logs"), "--model_file", "small", "--model_name", "small_cnn", "--epoch", "1",
                        "--batch_size", "100", "--loader", "torch", "--num_workers", "2"],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode != 0
    worker_err = r.stderr.split("failed (exitcode")[0]  # what the ranks wrote, before torchrun's own summary
    lines = [l for l in worker_err.splitlines() if l.startswith("rmix train: ")]
    assert len(lines) == 2 and all("split 'train' has 1 webdataset shard(s) for 2 ranks" in l for l in lines), r.stderr
    assert "Traceback" not in worker_err, worker_err[-3000:]


def _damage_second_image(tar: Path, damage: str) -> str:
    """Overwrite the bytes of the tar's second image in place (the sizes and the .idx still agree, so the start
    checks pass): ``header`` zeroes all of it, ``data`` the pixels after its header chunks. Returns its key."""
    import tarfile

    with tarfile.open(tar) as tf:
        member = [m for m in tf.getmembers() if m.name.endswith(".png")][1]
    with open(tar, "r+b") as f:
        f.seek(member.offset_data + (0 if damage == "header" else 200))
        f.write(b"\0" * (member.size - (0 if damage == "header" else 400)))
    return member.name[: -len(".png")]


def test_an_undecodable_image_with_dali_is_one_line_naming_shard_and_sample(digits, tmp_path):
    """A PNG whose pixel data is damaged: DALI names the sample in its error, the trainer says it in one line."""
    shutil.copytree(digits, tmp_path / "digits")
    tar = tmp_path / "digits" / "wds" / "train-000001.tar"
    key = _damage_second_image(tar, "data")
    with pytest.raises(SystemExit) as e:
        main(["--data_dir", str(tmp_path / "digits"), "--save_dir", str(tmp_path / "logs"), "--model_file", "small",
              "--model_name", "small_cnn", "--epoch", "1", "--batch_size", "100", "--loader", "dali",
              "--num_workers", "1"])
    said = str(e.value.code)
    assert said.startswith(f"rmix train: {tar}: sample {key}: DALI cannot decode its image (damaged data)"), said
    assert "\n" not in said


def test_an_image_header_dali_cannot_parse_is_found_in_the_ranks_shards(digits, tmp_path):
    """Where nvImageCodec cannot parse an image's header, DALI's error names no sample: the loader reads the
    headers of the rank's shards and names it. DALI's message is the one DALI 2.4's CPU decoder gives (running
    DALI on such an image here crashes it in most runs, in dali::imgcodec::ImageDecoder, before it raises)."""
    from pipelines.dali import decode_error

    shutil.copytree(digits, tmp_path / "digits")
    tar = tmp_path / "digits" / "wds" / "train-000001.tar"
    key = _damage_second_image(tar, "header")
    said = RuntimeError("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\nwhich was "
                        "used in the pipeline definition with the following traceback:\n\n  File \"pipelines/dali.py\", "
                        "line 147, in augment\n\nencountered:\n\nnvImageCodec failure: '#4'\nCurrent pipeline object "
                        "is no longer valid.")
    files = sorted(str(p) for p in (tmp_path / "digits" / "wds").glob("train-*.tar"))
    error = decode_error(said, files, "png", str(tmp_path / "digits"), "train")
    assert str(error) == (f"{tar}: sample {key}: DALI cannot decode its image (not an image file; DALI: "
                          f"nvImageCodec failure: '#4'); rebuild that shard (rmix verify {tmp_path / 'digits'} lists "
                          "every such sample)")
    assert decode_error(RuntimeError("Critical error in pipeline: out of memory"), files, "png", "r", "train") is None
