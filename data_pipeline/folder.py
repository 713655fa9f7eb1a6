"""The reference input pipeline: Pillow decode, RandomResizedCrop and flip in DataLoader workers.

Slow but simple and dependency-free: the correctness yardstick for the fast backends and the
fallback that works everywhere. Workers return uint8 CHW tensors; the on-device stage does the
rest. Each sample's crop and flip are drawn from (seed, epoch, index), so any (epoch, step)
position reproduces the uninterrupted stream whatever the number of workers.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .errors import DataError
from .sharding import epoch_sequence, train_positions, val_shard

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def filelist_path(root: str | Path, split: str) -> Path:
    """Written by `launch/prepare_data.py verify`: the checked images, 'relative/path label' per line."""
    return Path(root) / f"{split}_filelist.txt"


class SampleList(Sequence):
    """(path, class index) pairs held in numpy arrays: the paths' bytes in one buffer (a file list's own text,
    read once) with start/end offsets, a common prefix, and the labels. Indexing gives (str, int) as a list of
    tuples would, but a DataLoader worker forked from the main process reads them without touching a Python
    object per sample: a list of 1.28 M tuples is copied into every worker page by page as their reference
    counts change (copy-on-read, PyTorch #13246: +150 MB per worker in 45 s on ImageNet's file list)."""

    def __init__(self, prefix: str, buffer: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 labels: np.ndarray) -> None:
        self.prefix, self.buffer = prefix, buffer
        self.starts, self.ends, self.labels = starts, ends, labels

    @classmethod
    def from_pairs(cls, pairs) -> SampleList:
        if isinstance(pairs, SampleList):
            return pairs
        pairs = list(pairs)
        encoded = [p.encode() for p, _ in pairs]
        ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        return cls("", np.frombuffer(b"".join(encoded), dtype=np.uint8), ends - [len(e) for e in encoded], ends,
                   np.array([label for _, label in pairs], dtype=np.int64))

    @classmethod
    def from_filelist(cls, path: Path, prefix: str) -> SampleList:
        """Parse 'relative/path label' lines with a few vectorised passes over the file's bytes."""
        raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        if len(raw) and raw[-1] != 10:
            raw = np.concatenate([raw, np.array([10], dtype=np.uint8)])
        ends = np.flatnonzero(raw == 10)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
        ends = ends - ((ends > starts) & (raw[np.maximum(ends - 1, 0)] == 13))  # \r\n line endings
        keep = ends > starts  # blank lines
        starts, ends = starts[keep], ends[keep]
        spaces = np.flatnonzero(raw == 32)
        last = np.searchsorted(spaces, ends) - 1  # each line's last space
        split_at = spaces[np.maximum(last, 0)] if len(spaces) else np.full(len(ends), -1)
        bad = (last < 0) | (split_at <= starts) | (split_at >= ends - 1)
        labels = np.zeros(len(ends), dtype=np.int64)
        width = int((ends - split_at - 1)[~bad].max(initial=0))
        for k in range(width):
            pos = split_at + 1 + k
            inside = pos < ends
            digit = raw[np.minimum(pos, len(raw) - 1)].astype(np.int64) - 48
            bad |= inside & ((digit < 0) | (digit > 9))
            labels = np.where(inside, labels * 10 + digit, labels)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            line = bytes(raw[starts[i]:ends[i]]).decode(errors="replace")
            raise DataError(f"{path}:{i + 1}: expected 'relative/path label', got {line!r} (rewrite the lists with "
                            "`python launch/prepare_data.py verify`)")
        return cls(prefix, raw, starts, split_at, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return self.prefix + self.buffer[self.starts[i]:self.ends[i]].tobytes().decode()

    def __getitem__(self, i: int) -> tuple[str, int]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.path(i), int(self.labels[i])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for i in range(len(self)):
            yield self.path(i), int(self.labels[i])

    def paths(self) -> list[str]:
        return [self.path(i) for i in range(len(self))]

    def subset(self, indices) -> SampleList:
        idx = np.asarray(indices, dtype=np.int64)
        return SampleList(self.prefix, self.buffer, self.starts[idx], self.ends[idx], self.labels[idx])


def scan_split(root: str | Path, split: str, use_filelist: bool = True) -> tuple[SampleList, list[str]]:
    """(path, class index) for every image of ROOT/split/<class>/; class index = sorted folder order.
    Uses the verified file list from prepare_data when there is one (and use_filelist)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root: {folder} does not exist (expected ROOT/{split}/<class>/*.JPEG)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"data.root: {folder} has no class folders (expected {folder}/<class>/*.JPEG)")
    listed = filelist_path(root, split)
    if use_filelist and listed.is_file():
        return SampleList.from_filelist(listed, f"{Path(root)}{os.sep}"), classes
    samples: list[tuple[str, int]] = []
    for idx, c in enumerate(classes):
        files = sorted(e.name for e in os.scandir(folder / c)
                       if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"data.root: class folder {folder / c} has no images "
                                    f"(expected *.JPEG/*.jpg/*.png)")
        base = f"{folder / c}{os.sep}"
        samples += [(base + f, idx) for f in files]
    return SampleList.from_pairs(samples), classes


_MAGIC = {b"\xff\xd8\xff": ("JPEG", b"\xff\xd9"), b"\x89PN": ("PNG", b"IEND")}


def sniff_image(path: str) -> str | None:
    """A cheap check (two small reads, no decode) for what most often breaks a run hours in: an empty
    file, a file that is not a JPEG/PNG whatever its name, a file cut short (no end marker in its
    last 64 bytes). None when the file looks whole; else why not."""
    try:
        with open(path, "rb") as f:
            head = f.read(3)
            if not head:
                return "empty file"
            kind = _MAGIC.get(head)
            if kind is None:
                return f"not a JPEG or PNG (starts with {head.hex()})"
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
            if kind[1] not in f.read():
                return f"truncated {kind[0]} (no end marker)"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None


def screen(samples: SampleList, threads: int = 16, rank: int = 0,
           world_size: int = 1) -> tuple[SampleList, list[tuple[str, str]]]:
    """(samples that look whole, [(path, reason)] for those left out), by sniff_image. With world_size > 1
    (torch.distributed initialised) each rank checks every world_size-th file and the ranks exchange what
    they left out: one read of each file per job, not per rank (16 ranks on a node would otherwise read
    every ImageNet header 16 times over the shared file system), and the same answer on every rank."""
    from concurrent.futures import ThreadPoolExecutor
    split = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    share = range(rank, len(samples), world_size) if split else range(len(samples))
    with ThreadPoolExecutor(threads) as pool:  # I/O bound: threads overlap the reads
        reasons = list(pool.map(sniff_image, (samples.path(i) for i in share), chunksize=256))
    bad = [(i, r) for i, r in zip(share, reasons) if r is not None]
    if split:
        every: list = [None] * world_size
        torch.distributed.all_gather_object(every, bad)
        bad = sorted(b for rank_bad in every for b in rank_bad)
    kept = np.ones(len(samples), dtype=bool)
    kept[[i for i, _ in bad]] = False
    return samples.subset(np.flatnonzero(kept)), [(samples.path(i), r) for i, r in bad]


def check_same_classes(root: str | Path, train_classes: list[str], val_classes: list[str]) -> None:
    if train_classes != val_classes:
        only = sorted(set(train_classes) ^ set(val_classes))
        raise FileNotFoundError(f"data.root: {root}/train and {root}/val have different class folders "
                                f"({len(train_classes)} vs {len(val_classes)}; in only one: {only[:5]})")


def random_resized_crop_box(width: int, height: int, scale, ratio,
                            gen: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """Box (left, top, right, bottom) of Inception-style random-resized-crop sampling."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
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


def load_rgb(path: str) -> Image.Image:
    """Decode to RGB (grayscale, CMYK, palette and alpha images included), naming the file on failure."""
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except Exception as e:  # PIL raises several types for truncated/corrupt data
        raise RuntimeError(f"{path}: cannot decode image ({e}); `launch/prepare_data.py verify --skip-bad` "
                           "lists and excludes unreadable files") from None


def center_crop(img: Image.Image, size: int, crop_pct: float, resample: int) -> Image.Image:
    """Resize the short side to size / crop_pct, then take the central size x size."""
    short = math.floor(size / crop_pct)
    w, h = (short, round(short * img.height / img.width)) if img.width <= img.height else \
           (round(short * img.width / img.height), short)
    img = img.resize((w, h), resample)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class ImageFolderSplit(Dataset):
    """Indexed by (epoch, index) so that a sample's random crop depends on nothing else."""

    def __init__(self, samples: list[tuple[str, int]], img_size: int, train: bool, *, seed: int = 0,
                 scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip: float = 0.5, crop_pct: float = 0.875,
                 interpolation: str = "bicubic") -> None:
        self.samples, self.img_size, self.train, self.seed = SampleList.from_pairs(samples), img_size, train, seed
        self.scale, self.ratio, self.hflip, self.crop_pct = tuple(scale), tuple(ratio), hflip, crop_pct
        self.resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """(image, label, 1 if the sample was replaced because its file did not decode). With repeated
        augmentation the index carries the copy number (index + copy * len): each copy its own crop."""
        epoch, index = key
        copy, index = divmod(index, len(self.samples))
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = load_rgb(path)
                break
            except RuntimeError as e:  # named, then replaced by the next file: the run goes on
                print(f"[data] WARNING {e}; replaced by the next image in this batch", file=sys.stderr, flush=True)
        else:
            raise RuntimeError(f"no image of the split decodes (the last tried: {path})")
        size = self.img_size
        if self.train:
            draw = (self.seed, epoch, index, copy) if copy else (self.seed, epoch, index)
            gen = torch.Generator().manual_seed(hash(draw) & (2 ** 62 - 1))
            img = img.resize((size, size), self.resample,
                             box=random_resized_crop_box(img.width, img.height, self.scale, self.ratio, gen))
            if self.hflip and torch.rand((), generator=gen).item() < self.hflip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = center_crop(img, size, self.crop_pct, self.resample)
        return to_uint8_chw(img), label, int(attempt > 0)


class _WindowBatches:
    """A batch sampler whose epoch window is set before each pass (read in the main process, so
    persistent workers pick up the change)."""

    def __init__(self, order_fn, batch_size: int) -> None:
        self.order_fn, self.batch_size, self.epoch, self.start, self.end = order_fn, batch_size, 0, 0, None
        self.idle = False  # yields nothing: lets the workers start without reading a batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.idle:
            return
        order = self.order_fn(self.epoch, self.start, self.end)
        for s in range(0, len(order), self.batch_size):
            yield [(self.epoch, int(i)) for i in order[s:s + self.batch_size]]

    def __len__(self) -> int:
        return -(-len(self.order_fn(self.epoch, self.start, self.end)) // self.batch_size)


class FolderSource:
    """uint8 batches for one split of an ImageNet-layout tree, sharded for this rank."""

    def __init__(self, samples, rank: int, world_size: int, batch_size: int, train: bool, workers: int,
                 seed: int, repeats: int = 1, **dataset_args) -> None:
        self.dataset = ImageFolderSplit(samples, train=train, seed=seed, **dataset_args)
        n = self.num_samples = len(samples)
        self.rank = rank

        def train_order(epoch: int, start: int, end: int | None) -> np.ndarray:
            positions = train_positions(n, rank, world_size, batch_size, start, end, repeats)
            copies = positions % repeats if repeats > 1 else 0  # the k-th copy of its image
            return epoch_sequence(n, seed, epoch, repeats)[positions] + n * copies

        order_fn = train_order if train else (lambda epoch, start, end: val_shard(n, rank, world_size))
        self.sampler = _WindowBatches(order_fn, batch_size)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=workers,
                                 pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                                 prefetch_factor=4 if workers else None)
        self.batches_per_epoch = -(-len(order_fn(0, 0, None)) // batch_size)
        self.decode_failures = 0  # samples replaced because their file did not decode

    def start_workers(self) -> None:
        """Fork the (persistent) worker processes now. The trainer calls this before it starts its threads
        (hang watchdog, MLflow, progress bar): a fork while another thread holds a lock leaves the child
        waiting on that lock forever, which is how a validation worker forked at the first evaluation hung."""
        if self.loader.num_workers and self.loader._iterator is None:
            self.sampler.idle = True
            try:
                iter(self.loader)
            finally:
                self.sampler.idle = False

    def batches(self, epoch: int, start: int, end: int | None):
        self.sampler.epoch, self.sampler.start, self.sampler.end = epoch, start, end
        record = os.environ.get("TRAIN_TEST_RECORD_SAMPLES") if self.dataset.train else None
        order = iter(self.sampler) if record else None
        for images, labels, replaced in self.loader:
            self.decode_failures += int(replaced.sum())
            if record:  # test-only: "epoch index path" of every train sample as its batch is handed on
                with open(record, "a") as f:
                    n = len(self.dataset.samples)
                    f.write("".join(f"{e} {i % n} {self.dataset.samples[i % n][0]} {self.rank}\n"
                                    for e, i in next(order)))
            yield images, labels
