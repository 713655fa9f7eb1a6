"""Synthetic backend: random uint8 images at the configured shape, made once; measures model speed."""
from __future__ import annotations

import torch


class SyntheticSource:
    def __init__(self, batch_size: int, world_size: int, num_samples: int, img_size: int, num_classes: int,
                 seed: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        shape = (batch_size, 3, img_size, img_size)
        self.images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        self.micro = batch_size * world_size
        self.num_samples = num_samples
        self.batches_per_epoch = max(1, num_samples // self.micro)

    def batches(self, epoch: int, start: int, end: int | None):
        end = self.batches_per_epoch * self.micro if end is None else end
        for _ in range((end - start) // self.micro):
            yield self.images, self.labels
