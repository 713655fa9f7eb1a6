"""Which samples a rank reads, in which order: one definition shared by every backend.

Train: a permutation of the whole set drawn from (seed, epoch), cut to a multiple of
world_size x batch_size (every rank gets the same number of full batches; Mixup needs them
full), then split into world_size contiguous blocks; rank r reads block r. Val: the sorted set
split into contiguous blocks with floor boundaries, so every image is read exactly once.
Contiguous blocks are also how DALI's reader shards (shard_id = global rank).
"""
from __future__ import annotations

import numpy as np

from .errors import DataError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_shard(n: int, rank: int, world_size: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's sample indices for `epoch`, in reading order."""
    per_rank = (n // (world_size * batch_size)) * batch_size
    if per_rank == 0:
        raise DataError(f"{n} training samples cannot fill one batch of {batch_size} on each of "
                         f"{world_size} ranks")
    return epoch_permutation(n, seed, epoch)[rank * per_rank:(rank + 1) * per_rank]


def val_shard(n: int, rank: int, world_size: int) -> np.ndarray:
    return np.arange(n * rank // world_size, n * (rank + 1) // world_size)


def batch_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """A seed for one batch's on-device augmentation: a resumed run re-draws exactly what an
    uninterrupted run would have drawn at the same (epoch, step)."""
    return int(np.random.SeedSequence([seed, rank, epoch, step]).generate_state(1, np.uint64)[0] >> 1)
