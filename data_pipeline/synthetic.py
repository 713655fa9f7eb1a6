"""Synthetic backend: random uint8 images at the configured shape, made once; measures model speed."""
from __future__ import annotations

import torch


class SyntheticSource:
    def __init__(self, batch_size: int, steps: int, img_size: int, num_classes: int, seed: int,
                 device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        shape = (batch_size, 3, img_size, img_size)
        self.images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        self.batches_per_epoch = steps

    def batches(self, epoch: int, start_step: int):
        for _ in range(start_step, self.batches_per_epoch):
            yield self.images, self.labels
