"""The ``rmix`` console script: dispatch, help, clear errors."""

import subprocess
import sys

from rmix import cli


def run(*args):
    return subprocess.run([sys.executable, "-m", "rmix.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand():
    r = run("--help")
    assert r.returncode == 0
    for name in ("shards", "verify", "bench", "train", "demo"):
        assert f"  {name}" in r.stdout


def test_unknown_command_is_one_clear_line():
    r = run("shard")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["rmix: unknown command 'shard'; choose one of: shards, verify, bench, train, demo"]


def test_bench_mix_only_runs_the_mix_benchmark(capsys):
    cli.main(["bench", "--mix-only", "--shapes", "cifar-u8", "--repeats", "1", "--iters", "1"])
    out = capsys.readouterr().out
    assert "rm-batch-nearest" in out and "cutmix" in out


def test_console_script_is_installed():
    import importlib.metadata as md

    eps = [e for e in md.entry_points(group="console_scripts") if e.name == "rmix"]
    assert eps and eps[0].value == "rmix.cli:main"
