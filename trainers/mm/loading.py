"""mmengine 0.10.7 on torch >= 2.6: load local checkpoints with ``weights_only=True`` and an allowlist.

mmengine calls ``torch.load(filename, map_location=...)`` without ``weights_only``; torch >= 2.6 defaults
it to True, and mmengine's own checkpoints (``epoch_N.pth`` / ``iter_N.pth``) hold a ``MessageHub``
with ``HistoryBuffer`` objects and numpy arrays, so ``--resume`` and ``rmix mm test`` fail to load them.
Setting ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` or patching ``torch.load`` would change torch for the whole
process. Instead, :func:`mmengine_checkpoints` swaps mmengine's loader for local paths (its
``CheckpointLoader`` scheme ``''``) for the duration of a ``with`` block, and that loader calls
``torch.load(weights_only=True)`` inside ``torch.serialization.safe_globals`` naming exactly the types
an mmengine checkpoint contains. Outside the block torch and mmengine behave as shipped.
"""

from __future__ import annotations

import os.path as osp
from contextlib import contextmanager

import torch


def mmengine_safe_globals() -> list:
    """What mmengine's checkpoints pickle besides tensors: its ``HistoryBuffer`` and numpy arrays/scalars.

    numpy 2 pickles a dtype as ``getattr(numpy.dtypes, "Float64DType")``: ``getattr`` only fetches an
    attribute; the weights-only unpickler still refuses to call anything that is not allowlisted.
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    codes = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"
    dtypes = {type(np.dtype(c)) for c in codes}
    return [HistoryBuffer, np.ndarray, np.dtype, _reconstruct, scalar, getattr, *sorted(dtypes, key=str)]


def load_from_local_weights_only(filename, map_location=None):
    """Drop-in for mmengine's ``load_from_local``: same errors, ``weights_only=True`` plus the allowlist."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


@contextmanager
def mmengine_checkpoints():
    """Within the block, mmengine loads local checkpoints with :func:`load_from_local_weights_only`."""
    from mmengine.runner.checkpoint import CheckpointLoader

    original = CheckpointLoader._schemes.get("")
    CheckpointLoader.register_scheme(prefixes="", loader=load_from_local_weights_only, force=True)
    try:
        yield
    finally:
        if original is not None:
            CheckpointLoader.register_scheme(prefixes="", loader=original, force=True)
