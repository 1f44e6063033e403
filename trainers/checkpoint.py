"""Checkpoints of every trainer: save atomically, load with one clear error, resume a run exactly.

A checkpoint is one ``torch.save`` dict (``CHECKPOINT_KEYS``): the *unwrapped* model's state dict,
optimizer, AMP scaler, epoch, global step, whether it was taken mid-epoch, the best metrics, every
rank's loader state (reader position, mix history), the RNG states and the resolved config; taken
mid-epoch, also every rank's running sums of the epoch's metrics (``meters``, absent or None otherwise), so
the resumed epoch's metrics equal the uninterrupted run's. The file is written under a temporary name and
renamed, so a kill during the write never leaves a torn file.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "mid_epoch", "best", "loader", "rng", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; its message is the one line the user sees."""


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) generator states of this process."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_path(out_dir: Path, resume: str) -> Path:
    """``best`` / ``latest`` name files in the run's folder; anything else is a path."""
    return Path(out_dir) / f"{resume}.pth" if resume in ("best", "latest") else Path(resume)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu", required=CHECKPOINT_KEYS) -> dict[str, Any]:
    """Load one of our checkpoints, or raise :class:`CheckpointError` saying what is wrong with it.

    Our checkpoints hold numpy RNG states and the config, so they are loaded with
    ``weights_only=False``: load only checkpoints you wrote (as with any pickle).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {first}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a training checkpoint")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of `rmix train` (missing {', '.join(missing)})")
    return ckpt


def load_model_state(model: torch.nn.Module, ckpt: dict, path: Path, config: Optional[dict] = None) -> None:
    """Load the weights strictly, with one line when the checkpoint is of another model."""
    saved = ckpt.get("config") or {}
    if config is not None:
        keys = [k for k in ("data", "model_file", "model_name") if k in saved]
        if any(saved[k] != config.get(k) for k in keys):
            was = " ".join(f"--{k} {saved[k]}" for k in keys)
            now = " ".join(f"--{k} {config.get(k)}" for k in keys)
            raise CheckpointError(f"{path} was trained with {was}; this run has {now}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not fit this model ({first})") from None


#: the flags a checkpoint's loader state belongs to (the backend's reader state, the mix's history)
LOADER_FLAGS = ("loader", "aug")
#: backends whose batches depend on the number of workers: the torch backend gives each worker its own
#: shards (pipelines.torch_wds, "shard split"), so a mid-epoch position means other samples under another count
WORKER_ORDERED_LOADERS = ("torch",)


def check_resume_flags(ckpt: dict, path: Path, config: dict) -> None:
    """Refuse, in one line naming the flags, a resume whose loader state cannot continue the saved run.

    Always: ``--loader`` and ``--aug`` (the loader state is that backend's and that mix's). Mid-epoch also
    ``--batch_size`` (the position counts batches: another size would repeat or skip samples within the
    epoch) and, for the torch backend, ``--num_workers``. Other flags may change on resume (the learning
    rate schedule, the number of epochs, ...)."""
    saved = ckpt.get("config") or {}
    keys = list(LOADER_FLAGS)
    if ckpt.get("mid_epoch"):
        keys.append("batch_size")
        if saved.get("loader") in WORKER_ORDERED_LOADERS:
            keys.append("num_workers")
    differ = [k for k in keys if k in saved and saved[k] != config.get(k)]
    if differ:
        was = " ".join(f"--{k} {saved[k]}" for k in differ)
        now = " ".join(f"--{k} {config.get(k)}" for k in differ)
        when = f"mid-epoch {ckpt.get('epoch')}" if ckpt.get("mid_epoch") else f"at the end of epoch {ckpt.get('epoch')}"
        raise CheckpointError(f"{path} was saved {when} with {was}; this run has {now}: resume with {was} "
                              "(its loader state continues only that run), or start another --name")
