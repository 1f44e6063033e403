"""``make gpu-check`` (= ``python -m tools.gpu_check --out DIR``): verify and measure the GPU path on one GPU
machine in at most six minutes; write ``DIR/gpu-check.json`` and a short ``DIR/gpu-check.md``.

It makes its own data and runs these steps, in this order (``env`` and ``data`` in the background beside
``pytest``), each in a process of its own with its own time box. A step that fails, crashes or runs over its
box is recorded under ``errors`` (its log is ``DIR/logs/STEP.log``) and the other steps still run; the exit
status is 1 when any step failed, 0 otherwise. Goals missed are reported under ``goals``; they do not change
the exit status.

====== ==========================================================================================
env     versions (torch, DALI, CUDA) and the device
data    ImageNet-like photographs (``tools.photos``), CIFAR-size photograph crops, COCO and
        ADE20K layouts of photographs (``tools.bench.dense.write_data``, no OpenMMLab needed) and the
        digits, sharded by ``shards.build``
pytest  ``pytest -m gpu``, counted into ``pytest_gpu``
dali    the DALI loader (RandomResizedCrop 224 + flip + normalise, batch 256) with ``mixed`` decode, mix
        off and RecursiveMix; the same loader on the CPU with all cores; the memory loader on the device;
        one batch's pixel difference between the device decode and the CPU decode
rm      RecursiveMix alone on the device: ms per 256x3x224x224 batch, uint8 and float32 (CUDA events)
dense   the DALI detection and segmentation loaders, dense RecursiveMix off and on, and mmdet's / mmseg's
        own DataLoaders beside them; those need the OpenMMLab stack (the loaders yield mmdet / mmseg
        data samples). Without it: the loaders' DALI graphs alone and the dense mixes alone
trainer ResNet-50, bf16 autocast, channels_last, batch 256: fed by the DALI loader against the same
        batches pre-made on the device (``tools.bench.train.loader_vs_premade``)
nccl    the trainer under ``torchrun --nproc_per_node=1``: an NCCL collective probe in the launched process,
        then a run stopped mid-epoch (``--stop_after_steps``) and resumed (``--resume latest``), whose
        final weights must equal an uninterrupted run's bit for bit
====== ==========================================================================================

``--dry-run`` (= ``--device cpu --tiny``) runs every step with tiny sizes on the CPU (DALI's CPU graph; gloo
instead of NCCL), so the plumbing -- data making, time boxes, error recording, the JSON, the summary and the
exit status -- can be tested without a GPU. ``--without ffcv,mm`` hides those packages from every step (the
GPU machine has neither). docs/gpu-check.md says how a GPU session runs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]

# The steps in the order they start, and each one's time box in seconds. ``env`` and ``data`` run in the
# background beside ``pytest`` (CPU work beside GPU tests); the steps after ``pytest`` wait for them, and all
# of them together stay inside ``BUDGET_S``.
STEPS = ("env", "data", "pytest", "dali", "rm", "dense", "trainer", "nccl")
BACKGROUND = ("env", "data")
TIME_BOX_S = {"env": 60, "data": 120, "pytest": 120, "dali": 90, "rm": 30, "dense": 60, "trainer": 75, "nccl": 100}
BUDGET_S = 360
TINY_SLACK = 3  # the dry run's boxes and budget: a shared CPU imports torch alone in seconds to tens of seconds
NEEDS_DATA = ("dali", "dense", "trainer", "nccl")
# packages the GPU machine lacks, by the name --without takes
WITHOUT = {"ffcv": ("ffcv",), "mm": ("mmcv", "mmdet", "mmseg", "mmengine")}
LOG_TAIL = (6, 240)  # a failed step's error quotes the last lines of its log, each cut to this many characters

GOALS = {
    "dali_mixed": "DALI mixed decode >= 10,000 img/s at 224 (batch 256), RecursiveMix keeping >= 95 % of it",
    "rm_ms": "RecursiveMix <= 0.2 ms per 256x3x224x224 batch, uint8 and float32",
    "trainer_fed": "ResNet-50 fed by DALI >= 0.95x its step rate on pre-made batches",
    "dense_vs_stock": "DALI dense loaders >= 2x mmdet's / mmseg's own DataLoaders (img/s)",
}


@dataclass(frozen=True)
class Sizes:
    """How big each step's work is: ``FULL`` on the GPU machine, ``TINY`` for the CPU dry run."""

    photos: int                 # ImageNet-like training photographs (and a few for val)
    photo_side: tuple           # their longer side, px
    cifar: int                  # CIFAR-size crops for the memory loader
    batch: int                  # DALI and trainer batch
    memory_batch: int
    dali_epochs: int            # epochs per timed DALI job on the device
    memory_epochs: int
    repeats: int                # rounds of side-by-side timing
    rm_shape: tuple
    rm_iters: int
    dense_images: int
    dense_batch: int
    dense_epochs: int
    trainer_data: str           # 'imagenet' (the photographs) or 'cifar' (the crops)
    trainer_model: str          # FAMILY/NAME of trainers.models
    trainer_imagenet: bool
    trainer_batch: int
    trainer_epochs: int
    trainer_repeats: int
    nccl_batch: int             # digits: 1,500 training images
    nccl_epochs: int
    nccl_stop: int              # --stop_after_steps, mid-epoch


FULL = Sizes(photos=2048, photo_side=(300, 500), cifar=20_000, batch=256, memory_batch=512, dali_epochs=4,
             memory_epochs=20, repeats=5, rm_shape=(256, 3, 224, 224), rm_iters=50, dense_images=64, dense_batch=8,
             dense_epochs=3, trainer_data="imagenet", trainer_model="resnet/resnet50", trainer_imagenet=True,
             trainer_batch=256, trainer_epochs=2, trainer_repeats=3, nccl_batch=100, nccl_epochs=2, nccl_stop=20)
TINY = Sizes(photos=32, photo_side=(96, 160), cifar=512, batch=8, memory_batch=64, dali_epochs=1, memory_epochs=1,
             repeats=2, rm_shape=(8, 3, 64, 64), rm_iters=3, dense_images=6, dense_batch=2, dense_epochs=1,
             trainer_data="cifar", trainer_model="small/small_cnn", trainer_imagenet=False, trainer_batch=128,
             trainer_epochs=1, trainer_repeats=1, nccl_batch=300, nccl_epochs=1, nccl_stop=2)


# ==== the parent: runs each step in its own process, merges, writes, exits ==================================
def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_step"]:
        return _step_main(argv[1:])
    if argv[:1] == ["_trainer"]:
        return _trainer_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
    slack = TINY_SLACK if args.tiny else 1
    boxes = {k: v * slack for k, v in TIME_BOX_S.items()}
    budget = args.budget or BUDGET_S * slack
    for item in args.time_box:
        name, _, seconds = item.partition("=")
        if name not in boxes or not _is_number(seconds):
            sys.exit(f"gpu-check: --time-box {item!r}: use STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        boxes[name] = float(seconds)
    unknown = [w for w in args.without.split(",") if w and w not in WITHOUT]
    if unknown:
        sys.exit(f"gpu-check: --without {args.without!r}: hide any of {', '.join(WITHOUT)}, comma-separated")
    steps = [s for s in STEPS if not args.steps or s in args.steps]
    if any(s in steps for s in NEEDS_DATA) and "data" not in steps:
        steps.insert(steps.index("pytest") if "pytest" in steps else 0, "data")
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="rmix-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = dict(work=str(work), out=str(out), device=args.device, tiny=args.tiny, without=args.without,
               cores=os.cpu_count() or 1)
    print(f"gpu-check: device {args.device}{' (tiny sizes)' if args.tiny else ''}, steps {' '.join(steps)}, "
          f"budget {budget:.0f} s, work {work}, logs {out / 'logs'}", flush=True)

    deadline = time.monotonic() + budget
    runs: dict = {}
    background: dict = {}
    started: list = []

    def write() -> dict:
        """The report so far (a step not finished yet reads "not run"): if the machine ends this process, the
        report of the steps that finished is there."""
        report = merge(runs, ctx, steps)
        (out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "gpu-check.md").write_text(markdown(report))
        return report

    try:
        for name in steps:
            if name not in BACKGROUND and name != "pytest":  # the steps after pytest need data
                runs.update({k: step.finish() for k, step in background.items()})
                background = {}
            started.append(_Step(name, ctx, boxes[name], deadline))
            if name in BACKGROUND:
                background[name] = started[-1]
            else:
                runs[name] = started[-1].finish()
            write()
        runs.update({k: step.finish() for k, step in background.items()})
    except KeyboardInterrupt:  # the steps run in sessions of their own: Ctrl-C does not reach them
        for step in started:
            step.stop()
        raise

    report = write()
    print(markdown(report), flush=True)
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if report["errors"] else 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check-out", help="folder for gpu-check.json, gpu-check.md and logs/")
    p.add_argument("--work", help="scratch folder for the data (default: a temporary folder, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds per step on a CPU)")
    p.add_argument("--dry-run", action="store_true", help="--device cpu --tiny: every step on the CPU")
    p.add_argument("--steps", nargs="+", choices=STEPS, help="run only these steps (data is added when needed)")
    p.add_argument("--budget", type=float, help=f"seconds for all steps together (default {BUDGET_S}, "
                   f"{TINY_SLACK}x that with --tiny, as each step's time box)")
    p.add_argument("--time-box", action="append", default=[], metavar="STEP=SECONDS",
                   help="override one step's time box (repeatable)")
    p.add_argument("--without", default="", metavar="ffcv,mm",
                   help="hide these packages from every step, as on a machine without them")
    return p


def _is_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


class _Step:
    """One step in a child process of its own session: started now, killed when its box or the budget ends."""

    def __init__(self, name: str, ctx: dict, box: float, deadline: float):
        self.name, self.ctx = name, ctx
        out = Path(ctx["out"])
        self.result_path = Path(ctx["work"]) / "results" / f"{name}.json"
        self.result_path.parent.mkdir(parents=True, exist_ok=True)
        self.result_path.unlink(missing_ok=True)
        self.log_path = out / "logs" / f"{name}.log"
        self.box = box
        self.start = time.monotonic()
        self.stop_at = min(self.start + box, deadline)
        self.proc = None
        if self.stop_at - self.start < 1:
            return  # nothing left of the budget: finish() records it
        path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path)
        cmd = [sys.executable, "-m", "tools.gpu_check", "_step", name,
               json.dumps(dict(ctx, result=str(self.result_path)))]
        print(f"gpu-check: {name} ... (time box {self.stop_at - self.start:.0f} s)", flush=True)
        with open(self.log_path, "wb") as log:
            # a session of its own, so a time box ends the step's whole process tree (pytest, torchrun, DALI)
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                         start_new_session=True)

    def finish(self) -> dict:
        """Wait for the step (at most until its box ends); ``{seconds, result, error}``."""
        if self.proc is None:
            return dict(seconds=0.0, result={}, error="not run: the time budget of all steps was spent")
        timed_out = False
        try:
            rc = self.proc.wait(timeout=max(0.0, self.stop_at - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            self._kill()
            rc = self.proc.wait()
        seconds = time.monotonic() - self.start
        self._kill(grace=0.0)  # whatever the step left running (its session outlives it only through those)
        result = {}
        if self.result_path.is_file():
            try:
                result = json.loads(self.result_path.read_text())
            except json.JSONDecodeError:
                result = {}
        error = None
        if timed_out:
            why = "its time box" if self.stop_at == self.start + self.box else "the budget of all steps"
            error = f"timed out after {seconds:.0f} s ({why}); last output: {self._tail()}"
        elif rc != 0:
            error = result.get("error") or f"exit status {rc}; last output: {self._tail()}"
        elif result.get("error"):
            error = result["error"]
        print(f"gpu-check: {self.name} {'FAILED' if error else 'done'} in {seconds:.1f} s"
              f"{': ' + error.splitlines()[0] if error else ''}", flush=True)
        return dict(seconds=round(seconds, 1), result=result, error=error)

    def stop(self) -> None:
        if self.proc is not None:
            self._kill()

    def _kill(self, grace: float = 3.0) -> None:
        """End the step's session (its pid is the group's id): SIGTERM, ``grace`` seconds for the step, then
        SIGKILL to whatever is left of it."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            if sig == signal.SIGTERM:
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
        self.proc.wait()

    def _tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no log)"
        return tail(lines, *LOG_TAIL)


def tail(lines: list, n: int, width: int) -> str:
    """The last ``n`` non-empty lines, each cut to ``width`` characters, on one line."""
    lines = [ln.strip() for ln in lines if ln.strip()][-n:]
    return " | ".join(ln if len(ln) <= width else ln[:width] + "..." for ln in lines) or "(empty log)"


def merge(runs: dict, ctx: dict, steps: list) -> dict:
    """The report: the keys every reader relies on (None when not measured), goals, errors, details."""
    report: dict = {
        "device": None, "torch_version": None, "dali_version": None, "cuda_version": None,
        "mode": "dry run on the CPU" if ctx["device"] == "cpu" else "GPU",
        "sizes": asdict(TINY if ctx["tiny"] else FULL),
        "pytest_gpu": {"passed": None, "failed": None},
        "dali_mixed_img_s": {"off": None, "recursive_mix": None},
        "dali_cpu_img_s": None,
        "memory_cuda_img_s": None,
        "rm_ms_per_batch": {"uint8": None, "float32": None},
        "dense_img_s": {"det_off": None, "det_rm": None, "seg_off": None, "seg_rm": None},
        "trainer_fed_ratio": None,
        "nccl_ok": None,
    }
    errors, details, notes, seconds = {}, {}, [], {}
    for name in steps:
        run = runs.get(name, dict(seconds=0.0, result={}, error="not run"))
        seconds[name] = run["seconds"]
        result = run["result"]
        for key, value in result.get("values", {}).items():
            if isinstance(report.get(key), dict) and isinstance(value, dict):
                report[key].update(value)
            else:
                report[key] = value
        if result.get("details"):
            details[name] = result["details"]
        notes += [f"{name}: {n}" for n in result.get("notes", [])]
        if run["error"]:
            errors[name] = run["error"]
    report["goals"] = goals(report, details)
    report["errors"] = errors
    report["notes"] = notes
    report["seconds"] = seconds
    report["details"] = details
    return report


def goals(report: dict, details: dict) -> dict:
    """Each goal with the values it is judged on and whether it was met (None: not measured here)."""
    def judged(ok, **values):
        return {"goal": None, **values, "met": ok}

    out = {}
    if report["mode"] != "GPU" or report["sizes"] != asdict(FULL):
        return {name: {"goal": text, "met": None, "why_not": "judged at full size on a GPU only"}
                for name, text in GOALS.items()}
    off, on = report["dali_mixed_img_s"]["off"], report["dali_mixed_img_s"]["recursive_mix"]
    keeps = details.get("dali", {}).get("rm_keeps", {}).get("median")
    out["dali_mixed"] = judged(None if off is None or keeps is None else off >= 10_000 and keeps >= 0.95,
                               off_img_s=off, recursive_mix_img_s=on, rm_keeps=keeps)
    u8, f32 = report["rm_ms_per_batch"]["uint8"], report["rm_ms_per_batch"]["float32"]
    out["rm_ms"] = judged(None if u8 is None or f32 is None else max(u8, f32) <= 0.2, uint8_ms=u8, float32_ms=f32)
    ratio = report["trainer_fed_ratio"]
    out["trainer_fed"] = judged(None if ratio is None else ratio >= 0.95, ratio=ratio)
    stock = details.get("dense", {}).get("stock_img_s") or {}
    dense = report["dense_img_s"]
    vs = {t: dense[f"{t}_off"] / stock[f"{t}_off"] for t in ("det", "seg")
          if dense.get(f"{t}_off") and stock.get(f"{t}_off")}
    out["dense_vs_stock"] = judged(None if len(vs) < 2 else min(vs.values()) >= 2.0, ratios=vs or None,
                                   why_not=None if vs else "no stock rows: the OpenMMLab stack is not installed here")
    for name, g in out.items():
        g["goal"] = GOALS[name]
    return out


def _fmt(value, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def markdown(r: dict) -> str:
    """The short summary: what ran where, the numbers beside their goals, errors, notes."""
    d = r["details"]
    met = {True: "yes", False: "**no**", None: "n/a"}
    g = r["goals"]
    batch = r["sizes"]["batch"]
    lines = [f"# gpu-check: {r['device'] or 'device unknown'}", "",
             f"{r['mode']}; torch {r['torch_version']}, DALI {r['dali_version']}, CUDA {r['cuda_version']}; "
             f"{'all steps passed' if not r['errors'] else str(len(r['errors'])) + ' step(s) failed'}.", "",
             "| measurement | value | goal met |", "| --- | ---: | :---: |"]
    dm = r["dali_mixed_img_s"]
    keeps = d.get("dali", {}).get("rm_keeps", {}).get("median")
    lines += [f"| DALI loader on the device, RandomResizedCrop 224 + flip, batch {batch}, mix off | "
              f"{_fmt(dm['off'], ' img/s')} | {met[g['dali_mixed']['met']]} |",
              f"| ... with RecursiveMix (share of mix off, paired rounds) | {_fmt(dm['recursive_mix'], ' img/s')} "
              f"({_fmt(None if keeps is None else 100 * keeps, ' %', 1)}) | |",
              f"| the same loader on the CPU, {d.get('dali', {}).get('cpu_threads', '?')} threads | "
              f"{_fmt(r['dali_cpu_img_s'], ' img/s')} | |",
              f"| memory loader on the device (CIFAR-size), mix off | {_fmt(r['memory_cuda_img_s'], ' img/s')} | |"]
    rm = r["rm_ms_per_batch"]
    shape = "x".join(map(str, r["sizes"]["rm_shape"]))
    lines += [f"| RecursiveMix alone, {shape}, uint8 / float32 | {_fmt(rm['uint8'], ' ms', 3)} / "
              f"{_fmt(rm['float32'], ' ms', 3)} | {met[g['rm_ms']['met']]} |"]
    dense = r["dense_img_s"]
    if any(v is not None for v in dense.values()):
        stock = d.get("dense", {}).get("stock_img_s") or {}

        def four(rows: dict) -> str:
            return " / ".join(_fmt(rows.get(k)) for k in ("det_off", "det_rm", "seg_off", "seg_rm"))

        lines += [f"| dense DALI loaders, det off / RM, seg off / RM (img/s) | {four(dense)} | "
                  f"{met[g['dense_vs_stock']['met']]} |",
                  f"| mmdet's / mmseg's own DataLoaders, the same rows | {four(stock)} | |"]
    else:
        graph = d.get("dense", {}).get("graph_img_s") or {}
        mix = d.get("dense", {}).get("mix_ms") or {}
        lines += [f"| dense DALI graphs alone (no OpenMMLab here), det / seg | {_fmt(graph.get('det'))} / "
                  f"{_fmt(graph.get('seg'))} img/s | n/a |",
                  f"| dense RecursiveMix alone, det / seg | {_fmt(mix.get('det'), ' ms', 2)} / "
                  f"{_fmt(mix.get('seg'), ' ms', 2)} | |"]
    tr = d.get("trainer", {})
    lines += [f"| trainer fed by DALI / pre-made batches ({tr.get('model', '?')}, batch {tr.get('batch', '?')}, "
              f"{tr.get('amp', '?')}) | "
              f"{_fmt(r['trainer_fed_ratio'], 'x', 3)} | {met[g['trainer_fed']['met']]} |"]
    nc = d.get("nccl", {})
    lines += [f"| torchrun + {nc.get('backend', '?')}: stop at step {nc.get('stopped_at_step', '?')}, resume, "
              f"weights equal an uninterrupted run's | {met[r['nccl_ok']] if r['nccl_ok'] is not None else 'n/a'} | |"]
    pg = r["pytest_gpu"]
    lines += [f"| pytest -m gpu: passed / failed / skipped | {pg['passed']} / {pg['failed']} / {pg.get('skipped')} | |",
              ""]
    lines += ["Goals: " + "; ".join(f"{v['goal']}: {met[v['met']]}" for v in g.values()), ""]
    if r["errors"]:
        lines += ["## Errors", ""] + [f"- **{k}**: {v}" for k, v in r["errors"].items()] + [""]
    if r["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in r["notes"]] + [""]
    lines += ["Seconds per step: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()), ""]
    return "\n".join(lines)


# ==== a child: one step ======================================================================================
class Context:
    """What a step gets: the device, the sizes, the scratch folder, and where its result goes."""

    def __init__(self, raw: dict):
        self.raw = raw
        self.work, self.out = Path(raw["work"]), Path(raw["out"])
        self.device_name = raw["device"]
        self.sizes = TINY if raw["tiny"] else FULL
        self.cores = int(raw["cores"])
        self.without = [w for w in raw["without"].split(",") if w]
        self.result_path = Path(raw["result"])
        self.result: dict = {"values": {}, "details": {}, "notes": []}
        self.failures: list = []
        self._device = None

    @property
    def device(self):
        import torch

        if self._device is None:
            if self.device_name == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("no CUDA device here: run the CPU dry run with --dry-run")
            self._device = torch.device("cuda", 0) if self.device_name == "cuda" else torch.device("cpu")
        return self._device

    @property
    def cuda(self) -> bool:
        return self.device_name == "cuda"

    def data(self) -> dict:
        path = self.work / "data.json"
        if not path.is_file():
            raise RuntimeError("no data: the data step did not finish (see its log)")
        return json.loads(path.read_text())

    def value(self, key: str, value) -> None:
        self.result["values"][key] = value
        self.save()

    def detail(self, key: str, value) -> None:
        self.result["details"][key] = value
        self.save()

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.result["notes"].append(text)
        self.save()

    @contextmanager
    def part(self, label: str):
        """One measurement of a step: an exception is recorded (with its traceback in the log) and the step
        goes on with its next part; the step fails at its end."""
        try:
            yield
        except Exception as e:
            traceback.print_exc()
            self.failures.append(f"{label}: {type(e).__name__}: {e}".strip())
            self.result["error"] = "; ".join(self.failures)
            self.save()

    def save(self) -> None:
        """Written after every measurement, so a step that dies later keeps what it measured."""
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        tmp.replace(self.result_path)


def _hide(packages: list) -> None:
    """Make ``import`` of each hidden package fail as if it were not installed."""
    for name in packages:
        for module in WITHOUT[name]:
            sys.modules[module] = None  # import raises ModuleNotFoundError


def _step_main(argv: list) -> int:
    name, raw = argv[0], json.loads(argv[1])
    ctx = Context(raw)
    _hide(ctx.without)
    ctx.save()
    try:
        STEP_FUNCS[name](ctx)
    except BaseException as e:  # recorded with its traceback in the log; the parent reads the one line
        traceback.print_exc()
        ctx.failures.append(f"{type(e).__name__}: {e}".strip())
        ctx.result["error"] = "; ".join(ctx.failures)
        ctx.save()
    return 1 if ctx.failures else 0


def nccl_version() -> str:
    """NCCL's version as torch reports it (a tuple in recent releases, an int in older ones)."""
    import torch

    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def step_env(ctx: Context) -> None:
    import platform

    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    cpu = f"cpu ({platform.processor() or platform.machine()})"
    device = torch.cuda.get_device_name(0) if ctx.cuda and cuda else cpu
    ctx.value("device", device)
    ctx.value("torch_version", torch.__version__)
    ctx.value("cuda_version", torch.version.cuda)
    versions = {"python": platform.python_version(), "torchvision": torchvision.__version__,
                "cudnn": torch.backends.cudnn.version() if cuda else None,
                "nccl": nccl_version() if cuda else None, "cores": ctx.cores}
    ctx.detail("versions", versions)
    for pkg in ("ffcv", "mmdet", "mmseg", "webdataset"):  # found, not imported (ffcv's import alone takes seconds)
        versions[pkg] = sys.modules.get(pkg, True) is not None and importlib.util.find_spec(pkg) is not None
    ctx.detail("versions", versions)
    try:
        import nvidia.dali as dali
    except ImportError as e:
        raise RuntimeError(f"nvidia.dali does not import ({e}): install the wheels of the bundle into /tmp/site and "
                           "put /tmp/site on PYTHONPATH (docs/gpu-check.md)") from None
    ctx.value("dali_version", dali.__version__)
    if ctx.cuda and not cuda:
        raise RuntimeError("no CUDA device here: run the CPU dry run with --dry-run")


# -- data ---------------------------------------------------------------------------------------------------
def _write_photo_chunk(job: tuple) -> int:
    """Photographs ``start..stop`` of one split (``tools.photos.photo_crop``), each chunk its own stream."""
    import numpy as np

    from tools.photos import photo_crop, source_photographs

    root, split, start, stop, classes, side, seed = job
    rng = np.random.default_rng([seed, start, split == "val"])
    photos = source_photographs()
    for i in range(start, stop):
        wnid = f"n{i % classes:08d}"
        d = Path(root) / split / wnid
        d.mkdir(parents=True, exist_ok=True)
        photo_crop(rng, photos, side).save(d / f"{wnid}_{i}.JPEG", quality=90)
    return stop - start


def write_photos(root: Path, n_train: int, n_val: int, side: tuple, workers: int, classes: int = 10) -> Path:
    """An ImageNet folder of photograph crops (``tools.photos``), written by ``workers`` processes."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, n in (("train", n_train), ("val", n_val)):
        step = max(1, -(-n // workers))
        jobs += [(str(root), split, a, min(n, a + step), classes, tuple(side), 0) for a in range(0, n, step)]
    with ProcessPoolExecutor(workers) as pool:
        assert sum(pool.map(_write_photo_chunk, jobs)) == n_train + n_val
    return root


def step_data(ctx: Context) -> None:
    from shards.build import ShardParams, build
    from tools.bench.dense import write_data
    from tools.photos import write_photo_cifar

    s, out, t0 = ctx.sizes, ctx.work / "shards", time.perf_counter()
    timings = {}
    src = write_photos(ctx.work / "imagenet-src", s.photos, max(8, s.photos // 64), s.photo_side, ctx.cores)
    build(ShardParams(dataset="imagenet", formats=["wds"], samples_per_shard=256), src, out, workers=ctx.cores,
          progress=False)
    timings["imagenet"] = round(time.perf_counter() - t0, 1)
    cifar = write_photo_cifar(ctx.work / "cifar-src", n_train=s.cifar, n_val=256)
    build(ShardParams(dataset="cifar10", formats=["wds"], samples_per_shard=8192), cifar, out, workers=ctx.cores,
          progress=False)
    timings["cifar"] = round(time.perf_counter() - t0 - sum(timings.values()), 1)
    coco, ade = write_data(ctx.work / "dense", s.dense_images)
    timings["dense"] = round(time.perf_counter() - t0 - sum(timings.values()), 1)
    build(ShardParams(dataset="digits", formats=["wds"]), None, out, workers=ctx.cores, progress=False)
    timings["digits"] = round(time.perf_counter() - t0 - sum(timings.values()), 1)
    paths = dict(imagenet=str(out / "imagenet"), cifar=str(out / "cifar10"), digits=str(out / "digits"),
                 coco=str(coco), ade=str(ade))
    (ctx.work / "data.json").write_text(json.dumps(paths, indent=1))
    ctx.detail("seconds", timings)
    ctx.detail("paths", paths)


# -- pytest -m gpu --------------------------------------------------------------------------------------------
def count_junit(path: Path) -> dict:
    """passed / failed / skipped of a pytest junit XML; a collection or fixture error counts as failed."""
    passed, failed, skipped, names = 0, 0, 0, []
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            failed += 1
            names.append(f"{case.get('classname', '')}::{case.get('name', '')}")
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
    return {"passed": passed, "failed": failed, "skipped": skipped, "failed_tests": names}


def step_pytest(ctx: Context) -> None:
    xml = ctx.out / "logs" / "pytest-gpu.xml"
    xml.unlink(missing_ok=True)
    args = ["-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"]
    # the same interpreter with the same packages hidden; pytest's exit status is passed on
    code = (f"import sys, pytest; from tools.gpu_check import _hide; _hide({ctx.without!r}); "
            f"sys.exit(pytest.main({args!r}))")
    # CI=1 asks tests/mm_fixtures.py to insist on the OpenMMLab stack, which a GPU machine does not have
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    rc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env).returncode
    if not xml.is_file():
        raise RuntimeError(f"pytest exited with status {rc} and wrote no report")
    counts = count_junit(xml)
    ctx.value("pytest_gpu", {k: counts[k] for k in ("passed", "failed", "skipped")})
    if counts["failed_tests"]:
        ctx.detail("failed_tests", counts["failed_tests"])
    if counts["failed"] or rc not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu: {counts['failed']} failed (exit status {rc}): "
                           f"{', '.join(counts['failed_tests']) or 'see logs/pytest.log'}")


# -- DALI, the memory loader ------------------------------------------------------------------------------------
def _epochs(run: Callable[[], int], n: int) -> Callable[[], int]:
    return lambda: sum(run() for _ in range(n))


def _timing(t) -> dict:
    lo, hi = t.spread
    return {"img_s": t.per_s, "img_s_min": lo, "img_s_max": hi, "img_cpu_s": t.per_cpu_s, "images": t.items}


def decode_gap(a, b, std) -> dict:
    """Pixel difference of two normalised batches in grey levels (0..255): per-image mean, the 99th
    percentile and the maximum over the batch."""
    import torch

    s = torch.tensor(std).view(1, 3, 1, 1)
    diff = ((a.float().cpu() - b.float().cpu()) * s).abs()
    flat = diff.flatten()
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    return {"mean_per_image_max": diff.mean((1, 2, 3)).max().item(), "mean": diff.mean().item(),
            "p99": sample.quantile(0.99).item(), "max": diff.max().item()}


def step_dali(ctx: Context) -> None:
    import torch

    from pipelines import build_loader
    from pipelines.presets import IMAGENET_STD
    from rmix import RecursiveMix
    from tools.bench.loaders import loader_epochs
    from tools.timing import measure, measure_side_by_side, paired

    s, data, dev = ctx.sizes, ctx.data(), ctx.device

    def dali(device, mix=None, seed=0):
        return build_loader(data["imagenet"], "train", backend="dali", batch_size=s.batch, train=True, device=device,
                            mix=mix, num_workers=ctx.cores, seed=seed)

    with ctx.part("device loader"):
        jobs = {"off": _epochs(loader_epochs(dali(dev)), s.dali_epochs),
                "recursive_mix": _epochs(loader_epochs(dali(dev, RecursiveMix(0.5, seed=0))), s.dali_epochs)}
        cells = measure_side_by_side(jobs, s.repeats, dev)
        del jobs
        mid, lo, hi = paired(cells["recursive_mix"], cells["off"])
        ctx.value("dali_mixed_img_s", {"off": cells["off"].per_s, "recursive_mix": cells["recursive_mix"].per_s})
        ctx.detail("rm_keeps", {"median": mid, "min": lo, "max": hi, "rounds": s.repeats})
        ctx.detail("device_rows", {k: _timing(t) for k, t in cells.items()})

    with ctx.part("decode difference"):  # one batch of the device decode against the CPU decode of the same crops
        a, b = next(iter(dali(dev, seed=3))), next(iter(dali("cpu", seed=3)))
        gap = decode_gap(a.images, b.images, IMAGENET_STD)
        gap["labels_equal"] = bool(torch.equal(a.labels.cpu(), b.labels))
        ctx.detail("decode_vs_cpu_levels", gap)
        del a, b

    with ctx.part("CPU loader"):
        ctx.detail("cpu_threads", ctx.cores)
        cpu = measure(loader_epochs(dali("cpu")), max(1, s.repeats - 2), "cpu")
        ctx.value("dali_cpu_img_s", cpu.per_s)
        ctx.detail("cpu_row", _timing(cpu))

    def memory(mix=None):
        return build_loader(data["cifar"], "train", backend="memory", batch_size=s.memory_batch, train=True,
                            device=dev, mix=mix, num_workers=ctx.cores)

    with ctx.part("memory loader"):
        jobs = {"off": _epochs(loader_epochs(memory()), s.memory_epochs),
                "recursive_mix": _epochs(loader_epochs(memory(RecursiveMix(0.5, seed=0))), s.memory_epochs)}
        cells = measure_side_by_side(jobs, s.repeats, dev)
        ctx.value("memory_cuda_img_s", cells["off"].per_s)
        ctx.detail("memory_rows", {k: _timing(t) for k, t in cells.items()})


# -- RecursiveMix alone ------------------------------------------------------------------------------------------
def time_mix(call: Callable[[int], None], iters: int, device, repeats: int = 5) -> dict:
    """ms per call of ``call(i)``: CUDA events around ``iters`` calls on a GPU, the host clock on a CPU; the
    median and range of ``repeats`` after a warm-up."""
    import torch

    for i in range(3):
        call(i)
    runs = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            begin.record()
            for i in range(iters):
                call(i)
            end.record()
            end.synchronize()
            runs.append(begin.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            for i in range(iters):
                call(i)
            runs.append((time.perf_counter() - t0) * 1e3 / iters)
    return {"ms": statistics.median(runs), "ms_min": min(runs), "ms_max": max(runs), "iters": iters}


def step_rm(ctx: Context) -> None:
    import torch

    from rmix import RecursiveMix

    s, dev = ctx.sizes, ctx.device
    n, k = s.rm_shape[0], 1000
    g = torch.Generator(device=dev).manual_seed(0)
    labels = torch.randint(0, k, (n,), device=dev, generator=g)
    logits = torch.zeros(n, k, device=dev)
    rows = {}
    for dtype in ("uint8", "float32"):
        with ctx.part(dtype):
            # as inside a loader: each batch a tensor of its own (three in turn), the history borrowed, not copied
            if dtype == "uint8":
                batches = [torch.randint(0, 256, s.rm_shape, dtype=torch.uint8, device=dev, generator=g)
                           for _ in range(3)]
            else:
                batches = [torch.rand(s.rm_shape, device=dev, generator=g) for _ in range(3)]
            mix = RecursiveMix(0.5, num_classes=k, seed=0)
            mix.borrow_batches()

            def call(i: int) -> None:
                mix(batches[i % 3], labels)
                mix.record_logits(logits)

            rows[dtype] = time_mix(call, s.rm_iters, dev)
            ctx.value("rm_ms_per_batch", {k_: v["ms"] for k_, v in rows.items()})
            ctx.detail("rows", rows)
    ctx.detail("timer", "CUDA events" if dev.type == "cuda" else "host clock")


# -- dense --------------------------------------------------------------------------------------------------
def have_mm() -> Optional[str]:
    """None when mmdet, mmseg and mmcv's compiled ops import; else why not."""
    try:
        import mmdet  # noqa: F401
        import mmseg  # noqa: F401
        from mmcv.ops import nms  # noqa: F401
    except Exception as e:  # ImportError, or mmdet's assertion on the mmcv version it finds
        return f"{type(e).__name__}: {e}"
    return None


def step_dense(ctx: Context) -> None:
    from tools.bench.dense import dali_loader, epoch_job, make_mix, stock_loader
    from tools.timing import measure_side_by_side

    s, data, dev = ctx.sizes, ctx.data(), ctx.device
    roots = {"det": Path(data["coco"]), "seg": Path(data["ade"])}
    missing = have_mm()
    if missing is not None:
        ctx.note("dense_img_s and the stock rows are n/a: the DALI detection / segmentation loaders yield mmdet / "
                 "mmseg data samples, and mmdet imports mmcv's compiled ops (a ~20-minute source build; "
                 f"not on this machine: {missing}). Measured instead: the loaders' DALI graphs alone and the "
                 "dense mixes alone on the device.")
        dense_without_mm(ctx, roots)
        return
    rows, stock = {}, {}
    for task, root in roots.items():
        with ctx.part(task):
            jobs = {}
            for rm in (False, True):
                loader = dali_loader(task, root, s.dense_batch, ctx.cores, dev, make_mix(task, rm))
                jobs["dali", rm] = _epochs(epoch_job(loader, task), s.dense_epochs)
                stock_rows = stock_loader(task, root, s.dense_batch, min(ctx.cores, 8))
                jobs["stock", rm] = _epochs(epoch_job(stock_rows, task, make_mix(task, rm), dev), s.dense_epochs)
            cells = measure_side_by_side(jobs, s.repeats, dev)
            del jobs
            for (kind, rm), t in cells.items():
                (rows if kind == "dali" else stock)[f"{task}_{'rm' if rm else 'off'}"] = t.per_s
            ctx.value("dense_img_s", dict(rows))
            ctx.detail("stock_img_s", dict(stock))
            ctx.detail(f"{task}_rows", {f"{k[0]}_{'rm' if k[1] else 'off'}": _timing(t) for k, t in cells.items()})


def det_graph_job(root: Path, batch: int, workers: int, dev):
    """One training epoch of :func:`pipelines.dali_det.det_pipeline` over the COCO images: decode, keep-ratio
    resize, flip and pad, on the device (``mixed`` decode with CUDA); returns the images read."""
    from pipelines.dali_det import det_pipeline

    files = sorted(str(f) for f in (root / "train2017").iterdir())
    cuda = dev.type == "cuda"
    pipe = det_pipeline(files=files, is_training=True, gpu=cuda, batch_size=batch, num_threads=workers,
                        device_id=(dev.index or 0) if cuda else None, seed=0)
    pipe.build()
    steps = max(1, len(files) // batch)

    def run() -> int:
        for _ in range(steps):
            pipe.run()
        return steps * batch

    return run


def dense_without_mm(ctx: Context, roots: dict) -> None:
    """The loaders' DALI graphs (decode, resize, flip, pad on the device) read through their iterator, without
    the mmdet / mmseg wrapping; and the dense mixes on a batch of the shape those graphs give."""
    import torch

    from rmix import DetRecursiveMix, SegRecursiveMix
    from tools.bench.dense import dali_loader
    from tools.timing import measure

    s, dev = ctx.sizes, ctx.device
    graph = {}
    for task, root in roots.items():
        with ctx.part(f"{task} graph"):
            if task == "det":  # the detection loader parses its annotations with mmdet: its graph alone needs none
                graph[task] = measure(_epochs(det_graph_job(root, s.dense_batch, ctx.cores, dev), s.dense_epochs),
                                      s.repeats, dev).per_s
                ctx.detail("graph_img_s", graph)
                continue
            loader = dali_loader(task, root, s.dense_batch, ctx.cores, dev, None)
            iterator = getattr(loader, "iterator", None)
            if iterator is None:
                ctx.note(f"{task}: the loader shows no DALI iterator; its graph is not timed alone")
                continue

            def run(it=iterator) -> int:
                return sum(out[0]["images"].shape[0] for out in it)

            graph[task] = measure(_epochs(run, s.dense_epochs), s.repeats, dev).per_s
            ctx.detail("graph_img_s", graph)
            del loader, iterator
    # the mixes alone, on device batches of the loaders' padded shapes at ATSS's / UPerNet's sizes (uint8
    # images; detection boxes on the host, as the loader hands them over; label maps on the device)
    n = s.dense_batch
    det_hw, seg_hw = ((128, 160), (64, 64)) if ctx.raw["tiny"] else ((800, 1088), (512, 512))
    g = torch.Generator().manual_seed(0)
    mix_ms = {}
    with ctx.part("det mix"):
        det_images = [torch.randint(0, 256, (n, 3, *det_hw), dtype=torch.uint8, generator=g).to(dev)
                      for _ in range(3)]
        h, w = det_hw
        boxes = [torch.tensor([[0.1 * w, 0.1 * h, 0.4 * w, 0.5 * h], [0.5 * w, 0.3 * h, 0.9 * w, 0.8 * h]])
                 for _ in range(n)]
        labels = [torch.tensor([0, 2]) for _ in range(n)]
        det = DetRecursiveMix(alpha=0.5, seed=0)
        det.borrow_batches()
        mix_ms["det"] = time_mix(lambda i: det(det_images[i % 3], boxes, labels), s.rm_iters, dev)["ms"]
        ctx.detail("mix_ms", mix_ms)
    with ctx.part("seg mix"):
        seg_images = [torch.randint(0, 256, (n, 3, *seg_hw), dtype=torch.uint8, generator=g).to(dev)
                      for _ in range(3)]
        seg_maps = [torch.randint(0, 150, (n, *seg_hw), dtype=torch.uint8, generator=g).to(dev) for _ in range(3)]
        seg = SegRecursiveMix(alpha=0.5, seed=0)
        seg.borrow_batches()
        mix_ms["seg"] = time_mix(lambda i: seg(seg_images[i % 3], seg_maps[i % 3]), s.rm_iters, dev)["ms"]
        ctx.detail("mix_ms", mix_ms)
    ctx.detail("mix_shapes", {"det": [n, 3, *det_hw], "seg": [n, 3, *seg_hw]})


# -- the trainer fed by DALI ------------------------------------------------------------------------------------
def step_trainer(ctx: Context) -> None:
    from pipelines import build_loader
    from rmix import RecursiveMix
    from tools.bench.train import loader_vs_premade
    from trainers.config import TrainConfig
    from trainers.models import build_model

    s, data, dev = ctx.sizes, ctx.data(), ctx.device
    family, _, name = s.trainer_model.partition("/")
    amp = "bf16" if dev.type == "cuda" else "off"
    root = data[s.trainer_data]
    cfg = TrainConfig(data="imagenet" if s.trainer_data == "imagenet" else "cifar10", data_dir=root,
                      model_file=family, model_name=name, epoch=1, batch_size=s.trainer_batch, lr=0.05,
                      aug="recursive_mix", aug_omega=0.5, print_freq=10**9, amp=amp,
                      channels_last=True, progress=False).validate()

    def dali(mix=None):
        return build_loader(root, "train", backend="dali", batch_size=s.trainer_batch, train=True, device=dev,
                            mix=mix, channels_last=True, num_workers=ctx.cores)

    loader = dali(RecursiveMix(0.5, seed=0))
    fed = loader_vs_premade(loader, dali(), lambda: build_model(family, name, loader.num_classes,
                                                                imagenet=s.trainer_imagenet).to(dev),
                            cfg, dev, epochs=s.trainer_epochs, repeats=s.trainer_repeats, channels_last=True)
    ratios = fed["ratios"]
    ctx.value("trainer_fed_ratio", statistics.median(ratios))
    ctx.detail("ratios", ratios)
    ctx.detail("model", s.trainer_model)
    ctx.detail("batch", s.trainer_batch)
    ctx.detail("amp", amp)
    ctx.detail("rows", {k: _timing(fed[k]) for k in ("loader", "in-memory")})


# -- NCCL: the trainer under torchrun, stopped and resumed --------------------------------------------------------
def step_nccl(ctx: Context) -> None:
    import torch

    s, data = ctx.sizes, ctx.data()
    runs = ctx.work / "nccl-runs"
    shutil.rmtree(runs, ignore_errors=True)
    backend = "nccl" if ctx.cuda else "gloo"
    # the same flags for all three launches; omega 0 keeps roi_align's atomic (run-to-run varying) backward out of
    # the weights, so an exact resume shows as equal bits
    flags = ["--data", "digits", "--data_dir", data["digits"], "--save_dir", str(runs), "--model_file", "small",
             "--model_name", "small_cnn", "--epoch", str(s.nccl_epochs), "--batch_size", str(s.nccl_batch),
             "--lr", "0.05",
             "--num_workers", str(min(ctx.cores, 4)), "--aug", "recursive_mix", "--aug_omega", "0",
             "--random_seed", "1", "--loader", "dali", "--device", "cuda" if ctx.cuda else "cpu",
             "--print_freq", "1000", "--no-progress"]
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")  # deterministic cuBLAS (read at CUDA start)
    launches = {}

    def start(tag: str, name: str, extra: list):
        probe, log = ctx.work / f"probe-{tag}.json", ctx.out / "logs" / f"nccl-{tag}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               "-m", "tools.gpu_check", "_trainer", str(probe), backend, *flags, "--name", name, *extra]
        print("$", " ".join(cmd), f"> {log}", flush=True)
        with open(log, "wb") as f:
            return tag, probe, log, time.perf_counter(), subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f,
                                                                          stderr=subprocess.STDOUT)

    def finish(*pending) -> None:
        failed = []
        for tag, probe, log, t0, proc in pending:
            rc = proc.wait()
            launches[tag] = {"exit": rc, "seconds": round(time.perf_counter() - t0, 1),
                             "probe": json.loads(probe.read_text()) if probe.is_file() else None}
            if rc != 0:
                failed.append(f"trainer launch '{tag}' under torchrun exited with status {rc}: "
                              f"{tail(log.read_text(errors='replace').splitlines(), 3, 240)}")
        ctx.detail("launches", launches)
        if failed:
            raise RuntimeError("; ".join(failed))

    # the uninterrupted run and the one stopped mid-epoch are independent: side by side
    finish(start("uninterrupted", "whole", []), start("stopped", "resumed", ["--stop_after_steps", str(s.nccl_stop)]))
    stopped = torch.load(runs / "digits" / "resumed" / "latest.pth", map_location="cpu", weights_only=False)
    ctx.detail("stopped_at_step", stopped["step"])
    ctx.detail("stopped_mid_epoch", bool(stopped["mid_epoch"]))
    finish(start("resumed", "resumed", ["--resume", "latest"]))
    a = torch.load(runs / "digits" / "whole" / "latest.pth", map_location="cpu", weights_only=False)
    b = torch.load(runs / "digits" / "resumed" / "latest.pth", map_location="cpu", weights_only=False)
    same_keys = a["model"].keys() == b["model"].keys()
    diff = max(((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"]
                if k in b["model"]), default=float("inf"))
    exact = same_keys and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    probes_ok = all(v["probe"] and v["probe"].get("ok") and v["probe"]["backend"] == backend for v in launches.values())
    ctx.detail("backend", backend)
    ctx.detail("weights_max_abs_diff", diff)
    ctx.detail("final_steps", [a["step"], b["step"]])
    ok = bool(exact and probes_ok and stopped["mid_epoch"] and stopped["step"] == s.nccl_stop
              and a["step"] == b["step"])
    ctx.value("nccl_ok", ok)
    if not ok:
        raise RuntimeError(f"resume under torchrun/{backend}: weights equal {exact} (max abs diff {diff:.3g}), "
                           f"collective probes ok {probes_ok}, stopped mid-epoch at step {stopped['step']} "
                           f"(asked {s.nccl_stop}), final steps {a['step']} / {b['step']}")


def _trainer_main(argv: list) -> int:
    """``torchrun ... -m tools.gpu_check _trainer PROBE_JSON BACKEND <trainer flags>``: a collective probe on
    the process group torchrun describes, then the trainer (``trainers.classify.main``) with deterministic
    kernels."""
    probe_path, backend, rest = Path(argv[0]), argv[1], argv[2:]
    import torch
    import torch.distributed as dist

    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    probe = {"backend": backend, "ok": False}
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            probe["nccl_version"] = nccl_version()
        dist.init_process_group(backend)
        t = torch.ones(4, device=device) * (rank + 1)
        dist.all_reduce(t)
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": rank})
        dist.barrier()
        probe.update(world=world, all_reduce=t.tolist(), ok=t.tolist() == [world * (world + 1) / 2] * 4
                     and [g["rank"] for g in gathered] == list(range(world)))
        dist.destroy_process_group()
    finally:
        probe_path.write_text(json.dumps(probe))
    from trainers.classify import main as train

    train(rest)
    return 0


STEP_FUNCS = {"env": step_env, "data": step_data, "pytest": step_pytest, "dali": step_dali, "rm": step_rm,
              "dense": step_dense, "trainer": step_trainer, "nccl": step_nccl}


if __name__ == "__main__":
    sys.exit(main())
