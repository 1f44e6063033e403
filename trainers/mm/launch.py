"""Train and test mmdet / mmseg configs with our backbone: what ``rmix mm train|test`` runs.

    rmix mm train CONFIG --backbone r50_rm.pth [--work-dir DIR] [--resume [CKPT]] [--data-root DIR]
                  [--cfg-options key=value ...]
    torchrun --nproc_per_node=8 -m tools.mm train CONFIG --backbone r50_rm.pth ...
    rmix mm test CONFIG CKPT [--work-dir DIR] [--data-root DIR] [--cfg-options ...]

A thin layer over mmengine's ``Runner``, as mmdet's / mmseg's ``tools/train.py`` and ``tools/test.py``
are, with the checks those scripts leave to a traceback done up front, each failing with one line
(:class:`MMError`): a config that does not exist or does not parse, data that mmdet / mmseg would fail on
(:mod:`trainers.mm.data`: missing files, bad annotations or label maps, empty sets, COCO categories that do
not cover the model's classes), a backbone file that is not an export of an ImageNet ResNet-50, a backbone
type that cannot hold it (``ResNetV1c``), a test or resume checkpoint that is a backbone export rather than
a trained model or whose tensors do not fit the config's model, ``--rm-alpha`` with a config whose data
preprocessor already runs dense RecursiveMix. Metrics print as valid JSON, rounded (:func:`metric_value`).

The launcher is ``pytorch`` under ``torchrun`` (``LOCAL_RANK`` set) and ``none`` otherwise. Without CUDA
the process group uses gloo and SyncBN becomes BN (mmengine only reverts it outside DDP). All checkpoint
loading runs inside :func:`trainers.mm.loading.mmengine_checkpoints` (``weights_only=True`` with an
allowlist) so ``--resume`` and ``test`` work on torch >= 2.6 without changing ``torch.load`` for the process.
"""

from __future__ import annotations

import json
import math
import os
import os.path as osp
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import data

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEEP_STEM = ("ResNetV1c", "ResNetV1d")
PREPROCESSOR_MIXES = ("DetRecursiveMixAug", "RecursiveMixSegDataPreProcessor")  # trainers/mm/dense_mix.py
METRIC_DECIMALS = 4  # mmdet's mAP has 3 significant decimals (0..1), mmseg's mIoU 2 (0..100)
PKG_RESOURCES_WARNING = "pkg_resources is deprecated"  # setuptools 80, on every (re)import; mmengine needs it


class MMError(ValueError):
    """A bad config, data root or checkpoint; its message is the one line the user sees."""


@dataclass
class MMArgs:
    """One ``rmix mm`` invocation (the parsed command line)."""

    config: str
    checkpoint: Optional[str] = None          # test: the trained detector / segmentor
    backbone: Optional[str] = None            # train: our export, replaces model.backbone.init_cfg.checkpoint
    work_dir: Optional[str] = None
    resume: Optional[str] = None              # "latest" (in work_dir, required), "auto" (latest if any) or a path
    data_root: Optional[str] = None
    cfg_options: dict = field(default_factory=dict)
    loader: str = "stock"                     # "dali": our DALI loaders (trainers/mm/dali_loop.py)
    rm_alpha: Optional[float] = None          # with loader="dali": dense RecursiveMix in the train loader


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def require_stack() -> None:
    """Import the OpenMMLab stack, or one line that says how to install it."""
    with warnings.catch_warnings():  # setuptools 80 warns on import that pkg_resources is deprecated
        warnings.filterwarnings("ignore", message=PKG_RESOURCES_WARNING)
        try:
            import pkg_resources  # noqa: F401  (mmengine resolves mmdet:: / mmseg:: bases with it)
        except ImportError:
            raise MMError("mmengine needs pkg_resources to resolve mmdet::/mmseg:: config bases: "
                          "pip install 'setuptools<81' (or run `make setup-mm`)") from None
        try:
            import mmcv  # noqa: F401
            import mmengine  # noqa: F401
            from mmcv.ops import nms  # noqa: F401  (the compiled ops: ATSS's NMS)
        except ImportError as e:
            raise MMError(f"the OpenMMLab stack is not installed ({first_line(e)}): run `make setup-mm` "
                          "(the first time builds mmcv from source, about 20 min on 2 cores)") from None


def resolve_config(name: str) -> Path:
    """A path, or the name of one of our configs (``atss_r50_fpn_1x_coco``, with or without ``.py``)."""
    path = Path(name)
    if path.is_file():
        return path
    ours = CONFIG_DIR / (name if name.endswith(".py") else name + ".py")
    if ours.is_file() and path.parent == Path("."):
        return ours
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.py")))
    raise MMError(f"no config {name} (a path, or one of ours: {known})")


def load_config(args: MMArgs):
    from mmengine.config import Config

    path = resolve_config(args.config)
    try:
        with warnings.catch_warnings():  # mmengine reloads pkg_resources for every mmdet::/mmseg:: base
            warnings.filterwarnings("ignore", message=PKG_RESOURCES_WARNING)
            cfg = Config.fromfile(str(path))
    except Exception as e:  # mmengine raises whatever the config's code or a missing base raises
        raise MMError(f"cannot read config {path}: {first_line(e)}") from None
    if args.cfg_options:
        try:
            cfg.merge_from_dict(args.cfg_options)
        except Exception as e:
            raise MMError(f"--cfg-options do not apply to {path}: {first_line(e)}") from None
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or osp.join("work_dirs", path.stem)
    if args.data_root:
        data.set_data_root(cfg, args.data_root)
    return cfg


# -- data ------------------------------------------------------------------------------------------

def check_data(cfg, loaders) -> None:
    """The data of ``loaders`` is there and mmdet / mmseg can use it (:mod:`trainers.mm.data`), or one line.
    Runs before either loader is built, so it holds for the stock DataLoader and ``--loader dali`` alike."""
    try:
        data.check_data(cfg, loaders)
    except data.DataError as e:
        raise MMError(str(e)) from None


# -- backbone --------------------------------------------------------------------------------------

def set_backbone(cfg, path: str) -> None:
    """Load ``model.backbone`` from our export ``path`` (mmpretrain layout, ``prefix='backbone.'``), or
    from a model-zoo URL such as ``torchvision://resnet50`` (no prefix: those hold the bare backbone)."""
    init = dict(type="Pretrained", checkpoint=str(path))
    if "://" not in str(path):
        init["prefix"] = "backbone."
    cfg.model.backbone.init_cfg = init
    if cfg.model.get("pretrained"):
        cfg.model.pretrained = None  # mmseg refuses a model-level `pretrained` beside the backbone's init_cfg


def check_backbone(cfg) -> None:
    """The backbone can hold a torchvision-layout ResNet-50, and its checkpoint is one of our exports."""
    from .export import ExportError, load_export

    bb = cfg.model.get("backbone") or {}
    kind = bb.get("type")
    if kind in DEEP_STEM:
        raise MMError(f"model.backbone.type={kind} has a 3-conv deep stem that a torchvision-layout ResNet-50 "
                      "cannot fill (the stem would train from random weights): use type='ResNet'")
    if kind != "ResNet" or bb.get("depth") != 50:
        raise MMError(f"model.backbone is {kind} depth {bb.get('depth')}; our export is a ResNet-50: "
                      "use type='ResNet', depth=50")
    init = bb.get("init_cfg") or {}
    ckpt = init.get("checkpoint") if isinstance(init, dict) and init.get("type") == "Pretrained" else None
    if not ckpt:
        raise MMError("model.backbone has no Pretrained init_cfg: pass --backbone EXPORT.pth "
                      "(made by `rmix export-backbone`)")
    if "://" in ckpt:
        return  # torchvision:// or a URL: mmengine fetches it; nothing local to check
    try:
        load_export(ckpt)
    except ExportError as e:
        raise MMError(f"--backbone: {e}") from None
    if init.get("prefix") != "backbone.":
        raise MMError(f"model.backbone.init_cfg.prefix is {init.get('prefix')!r}; our export needs 'backbone.'")


def check_model_checkpoint(path: str) -> dict:
    """A trained detector / segmentor checkpoint (mmengine's), not our backbone export; returns the shape of
    each of its tensors by name (``module.`` dropped, as mmengine's ``load_checkpoint`` drops it)."""
    from .loading import load_from_local_weights_only

    if not osp.isfile(path):
        raise MMError(f"no checkpoint at {path}")
    try:
        ckpt = load_from_local_weights_only(path, map_location="cpu")
    except Exception as e:
        raise MMError(f"{path} is not a readable mmengine checkpoint: {first_line(e)}") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise MMError(f"{path} is not an mmengine checkpoint (no state_dict)")
    if "model" in ckpt and "state_dict" not in ckpt:
        raise MMError(f"{path} is a classification checkpoint of `rmix train`, not a trained detector/segmentor")
    heads = {k.split(".")[0] for k in state}
    if heads <= {"backbone", "head"}:
        raise MMError(f"{path} is a backbone export (only backbone/head weights): pass it to "
                      "`rmix mm train --backbone`; `rmix mm test` needs the work_dir's trained checkpoint")
    return {k[len("module."):] if k.startswith("module.") else k: tuple(getattr(v, "shape", ()))
            for k, v in state.items()}


def model_shapes(cfg, config: str) -> dict:
    """Name -> shape of every tensor in the state dict of the model ``cfg`` builds, built on the meta device
    (no memory, no initialisation) in the config's registry scope, as the Runner will build it."""
    import copy

    import torch
    from mmengine.registry import MODELS, DefaultScope
    from mmengine.utils import import_modules_from_strings

    if cfg.get("custom_imports"):
        import_modules_from_strings(**cfg.custom_imports)
    try:
        with warnings.catch_warnings(), DefaultScope.overwrite_default_scope(cfg.get("default_scope")), \
                torch.device("meta"):
            warnings.simplefilter("ignore")  # mmdet/mmseg deprecation notes: the Runner's build says them again
            model = MODELS.build(copy.deepcopy(cfg.model))
    except (KeyError, TypeError, AssertionError, ImportError) as e:
        raise MMError(f"cannot build the model of {config}: {first_line(e)}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_checkpoint_fits(ours: dict, theirs: dict, path: str, config: str) -> None:
    """The checkpoint holds every tensor of the model (``ours``, :func:`model_shapes`) with its shape, and
    nothing else (``theirs``, :func:`check_model_checkpoint`).

    mmengine loads ``load_from`` / ``--resume`` with ``strict=False`` and only logs what is missing: a
    checkpoint of another config would leave the rest of the model (an ATSS neck and head under a UPerNet
    checkpoint) at its random initialisation and evaluate to a plausible-looking 0.0.
    """
    missing = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(ours)} tensors are not in it (first: {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} of its {len(theirs)} tensors are not in the model (first: {extra[0]})")
        raise MMError(f"{path} does not fit {config}: {'; '.join(parts)}; is it a checkpoint of another config?")
    wrong = [k for k in ours if ours[k] != theirs[k]]
    if wrong:
        k = wrong[0]
        raise MMError(f"{path} does not fit {config}: {len(wrong)} tensors differ in shape (first: {k} is "
                      f"{theirs[k]} in it, {ours[k]} in the model); is it a checkpoint of another config?")


# -- dense RecursiveMix -----------------------------------------------------------------------------

def preprocessor_mix(cfg) -> Optional[str]:
    """The type of the dense RecursiveMix the model's data preprocessor runs (the ``*_densrm`` configs:
    :mod:`trainers.mm.dense_mix`), or None."""
    def walk(node):
        if isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and kind.split(".")[-1] in PREPROCESSOR_MIXES:
                return kind
            node = list(node.values())
        if isinstance(node, (list, tuple)):
            return next((found for v in node if (found := walk(v))), None)
        return None

    return walk((cfg.get("model") or {}).get("data_preprocessor"))


# -- device / launcher -----------------------------------------------------------------------------

def launcher_for_env() -> str:
    return "pytorch" if "LOCAL_RANK" in os.environ else "none"


def adapt_to_device(cfg, cuda: bool) -> None:
    """Without CUDA: BN instead of SyncBN (which has no CPU kernel) and, under torchrun, DDP over gloo.

    mmengine 0.10.7 cannot start a CPU process group itself: its ``init_dist('pytorch')`` calls
    ``torch.cuda.set_device`` unconditionally, and its DDP wrapper passes ``device_ids=[LOCAL_RANK]``. So we
    initialise gloo first (mmengine then skips ``init_dist``) and give the wrapper ``device_ids=None``.
    """
    if cuda:
        return
    cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
    if cfg.get("launcher") == "pytorch":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo")
        if not cfg.get("model_wrapper_cfg"):
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                         find_unused_parameters=cfg.get("find_unused_parameters", False))

    def swap(node):
        if isinstance(node, dict):
            if node.get("type") == "SyncBN":
                node["type"] = "BN"
            for v in node.values():
                swap(v)
        elif isinstance(node, list):
            for v in node:
                swap(v)

    swap(cfg.model)


def metric_value(value):
    """One metric as JSON takes it: a float rounded to ``METRIC_DECIMALS`` places (mmdet's and mmseg's metrics
    are numpy float32, whose nearest double prints as 0.05999999865889549), None for NaN or infinity (JSON has
    no NaN; mmseg's metrics are NaN when no pixel of the set is labelled), a string for anything else (mmdet's
    ``bbox_mAP_copypaste``)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return round(number, METRIC_DECIMALS) if math.isfinite(number) else None


def metrics_json(metrics: dict) -> str:
    """The one-line JSON that ``rmix mm train|test`` print: valid JSON always (``allow_nan=False``)."""
    return json.dumps({k: metric_value(v) for k, v in metrics.items()}, allow_nan=False)


def val_metrics(runner) -> dict:
    """The last validation metrics the run logged (``coco/bbox_mAP``, ``mIoU``, ...)."""
    out = {}
    for key, buf in runner.message_hub.log_scalars.items():
        if key.startswith("val/") and key not in ("val/time", "val/data_time"):
            out[key[len("val/"):]] = metric_value(buf.current())
    return out


def _build_runner(cfg, path: str):
    from mmengine.runner import Runner

    try:
        if "runner_type" in cfg:
            from mmengine.registry import RUNNERS
            return RUNNERS.build(cfg)
        return Runner.from_cfg(cfg)
    except (KeyError, TypeError, AssertionError, FileNotFoundError, ImportError) as e:
        raise MMError(f"cannot build the run from {path}: {first_line(e)}") from None


def train(args: MMArgs) -> dict:
    """Train ``args.config``; return the last validation metrics (also written to work_dir/metrics.json)."""
    import torch

    from .hooks import BackboneMismatch
    from .loading import mmengine_checkpoints

    require_stack()
    if args.rm_alpha is not None and (args.loader != "dali" or not 0 < args.rm_alpha <= 1):
        raise MMError("--rm-alpha takes a value in (0, 1] and needs --loader dali "
                      "(with the stock loader use a *_densrm config)")
    cfg = load_config(args)
    mixed = preprocessor_mix(cfg)
    if args.rm_alpha is not None and mixed:
        raise MMError(f"--rm-alpha mixes in the DALI loader and {args.config} already mixes in the model's data "
                      f"preprocessor ({mixed}): RecursiveMix would run twice; drop --rm-alpha, or use the config "
                      "without _densrm")
    if args.backbone:
        set_backbone(cfg, args.backbone)
    shapes = None
    if args.resume:
        cfg.resume = True
        cfg.load_from = None if args.resume in ("auto", "latest") else args.resume
        if cfg.load_from and not osp.isfile(cfg.load_from):
            raise MMError(f"--resume: no checkpoint at {cfg.load_from}")
        if args.resume in ("auto", "latest"):  # mmengine's auto mode: the work dir's latest checkpoint, if any
            from mmengine.runner import find_latest_checkpoint

            found = find_latest_checkpoint(cfg.work_dir)
            if found is None and args.resume == "latest":  # mmengine would log "resumed from None" and start over
                raise MMError(f"--resume: no checkpoint in the work dir {cfg.work_dir} (check --work-dir; "
                              "--resume auto resumes only when there is one)")
            if found is not None:
                shapes = check_model_checkpoint(found)
        else:
            shapes = check_model_checkpoint(cfg.load_from)
    check_backbone(cfg)  # also on resume: mmengine initialises the weights before it loads the checkpoint
    check_data(cfg, ("train_dataloader", "val_dataloader") if cfg.get("val_cfg") else ("train_dataloader",))
    if (cfg.get("randomness") or {}).get("seed") is None:
        # mmengine draws a new seed per launch when the config sets none, and builds the data loaders
        # with it before --resume loads the checkpoint: the resumed run would read other batches
        cfg.randomness = dict(cfg.get("randomness") or {}, seed=0)
        print("rmix mm train: randomness.seed not set in the config: using 0, so that --resume reads the "
              "same batches (set randomness.seed to change it)", flush=True)
    cfg.launcher = launcher_for_env()
    adapt_to_device(cfg, torch.cuda.is_available())
    if shapes is not None:
        check_checkpoint_fits(model_shapes(cfg, args.config), shapes, cfg.load_from, args.config)
    with mmengine_checkpoints():
        runner = _build_runner(cfg, args.config)
        attach_loaders(runner, args, ("train_dataloader", "val_dataloader"))
        try:
            runner.train()
        except BackboneMismatch as e:
            raise MMError(str(e)) from None
    metrics = val_metrics(runner)
    if runner.rank == 0:
        Path(runner.work_dir, "metrics.json").write_text(json.dumps(metrics, indent=1, allow_nan=False))
        print(f"rmix mm train: final val {metrics_json(metrics)}", flush=True)
    return metrics


def attach_loaders(runner, args: MMArgs, which: tuple) -> None:
    """With ``--loader dali``, our DALI detection / segmentation loaders replace mmengine's DataLoaders."""
    if args.loader != "dali":
        return
    from .dali_loop import DaliLoaderError, attach_dali_loaders

    try:
        if "train_dataloader" in which:
            attach_dali_loaders(runner, rm_alpha=args.rm_alpha)
        else:
            attach_dali_loaders(runner, which=which)
    except (DaliLoaderError, FileNotFoundError) as e:
        raise MMError(first_line(e)) from None


def test(args: MMArgs) -> dict:
    """Evaluate ``args.checkpoint`` with ``args.config``'s test split; return the metrics."""
    import torch

    from .loading import mmengine_checkpoints

    require_stack()
    if not args.checkpoint:
        raise MMError("rmix mm test needs CONFIG and CHECKPOINT (a work_dir's epoch_N.pth / iter_N.pth)")
    cfg = load_config(args)
    shapes = check_model_checkpoint(args.checkpoint)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    check_data(cfg, ("test_dataloader",))
    cfg.launcher = launcher_for_env()
    adapt_to_device(cfg, torch.cuda.is_available())
    check_checkpoint_fits(model_shapes(cfg, args.config), shapes, args.checkpoint, args.config)
    with mmengine_checkpoints():
        runner = _build_runner(cfg, args.config)
        attach_loaders(runner, args, ("test_dataloader",))
        metrics = {k: metric_value(v) for k, v in runner.test().items()}
    if runner.rank == 0:
        print(f"rmix mm test: {metrics_json(metrics)}", flush=True)
    return metrics
