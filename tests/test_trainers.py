"""trainers/: models with the ROI head, the DDP trainer, exact resume, SIGTERM, clear errors."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from shards.build import ShardParams, build
from trainers.classify import run
from trainers.config import TrainConfig
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
    return subprocess.run([sys.executable, "-m", "rmix.cli", *args], capture_output=True, text=True,
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


@pytest.mark.parametrize("loader", ["dali", "memory"])
def test_exact_resume_is_bitwise(digits, tmp_path, loader):
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


def test_recursive_mix_reaches_the_loss_and_evaluate_best(digits, tmp_path):
    r = cli("train", "--data", "digits", "--data_dir", str(digits), "--save_dir", str(tmp_path), "--name", "rm",
            "--model_file", "small", "--model_name", "small_cnn", "--epoch", "1", "--batch_size", "100",
            "--print_freq", "1", "--aug", "recursive_mix", "--aug_omega", "0.5", "--loader", "memory", "--save_model",
            "--num_workers", "2")
    assert r.returncode == 0, r.stderr[-2000:]
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


def test_sigterm_saves_latest_and_exits_cleanly(digits, tmp_path):
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
    assert p.returncode == 0, err[-2000:]
    assert "stopped at step" in out
    ckpt = torch.load(tmp_path / "digits" / "term" / "latest.pth", weights_only=False)
    assert ckpt["step"] >= 2 and ckpt["mid_epoch"]


def test_ddp_two_processes_on_cpu_agree(digits, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        "-m", "trainers.classify", "--data", "digits", "--data_dir", str(digits), "--save_dir",
                        str(tmp_path), "--name", "ddp", "--model_file", "small", "--model_name", "small_cnn",
                        "--epoch", "1", "--batch_size", "100", "--aug", "recursive_mix", "--num_workers", "2"],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    finals = dict(re.findall(r"rank (\d): final (\{.*\})", r.stdout))
    assert set(finals) == {"0", "1"}
    assert finals["0"] == finals["1"]  # reduced metrics are the same on every rank
    ckpt = torch.load(tmp_path / "digits" / "ddp" / "latest.pth", weights_only=False)
    assert len(ckpt["loader"]) == 2 and ckpt["loader"][1]["rank"] == 1


@pytest.mark.parametrize("args, message", [
    (["--aug", "mixmatch"], "invalid choice: 'mixmatch'"),
    (["--data_dir", "/nonexistent/shards"], "no manifest.json at /nonexistent/shards"),
    (["--resume", "latest", "--name", "never-ran"], "no checkpoint at"),
    (["--evaluate"], "--evaluate needs --resume"),
    (["--data", "cifar10"], "--data cifar10 but"),
    (["--aug_plus"], "--aug_plus is the ImageNet"),
])
def test_bad_flags_fail_at_start_with_one_line(digits, tmp_path, args, message):
    base = ["train", "--data_dir", str(digits), "--save_dir", str(tmp_path), "--model_file", "small",
            "--model_name", "small_cnn", "--epoch", "1"]
    r = cli(*base, *args, timeout=300)
    assert r.returncode != 0
    assert message in r.stderr.strip().splitlines()[-1], r.stderr[-1000:]
