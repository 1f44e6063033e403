"""tools/gpu_check.py (``make gpu-check``): the CPU dry run of every step, the report, the exit status, and the
package importing without FFCV and the OpenMMLab stack, as on the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools import gpu_check

REPO = Path(__file__).resolve().parents[1]
KEYS = ["device", "torch_version", "dali_version", "cuda_version", "pytest_gpu", "dali_mixed_img_s", "dali_cpu_img_s",
        "memory_cuda_img_s", "rm_ms_per_batch", "dense_img_s", "trainer_fed_ratio", "nccl_ok", "goals", "errors"]


def gpu_check_cli(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "tools.gpu_check", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_measures_every_step_and_a_step_over_its_box_fails_the_run(tmp_path):
    """The whole check on the CPU at tiny sizes, without FFCV and the OpenMMLab stack (as on the GPU machine), with
    the rm step's box too short for it: every key is written, rm is the one error (timed out), every other step
    measured, and the exit status is 1."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "out"
    r = gpu_check_cli("--out", str(out), "--dry-run", "--without", "ffcv,mm", "--time-box", "rm=1")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert all(k in report for k in KEYS)
    assert list(report["errors"]) == ["rm"], report["errors"]
    assert report["errors"]["rm"].startswith("timed out after 1 s")
    assert report["rm_ms_per_batch"] == {"uint8": None, "float32": None}
    assert report["device"].startswith("cpu") and report["torch_version"] and report["dali_version"]
    assert report["dali_mixed_img_s"]["off"] > 0 and report["dali_mixed_img_s"]["recursive_mix"] > 0
    assert report["dali_cpu_img_s"] > 0 and report["memory_cuda_img_s"] > 0 and report["trainer_fed_ratio"] > 0
    assert report["nccl_ok"] is True and report["details"]["nccl"]["backend"] == "gloo"
    assert report["details"]["nccl"]["weights_max_abs_diff"] == 0.0
    # no OpenMMLab: the loaders' rows are null, their graphs and the dense mixes measured instead, and said so
    assert report["dense_img_s"] == {"det_off": None, "det_rm": None, "seg_off": None, "seg_rm": None}
    assert all(v > 0 for v in report["details"]["dense"]["graph_img_s"].values())
    assert set(report["details"]["dense"]["mix_ms"]) == {"det", "seg"}
    assert any("OpenMMLab" in n or "mmcv" in n for n in report["notes"])
    # the GPU tests are collected (tests/test_gpu.py among them) and skip on the CPU
    assert report["pytest_gpu"]["passed"] == 0 and report["pytest_gpu"]["failed"] == 0
    assert report["pytest_gpu"]["skipped"] >= 4
    assert all(g["met"] is None for g in report["goals"].values())  # judged at full size on a GPU only
    summary = (out / "gpu-check.md").read_text()
    assert "**rm**: timed out" in summary and "1 step(s) failed" in summary
    assert (out / "logs" / "rm.log").is_file() and (out / "logs" / "nccl-resumed.log").is_file()



@pytest.mark.slow
def test_dense_step_with_the_openmmlab_stack_times_our_loaders_beside_the_stock_ones(tmp_path):
    """Where mmdet and mmseg are installed, the dense step times the DALI loaders with dense RecursiveMix off and on
    and the stock DataLoaders beside them: all four rows of each."""
    pytest.importorskip("nvidia.dali")
    if gpu_check.have_mm() is not None:
        pytest.skip("the OpenMMLab stack is not installed")
    r = gpu_check_cli("--out", str(tmp_path), "--dry-run", "--steps", "dense")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert set(report["dense_img_s"]) == set(report["details"]["dense"]["stock_img_s"]) == {
        "det_off", "det_rm", "seg_off", "seg_rm"}
    assert all(v > 0 for v in report["dense_img_s"].values())
    assert all(v > 0 for v in report["details"]["dense"]["stock_img_s"].values())

def test_a_run_whose_steps_pass_exits_zero(tmp_path):
    r = gpu_check_cli("--out", str(tmp_path), "--dry-run", "--steps", "rm")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["errors"] == {}
    assert report["rm_ms_per_batch"]["uint8"] > 0 and report["rm_ms_per_batch"]["float32"] > 0
    assert report["details"]["rm"]["timer"] == "host clock"


def _full_gpu_report(**values) -> dict:
    """A report as merge() makes it from the steps' results of a full-size GPU run."""
    result = {
        "env": {"values": {"device": "NVIDIA H100 80GB HBM3", "torch_version": "2.11.0", "dali_version": "2.4.0",
                           "cuda_version": "13.0"}},
        "dali": {"values": {"dali_mixed_img_s": {"off": 12_000.0, "recursive_mix": 11_700.0}},
                 "details": {"rm_keeps": {"median": values.get("keeps", 0.975)}}},
        "rm": {"values": {"rm_ms_per_batch": {"uint8": 0.12, "float32": values.get("f32_ms", 0.19)}}},
        "trainer": {"values": {"trainer_fed_ratio": 0.97}},
        "nccl": {"values": {"nccl_ok": True}},
    }
    runs = {k: dict(seconds=1.0, result=v, error=None) for k, v in result.items()}
    ctx = dict(device="cuda", tiny=False)
    return gpu_check.merge(runs, ctx, list(runs))


def test_goals_are_judged_on_the_measured_values():
    r = _full_gpu_report()
    g = r["goals"]
    assert g["dali_mixed"]["met"] is True and g["rm_ms"]["met"] is True and g["trainer_fed"]["met"] is True
    assert g["dense_vs_stock"]["met"] is None and "OpenMMLab" in g["dense_vs_stock"]["why_not"]
    assert r["errors"] == {} and r["dense_img_s"]["det_off"] is None
    g = _full_gpu_report(keeps=0.94, f32_ms=0.21)["goals"]
    assert g["dali_mixed"]["met"] is False and g["rm_ms"]["met"] is False
    summary = gpu_check.markdown(_full_gpu_report())
    assert summary.startswith("# gpu-check: NVIDIA H100 80GB HBM3") and "12,000 img/s" in summary


def test_junit_counts_failures_and_errors_as_failed(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite name="pytest">'
                   '<testcase classname="tests.test_gpu" name="a"/>'
                   '<testcase classname="tests.test_gpu" name="b"><failure message="x"/></testcase>'
                   '<testcase classname="tests.test_gpu" name="c"><error message="y"/></testcase>'
                   '<testcase classname="tests.test_gpu" name="d"><skipped message="z"/></testcase>'
                   '</testsuite></testsuites>')
    assert gpu_check.count_junit(xml) == {"passed": 1, "failed": 2, "skipped": 1,
                                          "failed_tests": ["tests.test_gpu::b", "tests.test_gpu::c"]}


def test_a_bad_time_box_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path), "--time-box", "rmm=5"])
    assert str(e.value.code).startswith("gpu-check: --time-box 'rmm=5': use STEP=SECONDS with STEP one of env, ")


@pytest.mark.slow
def test_the_package_and_the_gpu_tests_need_neither_ffcv_nor_mm():
    """On the GPU machine neither FFCV nor the OpenMMLab stack is installed: every module outside
    ``trainers.mm`` imports, and ``pytest -m gpu`` collects without an error (the tests that need them skip)."""
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for pkg in ("rmix", "shards", "pipelines", "trainers", "tools")
                     for p in (REPO / pkg).rglob("*.py"))
    modules = [m for m in modules if not m.startswith("trainers.mm")]
    code = ("import sys, importlib, pytest; from tools.gpu_check import _hide; _hide(['ffcv', 'mm']); "
            f"[importlib.import_module(m) for m in {modules!r}]; "
            "sys.exit(pytest.main(['--collect-only', '-q', '-m', 'gpu', '-p', 'no:cacheprovider', 'tests']))")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tests/test_gpu.py::" in r.stdout


def test_without_cuda_only_gpu_marked_tests_skip_even_in_a_folder_named_gpu(tmp_path):
    """conftest skips the tests marked ``gpu`` when CUDA is missing, and no other: a checkout in a folder named
    ``gpu`` (a keyword of every test in it) keeps its CPU tests."""
    tests = tmp_path / "gpu" / "tests"
    tests.mkdir(parents=True)
    (tests / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tests / "test_two.py").write_text("import pytest\n\ndef test_cpu():\n    pass\n\n"
                                       "@pytest.mark.gpu\ndef test_gpu():\n    pass\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tests)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    import torch

    assert "PASSED gpu/tests/test_two.py::test_cpu" in r.stdout, r.stdout[-2000:]
    want = "2 passed" if torch.cuda.is_available() else "1 passed, 1 skipped"
    assert r.stdout.splitlines()[-1].startswith(want), r.stdout[-2000:]
