"""Which samples a rank reads, in which order: one definition shared by every backend.

Train: each epoch is a permutation of the whole set drawn from (seed, epoch). The run reads it
front to back in global micro-batches of world_size x batch_size samples; rank r takes the r-th
slice of each. A position in the epoch is therefore a global sample offset that means the same at
every world size: a run stopped after `start` samples and resumed at another world size (or
batch) reads exactly perm[start:end] between its ranks, so each image of the interrupted epoch is
used once. The epoch ends at `end`, a multiple of the optimizer step's global batch (the
trainer's `epoch_end`); the tail is not read. Val: the sorted set split into contiguous blocks with
floor boundaries, so every image is read exactly once.
"""
from __future__ import annotations

import numpy as np

from .errors import DataError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_end(n: int, step_samples: int) -> int:
    """Samples an uninterrupted epoch reads: whole optimizer steps of `step_samples` only."""
    end = n // step_samples * step_samples
    if end == 0:
        raise DataError(f"{n} training samples cannot fill one optimizer step of {step_samples} samples "
                        "(train.batch_size x grad_accum x world size)")
    return end


def resumed_epoch_end(n: int, start: int, planned_end: int, step_samples: int) -> int:
    """Where an epoch interrupted at `start` (of `planned_end`) ends when resumed with optimizer steps
    of `step_samples` (another world size or batch): every planned image still unread is read, the
    last step topped up from the images the epoch would have left out; only where the set has too
    few of those does the last partial step drop (the same rule as an uninterrupted epoch's tail)."""
    remaining = planned_end - start
    steps = -(-remaining // step_samples)
    if start + steps * step_samples > n:
        steps = remaining // step_samples
    return start + steps * step_samples


def epoch_sequence(n: int, seed: int, epoch: int, repeats: int = 1) -> np.ndarray:
    """The sample index at each position of the epoch. repeats > 1 (repeated augmentation, DeiT's RASampler /
    timm's --aug-repeats): each image of the permutation R times in a row, cut to n positions, so the epoch keeps
    its length and reads about n / R images R times each."""
    perm = epoch_permutation(n, seed, epoch)
    return np.repeat(perm, repeats)[:n] if repeats > 1 else perm


def train_positions(n: int, rank: int, world_size: int, batch_size: int, start: int = 0, end: int | None = None,
                    repeats: int = 1) -> np.ndarray:
    """This rank's positions in the epoch's sequence for global samples [start, end), in reading order. Each
    micro-batch of world_size x batch_size positions is split between the ranks: in blocks (rank r the r-th),
    or with repeats > 1 position j to rank j % world_size, so an image's copies (consecutive positions) land
    on different ranks. Either way a window reads exactly positions [start, end) over the ranks."""
    micro = world_size * batch_size
    end = epoch_end(n, micro) if end is None else end
    if start % 1 or (end - start) % micro or not 0 <= start <= end <= n:
        raise ValueError(f"epoch window [{start}, {end}) of {n} samples is not whole micro-batches of {micro}")
    window = np.arange(start, end)
    if repeats > 1:
        return window.reshape(-1, batch_size, world_size)[:, :, rank].reshape(-1)
    return window.reshape(-1, world_size, batch_size)[:, rank].reshape(-1)


def train_shard(n: int, rank: int, world_size: int, batch_size: int, seed: int, epoch: int,
                start: int = 0, end: int | None = None, repeats: int = 1) -> np.ndarray:
    """This rank's sample indices for global samples [start, end) of `epoch`, in reading order."""
    positions = train_positions(n, rank, world_size, batch_size, start, end, repeats)
    return epoch_sequence(n, seed, epoch, repeats)[positions]


def val_shard(n: int, rank: int, world_size: int) -> np.ndarray:
    return np.arange(n * rank // world_size, n * (rank + 1) // world_size)


def batch_seed(seed: int, rank: int, epoch: int, sample: int) -> int:
    """A seed for one batch's on-device augmentation, keyed by the global sample offset the batch
    starts at: a resumed run re-draws exactly what an uninterrupted run drew at the same place."""
    return int(np.random.SeedSequence([seed, rank, epoch, sample]).generate_state(1, np.uint64)[0] >> 1)


def minival_split(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) indices of a train split: `per_class` images of each class held out, drawn from the seed and
    the file list alone, so every rank, world size, resume and backend holds out the same ones. Sorted."""
    labels = np.asarray(labels)
    order = np.random.default_rng([seed, 0x6D696E69]).permutation(len(labels))  # 'mini': not the epochs' stream
    held = []
    for c in np.unique(labels):
        members = order[labels[order] == c]
        if len(members) <= per_class:
            raise DataError(f"data.minival_per_class={per_class}: class {int(c)} has only {len(members)} train "
                             "images; holding them all out leaves none to train on")
        held.append(members[:per_class])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held)
    return kept, held
