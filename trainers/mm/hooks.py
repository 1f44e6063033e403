"""mmengine hooks of our configs: the pretrained-backbone check, the dense mix's state and our DALI
reader's state in checkpoints.

:class:`DenseMixState` (below) saves the dense RecursiveMix's generator and history in every checkpoint
and restores them on resume. :class:`DaliReaderState` does the same for the order of our DALI training
loader across an epoch-based resume.

:class:`PretrainedBackboneCheck` fails the run when the pretrained backbone did not arrive.

mmengine's ``Pretrained`` init loads with ``strict=False`` and only *warns* about missing and unexpected
keys, so a backbone whose layout differs from the checkpoint (mmseg's default ``ResNetV1c`` deep stem, a
typo in ``prefix``) trains on from random weights and nobody notices until the mAP is low. Our configs add
``dict(type="PretrainedBackboneCheck")`` to ``custom_hooks`` (pulled in by ``custom_imports``): before the
first training iteration it compares every parameter and buffer of ``model.backbone`` with the checkpoint
named by ``model.backbone.init_cfg`` and raises :class:`BackboneMismatch` if any is missing or differs.
"""

from __future__ import annotations

import weakref
from typing import Optional

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


def dense_mixes(runner) -> dict:
    """The dense RecursiveMix objects of a run, by where they live: ``"loader"`` (inside our DALI train
    loader), ``"preprocessor"`` (``RecursiveMixSegDataPreProcessor``) and ``"batch_augments.<i>"``
    (``DetRecursiveMixAug`` in mmdet's ``data_preprocessor.batch_augments``)."""
    found = {}
    loader = getattr(runner.train_loop, "dataloader", None)
    if getattr(loader, "mix", None) is not None and hasattr(loader, "restore_mix"):
        found["loader"] = loader.mix
    model = getattr(runner.model, "module", runner.model)
    pre = getattr(model, "data_preprocessor", None)
    if getattr(pre, "mix", None) is not None:
        found["preprocessor"] = pre.mix
    augments = getattr(pre, "batch_augments", None)
    if augments is not None:
        for i, aug in enumerate(augments if isinstance(augments, (list, tuple, torch.nn.ModuleList)) else [augments]):
            if getattr(aug, "mix", None) is not None:
                found[f"batch_augments.{i}"] = aug.mix
    return found


def hand_over_at_saves(runner, key: str, state) -> None:
    """Every rank's ``state(runner)`` goes into each checkpoint the run saves (read it with :func:`handed_over`).

    mmengine's ``Runner.save_checkpoint`` is entered on every rank (CheckpointHook decides alike everywhere) but
    writes, and calls ``before_save_checkpoint``, on rank 0 only: a hook there sees rank 0's state alone. So the
    runner's ``save_checkpoint`` is wrapped: every rank hands its states over first (``all_gather_object``, a
    collective all ranks enter there), then rank 0 writes. One wrapper serves every key; it holds the runner
    weakly, so it adds no reference cycle."""
    getters = runner.__dict__.setdefault("_rmix_state_getters", {})
    getters[key] = state
    if "save_checkpoint" in runner.__dict__:  # wrapped already, for another key
        return
    save, owner = type(runner).save_checkpoint, weakref.ref(runner)

    def save_checkpoint(*args, **kwargs):
        from mmengine.dist import all_gather_object

        run = owner()
        run._rmix_handed_over = all_gather_object({k: get(run) for k, get in run._rmix_state_getters.items()})
        try:
            return save(run, *args, **kwargs)
        finally:
            run._rmix_handed_over = None

    runner.save_checkpoint = save_checkpoint


def handed_over(runner, key: str) -> Optional[list]:
    """Inside ``before_save_checkpoint``: the states of :func:`hand_over_at_saves`, one per rank in rank order;
    None for a save that did not go through the wrapper."""
    per_rank = getattr(runner, "_rmix_handed_over", None)
    return None if per_rank is None else [states.get(key) for states in per_rank]


def own_rank_state(runner, hook: str, saved: dict):
    """This rank's state out of a checkpoint entry ``{'ranks': [...]}``, or None (with a warning) when the
    checkpoint was saved by another number of ranks."""
    from mmengine.dist import get_dist_info

    rank, world_size = get_dist_info()
    ranks = saved["ranks"]
    if len(ranks) != world_size:
        runner.logger.warning(f"{hook}: the checkpoint holds the state of {len(ranks)} rank(s), this run has "
                              f"{world_size}; it starts fresh")
        return None
    return ranks[rank]


@HOOKS.register_module()
class DenseMixState(Hook):
    """Keeps dense RecursiveMix exact across a resume: its generator and history go into every checkpoint
    (key ``rmix_dense_mix``, every rank's own, :func:`hand_over_at_saves`) and come back on ``--resume``.

    mmengine saves neither dataloaders nor ``batch_augments``; without this hook a resumed run restarts
    the mix from its seed with no history. The preprocessor's mixes are restored with the checkpoint;
    the loader's after mmengine's iteration-based advance (:meth:`trainers.mm.dali_loop.MMDaliLoader.
    restore_mix`). An epoch-based run's checkpoints sit on epoch boundaries, where the history is dropped
    (unless the mix keeps it across epochs) as the uninterrupted run drops it.
    """

    KEY = "rmix_dense_mix"
    priority = "NORMAL"

    def before_run(self, runner) -> None:
        hand_over_at_saves(runner, self.KEY, self._states)

    @staticmethod
    def _states(runner) -> dict:
        return {name: mix.state_dict() for name, mix in dense_mixes(runner).items()}

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        per_rank = handed_over(runner, self.KEY)
        if per_rank is None:  # saved outside the wrapper: this process's own state
            per_rank = [self._states(runner)]
        if any(per_rank):
            checkpoint[self.KEY] = {"ranks": per_rank}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        saved = checkpoint.get(self.KEY)
        if not saved or not runner._resume:  # load_from: weights only, the mix starts fresh
            return
        # {'ranks': [...]}; a checkpoint of an earlier version holds rank 0's mixes alone, as {name: state}
        saved = own_rank_state(runner, "DenseMixState", saved) if "ranks" in saved else saved
        if saved is None:
            return
        from mmengine.runner import IterBasedTrainLoop

        iter_based = isinstance(runner.train_loop, IterBasedTrainLoop)
        skip = int(checkpoint["meta"]["iter"]) if iter_based else 0
        mixes = dense_mixes(runner)
        missing = sorted(set(saved) - set(mixes))
        if missing:
            runner.logger.warning(f"DenseMixState: the checkpoint has mix state for {missing}, this run has no "
                                  f"such mix; it is not restored")
        for name, mix in mixes.items():
            if name not in saved:
                runner.logger.warning(f"DenseMixState: no saved state for the {name} mix; it starts fresh")
            elif name == "loader":
                runner.train_loop.dataloader.restore_mix(saved[name], skip=skip, reset=not iter_based)
            else:
                mix.load_state_dict(saved[name])
                if not iter_based and not mix.keep_history_across_epochs:
                    mix.reset()
        runner.logger.info(f"DenseMixState: restored {sorted(set(saved) & set(mixes))}")


@HOOKS.register_module()
class DaliReaderState(Hook):
    """Keeps the order of our DALI training loader exact across an epoch-based resume.

    DALI draws each epoch's order from its own count of epochs, and mmengine saves no dataloader: a resumed
    epoch-based run would build a fresh reader and read its next epoch in the first epoch's order (an
    iteration-based resume re-draws every batch from the start, so it needs nothing). Every checkpoint gets
    every rank's reader state (:meth:`pipelines.dali_det.DenseDaliLoader.reader_state`, key
    ``rmix_dali_reader``, :func:`hand_over_at_saves`); ``--resume`` from one saved at an epoch's end gives each
    rank its own back. Resumed from a checkpoint saved mid-epoch, the reader starts fresh (mmengine's epoch loop
    reads that epoch again from its start). Registered by :func:`trainers.mm.dali_loop.attach_dali_loaders`.
    """

    KEY = "rmix_dali_reader"
    priority = "NORMAL"

    @staticmethod
    def _loader(runner):
        from .dali_loop import MMDaliLoader

        loader = getattr(runner.train_loop, "dataloader", None)
        return loader if isinstance(loader, MMDaliLoader) else None

    def before_run(self, runner) -> None:
        hand_over_at_saves(runner, self.KEY, self._state)

    @classmethod
    def _state(cls, runner):
        loader = cls._loader(runner)
        return loader.loader.reader_state() if loader is not None else None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        per_rank = handed_over(runner, self.KEY)
        if per_rank is not None and any(state is not None for state in per_rank):
            checkpoint[self.KEY] = {"ranks": per_rank}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.runner import IterBasedTrainLoop

        saved = checkpoint.get(self.KEY)
        if not saved or not runner._resume or isinstance(runner.train_loop, IterBasedTrainLoop):
            return
        loader, state = self._loader(runner), own_rank_state(runner, "DaliReaderState", saved)
        if loader is None or state is None:
            return
        if state["position"] != 0:
            runner.logger.warning("DaliReaderState: the checkpoint was saved in the middle of an epoch; the reader "
                                  "starts fresh and the epoch is read again from its start, as mmengine's loader would")
            return
        loader.restore_reader(state)
        runner.logger.info(f"DaliReaderState: the reader continues at epoch {state['epoch']}")
