"""An mmengine hook that fails the run when the pretrained backbone did not arrive.

mmengine's ``Pretrained`` init loads with ``strict=False`` and only *warns* about missing and unexpected
keys, so a backbone whose layout differs from the checkpoint (mmseg's default ``ResNetV1c`` deep stem, a
typo in ``prefix``) trains on from random weights and nobody notices until the mAP is low. Our configs add
``dict(type="PretrainedBackboneCheck")`` to ``custom_hooks`` (pulled in by ``custom_imports``): before the
first training iteration it compares every parameter and buffer of ``model.backbone`` with the checkpoint
named by ``model.backbone.init_cfg`` and raises :class:`BackboneMismatch` if any is missing or differs.
"""

from __future__ import annotations

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


class BackboneMismatch(RuntimeError):
    """The backbone after ``init_weights()`` is not the pretrained checkpoint."""


def compare_backbone(backbone: torch.nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the backbone's parameters/buffers absent from ``weights`` or not bitwise equal to them."""
    bad = []
    for name, tensor in backbone.state_dict().items():
        ref = weights.get(name)
        if ref is None or ref.shape != tensor.shape or not torch.equal(ref.to(tensor.device, tensor.dtype), tensor):
            bad.append(name)
    return bad


def pretrained_weights(init_cfg) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(checkpoint, backbone tensors without the prefix) for a ``Pretrained`` init_cfg, else None."""
    cfgs = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    for cfg in cfgs:
        if cfg and cfg.get("type") == "Pretrained" and cfg.get("checkpoint"):
            from mmengine.runner.checkpoint import CheckpointLoader

            # local files go through our weights-only loader (the run is inside mmengine_checkpoints());
            # torchvision:// and URLs come from torch hub's cache, where init_weights() just put them
            ckpt = CheckpointLoader.load_checkpoint(cfg["checkpoint"], map_location="cpu", logger="silent")
            state = ckpt.get("state_dict", ckpt)
            prefix = cfg.get("prefix", "") or ""
            return cfg["checkpoint"], {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return None


@HOOKS.register_module()
class PretrainedBackboneCheck(Hook):
    """Raise before iteration 0 unless ``model.backbone`` equals its ``Pretrained`` checkpoint.

    Skipped on resume or ``load_from`` (the weights then come from the run's own checkpoint).
    """

    priority = "VERY_HIGH"

    def before_train(self, runner) -> None:
        if runner.iter != 0 or runner._load_from or runner._resume:
            return
        model = getattr(runner.model, "module", runner.model)
        backbone = getattr(model, "backbone", None)
        if backbone is None:
            return
        found = pretrained_weights(runner.cfg.model.backbone.get("init_cfg"))
        if found is None:
            runner.logger.warning("PretrainedBackboneCheck: the backbone has no Pretrained init_cfg; nothing to check")
            return
        path, weights = found
        bad = compare_backbone(backbone, weights)
        total = len(backbone.state_dict())
        if bad:
            raise BackboneMismatch(
                f"{len(bad)} of the backbone's {total} tensors did not come from {path} (first: {bad[0]}); "
                f"{type(backbone).__name__} does not match the checkpoint's layout")
        runner.logger.info(f"PretrainedBackboneCheck: all {total} backbone tensors equal {path}")
