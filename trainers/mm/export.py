"""Trainer checkpoint -> the ResNet-50 file that mmdet / mmseg load as a pretrained backbone.

The output follows the layout mmpretrain publishes for its ImageNet classifiers::

    {"state_dict": {"backbone.<torchvision name>": tensor, ...,   # conv1, bn1, layer1..4
                    "head.fc.weight" / "head.fc.bias",            # the classifier
                    "head.fc_roi.weight" / "head.fc_roi.bias"},   # RecursiveMix's ROI head
     "meta": {"arch": "resnet50", "epoch": ..., "top-1": ..., "config": {...}, ...}}   # plain types only

so it loads with ``torch.load(weights_only=True)`` and mmengine's ``Pretrained`` init with
``prefix="backbone."`` hands mmdet's / mmseg's ``ResNet`` (depth 50, style "pytorch") exactly our
weights: their parameter names are torchvision's. mmengine only *warns* about missing or unexpected keys,
so this module refuses, with one line, anything that would not fill that backbone: a CIFAR stem, another
architecture, a missing or unreadable file.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainers.checkpoint import CheckpointError, load_checkpoint

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
HEADS = ("fc.", "fc_roi.")
FORMAT = "rmix-backbone/1"
PICKLE_PROTO = b"\x80"  # the first byte of a pickle (protocol >= 2): torch.save's legacy format


class ExportError(ValueError):
    """A checkpoint that cannot become a ResNet-50 backbone; its message is the one line the user sees."""


def strip_wrappers(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` (in any order and number) from the front of every key."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def reference_backbone() -> dict[str, torch.Size]:
    """Names and shapes of the ImageNet ResNet-50 trunk (no heads), from our own model on the meta device."""
    from trainers.models.resnet import resnet50

    with torch.device("meta"):
        model = resnet50(num_classes=1000)
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith(HEADS)}


def check_resnet50(state_dict: dict[str, Any], source: str) -> None:
    """Raise :class:`ExportError` unless ``state_dict`` (wrappers stripped) is an ImageNet ResNet-50."""
    ref = reference_backbone()
    conv1 = state_dict.get("conv1.weight")
    if conv1 is not None and tuple(conv1.shape[-2:]) != (7, 7):
        k = "x".join(map(str, conv1.shape[-2:]))
        raise ExportError(f"{source} has a {k} stem (conv1), not ImageNet's 7x7: a CIFAR-size model cannot "
                          "be a detection/segmentation backbone; pre-train with --data imagenet")
    missing = [k for k in ref if k not in state_dict]
    if missing:
        first = next((k for k in state_dict if not k.startswith(HEADS)), None)
        raise ExportError(f"{source} is not a torchvision-layout ResNet-50: {len(missing)} of its {len(ref)} "
                          f"backbone tensors are missing (first: {missing[0]}; the file has e.g. {first})")
    extra = [k for k in state_dict if k not in ref and not k.startswith(HEADS)]
    if extra:
        raise ExportError(f"{source} is not a plain ResNet-50: unexpected tensor {extra[0]} "
                          f"(and {len(extra) - 1} more)")
    for key, shape in ref.items():
        if tuple(state_dict[key].shape) != tuple(shape):
            raise ExportError(f"{source} is not a ResNet-50: {key} is {tuple(state_dict[key].shape)}, "
                              f"expected {tuple(shape)}")


def _plain(value):
    """The config as JSON-like plain types, so the export stays loadable with ``weights_only=True``."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def evaluated_best(ckpt: dict) -> dict:
    """The checkpoint's best validation metrics, or ``{}`` when it was saved before any evaluation.

    ``trainers.classify`` starts ``best`` at ``{"acc1": 0.0, "acc5": 0.0, "epoch": 0}`` and replaces it after
    each evaluation with that epoch's numbers; epochs count from 1, so ``epoch`` 0 (or none) means the run
    never evaluated, and its 0.0 is no accuracy (an export of it reports ``top-1`` None, printed "n/a").
    """
    best = ckpt.get("best") or {}
    epoch = best.get("epoch")
    return best if isinstance(epoch, int) and epoch >= 1 else {}


def export_backbone(ckpt_path: str | Path, out_path: str | Path) -> dict:
    """Write ``out_path`` from the trainer checkpoint ``ckpt_path``; return the exported ``meta``.

    Raises :class:`ExportError` (one line) when the file is missing, unreadable, not a checkpoint of
    ``rmix train``, or not an ImageNet ResNet-50.
    """
    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    try:
        ckpt = load_checkpoint(ckpt_path, map_location="cpu", required=("model",))
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    config = ckpt.get("config") or {}
    if config.get("data", "imagenet") != "imagenet":
        raise ExportError(f"{ckpt_path} was trained on {config['data']}; the mmdet/mmseg backbone is the "
                          "ImageNet ResNet-50 (--data imagenet)")
    arch = (config.get("model_file"), config.get("model_name"))
    if config and arch != ("resnet", "resnet50"):
        raise ExportError(f"{ckpt_path} holds --model_file {arch[0]} --model_name {arch[1]}; only the ImageNet "
                          "ResNet-50 (--model_file resnet --model_name resnet50) is a detection/segmentation backbone")
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise ExportError(f"{ckpt_path}: its 'model' entry is not a state dict of tensors")
    model = strip_wrappers(model)
    check_resnet50(model, str(ckpt_path))

    state_dict = {}
    for key, value in model.items():
        name = f"head.{key}" if key.startswith(HEADS) else f"backbone.{key}"
        state_dict[name] = value.detach().cpu().clone()
    best = evaluated_best(ckpt)
    meta = {
        "format": FORMAT,
        "arch": "resnet50",
        "num_classes": int(model["fc.weight"].shape[0]) if "fc.weight" in model else None,
        "epoch": _plain(ckpt.get("epoch")),
        "step": _plain(ckpt.get("step")),
        "top-1": _plain(best.get("acc1")),
        "top-5": _plain(best.get("acc5")),
        "best_epoch": _plain(best.get("epoch")),
        "aug": config.get("aug"),
        "source": str(ckpt_path),
        "config": _plain(config),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save({"state_dict": state_dict, "meta": meta}, tmp)
    tmp.replace(out_path)
    return meta


def load_export(path: str | Path) -> dict:
    """Read an export back (``weights_only=True``), or raise :class:`ExportError` saying what it is instead."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no backbone checkpoint at {path} (make one with: rmix export-backbone CKPT {path})")
    with open(path, "rb") as f:
        first = f.read(1)
    if first != PICKLE_PROTO and not zipfile.is_zipfile(path):
        raise ExportError(f"{path} is not a readable checkpoint: neither torch.save's zip format nor a pickle "
                          "(a text file?)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler fails on damaged data in many ways (KeyError, ...)
        head = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ExportError(f"{path} is not an exported backbone (it needs full unpickling; a trainer checkpoint? "
                              f"export it first: rmix export-backbone {path} OUT.pth)") from None
        raise ExportError(f"{path} is not a readable checkpoint: {head}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        hint = " (a trainer checkpoint? export it first: rmix export-backbone CKPT OUT.pth)" \
            if isinstance(obj, dict) and "model" in obj else ""
        raise ExportError(f"{path} is not an exported backbone: no 'state_dict'{hint}")
    trunk = {k[len("backbone."):]: v for k, v in obj["state_dict"].items() if k.startswith("backbone.")}
    if not trunk:
        raise ExportError(f"{path} has no 'backbone.*' weights")
    check_resnet50(trunk, str(path))
    return obj
