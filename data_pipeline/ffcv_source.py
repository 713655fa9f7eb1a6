"""FFCV backend: reads the .beton files written by `launch/prepare_data.py ffcv`.

FFCV decodes JPEG, random-resized-crops (resized with Pillow's antialiased bicubic, ported to numba
in data_pipeline/ffcv_resize.py) and flips in its compiled pipeline; the batches
come out as uint8 NCHW on the training device and go through the shared on-device stage
(RandAugment/AutoAugment, normalisation, erasing, Mixup/CutMix), since FFCV has no RandAugment.
On a CPU without auto-augmentation FFCV normalises itself, in its parallel compiled code.
Order and sharding are ours (data_pipeline/sharding.py), so a run can be positioned at any
(epoch, step); FFCV's own crop/flip randomness is not seedable per sample.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import DataError


@contextmanager
def torch_threads_kept():
    """FFCV sets torch's CPU thread count on import (to 1), and to its worker count when a Loader is
    built and at every epoch (ffcv/pipeline/compiler.py). Left alone, data.workers would silently
    become the training's compute threads: measured here, a 1-thread model step was half as fast."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def beton_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}.beton"


class _Order:
    """Stands in for FFCV's TraversalOrder: the indices to read for an epoch window."""

    def __init__(self, order_fn) -> None:
        self.order_fn, self.start, self.end = order_fn, 0, None

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order_fn(epoch, self.start, self.end).astype(np.uint64)


class FfcvSource:
    def __init__(self, root: str, split: str, rank: int, world_size: int, batch_size: int, train: bool,
                 workers: int, seed: int, img_size: int, device: torch.device, num_classes: int, *,
                 scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip: float = 0.5, crop_pct: float = 0.875,
                 normalize: tuple | None = None, interpolation: str = "bicubic",
                 indices: np.ndarray | None = None, repeats: int = 1) -> None:
        """normalize=(mean, std): normalise inside FFCV's compiled pipeline and emit floats (the fast
        path on a CPU when nothing needs the uint8 batch); None: emit uint8 for the device stage.
        indices: only these samples of the file (sorted), as the whole split (minival and the train rest).
        repeats: repeated augmentation (FFCV's random crop draws per sample read, so each copy its own).
        Crops are resized as Pillow does (data_pipeline/ffcv_resize.py), not with FFCV's INTER_AREA."""
        with torch_threads_kept():
            from ffcv.fields.decoders import IntDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.reader import Reader
            from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

        from .ffcv_resize import pillow_resize_decoders
        from .sharding import train_shard, val_shard

        train_decoder, val_decoder = pillow_resize_decoders()

        path = beton_path(root, split)
        if not path.is_file():
            raise FileNotFoundError(f"data.root: {path} does not exist; write it with "
                                    f"`python launch/prepare_data.py ffcv --root <imagenet tree> --out {root}`")
        reader = Reader(str(path))
        labels = reader.metadata["f1"]
        if len(labels) and int(labels.max()) >= num_classes:
            raise DataError(f"{path} has labels up to {int(labels.max())} but model.num_classes={num_classes}")
        self.labels = np.asarray(labels)
        ids = np.arange(reader.num_samples) if indices is None else np.asarray(indices)
        n = len(ids)
        if train:
            decoder = train_decoder((img_size, img_size), scale=tuple(scale), ratio=tuple(ratio))
            image_ops = [decoder] + ([RandomHorizontalFlip(hflip)] if hflip else [])
            order_fn = lambda epoch, start, end: ids[train_shard(n, rank, world_size, batch_size, seed, epoch, start,
                                                                 end, repeats)]
        else:
            decoder = val_decoder((img_size, img_size), ratio=crop_pct)
            image_ops = [decoder]
            order_fn = lambda epoch, start, end: ids[val_shard(n, rank, world_size)]
        decoder.bicubic = interpolation == "bicubic"
        if normalize:  # before ToTensor: the order that does not hang on CPU (FFCV issues #350/#396)
            mean, std = (np.array(v, dtype=np.float32) * 255 for v in normalize)
            image_ops.append(NormalizeImage(mean, std, np.float32))
        image_ops.append(ToTensor())
        label_ops = [IntDecoder(), ToTensor(), Squeeze()]
        if device.type == "cuda":
            image_ops.append(ToDevice(device, non_blocking=True))
            label_ops.append(ToDevice(device, non_blocking=True))
        # NCHW shape over channels-last memory: a view, no copy (channels_last=False would copy every batch).
        image_ops.append(ToTorchImage(channels_last=True))
        with torch_threads_kept():
            self.loader = Loader(str(path), batch_size=batch_size, num_workers=max(1, workers),
                                 order=OrderOption.SEQUENTIAL, drop_last=False, os_cache=True,
                                 pipelines={"image": image_ops, "label": label_ops})
        self.order = _Order(order_fn)
        self.loader.traversal_order = self.order
        self.num_samples = int(n)
        self.batches_per_epoch = -(-len(order_fn(0, 0, None)) // batch_size)

    def batches(self, epoch: int, start: int, end: int | None):
        self.order.start, self.order.end = start, end
        self.loader.next_epoch = epoch
        with torch_threads_kept():
            return iter(self.loader)
