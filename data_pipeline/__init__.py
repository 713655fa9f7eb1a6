"""Input pipelines. One interface for every backend:

    train, val = build_loaders(cfg, rank, world_size, device)

Each yields (images, labels) ready for the model: float NCHW, normalised, on `device`.
"""
from __future__ import annotations

from typing import Iterator

import torch

from models import model_info

from .datasets import write_digits
from .folder import build_folder_loaders

__all__ = ["DataError", "build_loaders", "write_digits", "DeviceLoader", "SyntheticLoader"]


class DataError(ValueError):
    """The configured data cannot be used; the message names the path or key and what is wrong."""


class DeviceLoader:
    """Moves uint8 batches to the device and normalises them there (one fused op, no host work)."""

    def __init__(self, loader, device: torch.device, mean, std) -> None:
        self.loader, self.device = loader, device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)

    @property
    def sampler(self):
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield (images.float() - self.mean) * self.inv_std, labels.to(self.device, non_blocking=True)


class SyntheticLoader:
    """Random images at the configured shape, made once on the device: measures model speed alone."""

    def __init__(self, batch_size: int, steps: int, img_size: int, num_classes: int,
                 device: torch.device, seed: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.images = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.labels


def build_loaders(cfg, rank: int, world_size: int, device: torch.device, batch_size: int):
    """(train, val) loaders for `cfg.data.backend`, sharded for this rank."""
    info = model_info(cfg.model.name)
    d = cfg.data
    if d.backend == "synthetic":
        steps = max(1, d.synthetic_size // (batch_size * world_size))
        make = lambda s: SyntheticLoader(batch_size, steps, cfg.model.img_size, cfg.model.num_classes, device, s)
        return make(cfg.train.seed + rank), make(cfg.train.seed + 10_000 + rank)
    if d.backend == "folder":
        if not d.root:
            raise DataError("data.root is not set: the folder with train/<class>/ and val/<class>/")
        train, val = build_folder_loaders(
            d.root, cfg.model.img_size, batch_size, rank, world_size, workers=d.workers, seed=cfg.train.seed,
            scale=d.scale, ratio=d.ratio, hflip=d.hflip, crop_pct=d.crop_pct or info.crop_pct,
            interpolation=d.interpolation)
        n_classes = len(train.dataset.classes)
        if n_classes != cfg.model.num_classes:
            raise DataError(f"data.root {d.root} has {n_classes} classes but model.num_classes="
                             f"{cfg.model.num_classes}")
        return DeviceLoader(train, device, info.mean, info.std), DeviceLoader(val, device, info.mean, info.std)
    raise DataError(f"data.backend={d.backend} is not available yet in this version; "
                              "use data.backend=folder (Pillow reference loader) or synthetic")
