"""The ``rmix`` console script: real subcommands, help, clear errors; the import graph of the floors."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tools import cli

REPO = Path(__file__).resolve().parents[1]
# each package may import only from the floors below it (and itself)
FLOORS = {"shards": set(), "rmix": set(), "pipelines": {"shards", "rmix"},
          "trainers": {"shards", "rmix", "pipelines"}, "tools": {"shards", "rmix", "pipelines", "trainers"}}


def run(*args):
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    r = run("--help")
    assert r.returncode == 0
    for name in ("shards", "verify", "bench", "train", "demo", "export-backbone", "mm"):
        assert f"  {name} " in r.stdout
    b = run("bench", "--help")
    assert b.returncode == 0
    for name in ("loaders", "mix", "shards", "shards-scale", "train", "dense"):
        assert f"  {name} " in b.stdout
    assert all(f"  {name} " in b.stdout for name in cli.BENCHES)


def test_unknown_command_is_one_clear_line():
    r = run("shard")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [
        "rmix: unknown command 'shard'; choose one of: shards, verify, train, demo, bench, export-backbone, mm"]
    b = run("bench", "--mix-only")
    assert b.returncode != 0
    assert b.stderr.strip().splitlines() == [
        f"rmix bench: unknown benchmark '--mix-only'; choose one of: {', '.join(cli.BENCHES)}"]
    assert list(cli.BENCHES)[:6] == ["loaders", "mix", "shards", "shards-scale", "train", "dense"]


def test_bench_mix_runs_the_mix_benchmark(capsys):
    cli.main(["bench", "mix", "--shapes", "cifar-u8", "--repeats", "1", "--iters", "1"])
    out = capsys.readouterr().out
    assert "rm-batch-nearest" in out and "cutmix" in out


@pytest.mark.slow
def test_bench_train_reuses_the_trainer_step(tmp_path, capsys):
    cli.main(["bench", "train", "--loader", "memory", "--shards", str(tmp_path), "--repeats", "1", "--epochs", "1"])
    out = capsys.readouterr().out
    assert "loader / in-memory:" in out and "goal >= 0.95" in out


def test_bench_train_on_cifar_photographs(tmp_path, capsys):
    """The GPU check's command, here on the CPU: CIFAR-size photograph crops written as CIFAR pickles, sharded,
    and the model named by family/name (the GPU check uses resnet/resnet18)."""
    cli.main(["bench", "train", "--loader", "memory", "--data", "cifar10", "--cifar-n", "1024", "--batch-size", "256",
              "--model", "small/small_cnn", "--shards", str(tmp_path), "--repeats", "1", "--epochs", "1"])
    out = capsys.readouterr().out
    assert "loader / in-memory:" in out and "cifar10, small/small_cnn, batch 256, cpu" in out
    assert (tmp_path / "cifar10" / "manifest.json").is_file()
    assert (tmp_path / "cifar-src" / "cifar-10-batches-py" / "data_batch_1").is_file()


def test_console_script_is_installed():
    import importlib.metadata as md

    eps = [e for e in md.entry_points(group="console_scripts") if e.name == "rmix"]
    assert eps and eps[0].value == "tools.cli:main"


def _imports(path: Path) -> set:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_import_runs_back_up(package):
    """Folders follow the data path: no module imports from a floor above its own, and nothing is
    imported by a string (importlib), where a reader of the code could not see it."""
    for path in sorted((REPO / package).rglob("*.py")):
        upward = _imports(path) & (set(FLOORS) - FLOORS[package] - {package})
        assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)} from above"
        assert "importlib.import_module" not in path.read_text(), path


def test_bench_dense_runs_every_cell_side_by_side(tmp_path, capsys):
    """A tiny ``rmix bench dense``: both tasks, stock and ours, RM off and on, each cell timed in every round;
    the paired RM cost and the mix's own time per batch reach dense.json."""
    import json

    cli.main(["bench", "dense", "--work", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--images", "16",
              "--repeats", "2", "--workers", "1"])
    result = json.loads((tmp_path / "out" / "dense.json").read_text())
    cells = {(r["task"], r["loader"], r["rm"]) for r in result["rows"]}
    assert cells == {(t, l, rm) for t in ("det", "seg") for l in ("stock", "dali") for rm in (False, True)}
    assert all(len(r["walls"]) == 2 and r["images"] > 0 for r in result["rows"])
    for task in ("det", "seg"):
        s = result["summary"][task]
        assert s["mix_ms_per_batch"] > 0 and s["batch_ms_rm_off"] > 0
        assert s["rm_cost_dali_rounds"][0] <= s["rm_cost_dali"] <= s["rm_cost_dali_rounds"][1]
    assert "too few to tell it from noise" in capsys.readouterr().out


@pytest.mark.parametrize("args, said", [
    (["--help"], "(default: dali)"),
    (["--aug", "mixmatch"], "invalid choice: 'mixmatch'"),
    (["--lr", "-1"], "rmix train: --lr must be > 0, got -1.0"),
])
def test_train_answers_help_and_bad_flags_before_importing_torch(args, said):
    """``rmix train --help`` and a bad flag are answered by the parser alone: torch and the loaders (seconds
    of imports) are not loaded for them, and --help shows the defaults."""
    code = ("import sys\nfrom tools import cli\ntry:\n    cli.main(['train', *sys.argv[1:]])\nexcept SystemExit as e:\n"
            "    print(e.code, file=sys.stderr)\n"
            "print('torch' in sys.modules, 'pipelines' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert said in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "False False", r.stderr[-2000:]


def test_train_flag_choices_are_the_registries():
    """trainers.config spells the choices (it must not import torch); they are the registries' names."""
    import pipelines
    import rmix
    from rmix import recursive_mix
    from trainers import config

    assert config.BACKENDS == tuple(pipelines.BACKENDS)
    assert config.MIXES == tuple(rmix.MIXES)
    assert (config.INTERPOLATIONS, config.BOX_MODES) == (recursive_mix.INTERPOLATIONS, recursive_mix.BOX_MODES)


@pytest.mark.parametrize("work_dir", ["empty", "mistyped"])
def test_mm_train_resume_without_a_checkpoint_in_the_work_dir_is_one_line(tmp_path, work_dir):
    """A bare --resume means the work dir's latest checkpoint: where there is none (an empty or mistyped work
    dir) mmengine would log 'resumed from None' and train from scratch."""
    pytest.importorskip("mmseg")
    (tmp_path / "empty").mkdir()
    r = run("mm", "train", "upernet_r50_8xb2-80k_ade20k-512x512", "--resume", "--work-dir", str(tmp_path / work_dir))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"rmix mm train: --resume: no checkpoint in the work dir "
                                             f"{tmp_path / work_dir} (check --work-dir; --resume auto resumes only "
                                             "when there is one)"], r.stderr[-2000:]
