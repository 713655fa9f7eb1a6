"""The reference input pipeline: Pillow decode and crop in DataLoader workers.

Slow but simple and dependency-free; the correctness yardstick for the fast backends.
Workers return uint8 CHW tensors; normalisation happens on the training device, per batch.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def scan_split(root: str | Path, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every image of ROOT/split/<class>/; class index = sorted folder order."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root: {folder} does not exist (expected ROOT/{split}/<class>/*.JPEG)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"data.root: {folder} has no class folders")
    samples = [(str(f), idx) for idx, c in enumerate(classes)
               for f in sorted((folder / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise FileNotFoundError(f"data.root: no images under {folder}/<class>/")
    return samples, classes


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float], gen: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """Box (left, top, right, bottom) of Inception-style random-resized-crop sampling."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(u[2] * (width - w + 1)), int(u[3] * (height - h + 1))
            return left, top, left + w, top + h
    # Fallback: the central crop at the nearest allowed aspect ratio.
    in_ratio = width / height
    w, h = (width, round(width / ratio[0])) if in_ratio < ratio[0] else \
           (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


class ImageFolderSplit(Dataset):
    def __init__(self, root: str | Path, split: str, img_size: int, train: bool, *,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (0.75, 4 / 3),
                 hflip: float = 0.5, crop_pct: float = 0.875, interpolation: str = "bicubic") -> None:
        self.samples, self.classes = scan_split(root, split)
        self.img_size, self.train = img_size, train
        self.scale, self.ratio, self.hflip, self.crop_pct = tuple(scale), tuple(ratio), hflip, crop_pct
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as f:
            img = f.convert("RGB")
        size = self.img_size
        if self.train:
            box = random_resized_crop_box(img.width, img.height, self.scale, self.ratio)
            img = img.resize((size, size), self.resample, box=box)
            if self.hflip and torch.rand(()).item() < self.hflip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:  # resize the short side to size / crop_pct, then centre-crop size x size
            short = math.floor(size / self.crop_pct)
            w, h = (short, round(short * img.height / img.width)) if img.width <= img.height else \
                   (round(short * img.width / img.height), short)
            img = img.resize((w, h), self.resample)
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return _to_tensor(img), label


class ShardSampler(Sampler[int]):
    """Rank r of n takes every n-th index of a (per-epoch, seeded) permutation.

    Training drops the tail so every rank sees the same number of full batches; evaluation keeps
    every index exactly once across ranks (no padding duplicates to distort accuracy)."""

    def __init__(self, size: int, rank: int, world_size: int, shuffle: bool, seed: int = 0,
                 drop_last_to: int = 1) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.usable = size - size % (world_size * drop_last_to) if drop_last_to > 1 else size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=gen).tolist()

    def __iter__(self):
        return iter(self._order()[: self.usable][self.rank:: self.world_size])

    def __len__(self) -> int:
        return len(range(self.rank, self.usable, self.world_size))


def build_folder_loaders(root: str, img_size: int, batch_size: int, rank: int, world_size: int, *,
                         workers: int, seed: int, scale, ratio, hflip: float, crop_pct: float,
                         interpolation: str) -> tuple[DataLoader, DataLoader]:
    common = dict(img_size=img_size, interpolation=interpolation)
    train_set = ImageFolderSplit(root, "train", train=True, scale=scale, ratio=ratio, hflip=hflip, **common)
    val_set = ImageFolderSplit(root, "val", train=False, crop_pct=crop_pct, **common)
    if train_set.classes != val_set.classes:
        raise FileNotFoundError(f"data.root: {root}/train and {root}/val have different class folders: "
                                f"{set(train_set.classes) ^ set(val_set.classes)} are in only one of them")
    train_sampler = ShardSampler(len(train_set), rank, world_size, shuffle=True, seed=seed, drop_last_to=batch_size)
    val_sampler = ShardSampler(len(val_set), rank, world_size, shuffle=False)
    # Each rank's workers draw augmentation randomness from a generator seeded by (seed, rank).
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    opts = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    train = DataLoader(train_set, batch_size, sampler=train_sampler, drop_last=True, generator=gen, **opts)
    val = DataLoader(val_set, batch_size, sampler=val_sampler, **opts)
    return train, val
