"""One seed-derivation rule for every random stream of a run.

Every backend, mix and worker draws from ``numpy.random.SeedSequence([seed, rank, epoch, stream])``:
independent streams per rank, per epoch and per purpose, from the one ``--random_seed`` the user sets,
with no ad-hoc ``seed * 1000 + rank`` formulas that collide (seed 1 rank 0 == seed 0 rank 1000).
Streams whose consumer reshuffles on its own every epoch (DALI's reader) use epoch 0.
"""

from __future__ import annotations

import numpy as np

STREAMS = {
    "reader": 0,     # shard/sample order (DALI reader seed, torch shard order, memory permutation)
    "augment": 1,    # per-sample augmentation draws (crops, flips, colour)
    "shuffle": 2,    # in-memory shuffle buffers (webdataset)
    "lighting": 3,   # PCA lighting after the iterator
    "mix": 4,        # the batch mix's generator
    "workers": 5,    # DataLoader worker seeds
}


def derive_seed(seed: int, rank: int = 0, epoch: int = 0, stream: str = "augment", index: int = 0) -> int:
    """A 31-bit seed for ``stream`` of ``rank`` in ``epoch`` (``index``: e.g. the batch number)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; choose from {', '.join(STREAMS)}")
    if min(seed, rank, epoch, index) < 0:
        raise ValueError(f"seed, rank, epoch and index must be >= 0, got {seed}, {rank}, {epoch}, {index}")
    words = [seed, rank, epoch, STREAMS[stream]] + ([index] if index else [])
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


def derive_rng(seed: int, rank: int = 0, epoch: int = 0, stream: str = "augment", index: int = 0) -> np.random.Generator:
    """A numpy Generator on the same rule."""
    return np.random.default_rng(derive_seed(seed, rank, epoch, stream, index))
