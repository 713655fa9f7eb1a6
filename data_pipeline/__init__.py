"""Input pipelines. One interface for every backend (dali, ffcv, folder, synthetic):

    train, val = build_loaders(cfg, rank, world_size)

A train loader reads a window of an epoch, `set_window(epoch, start, end)` in global sample
offsets (data_pipeline/sharding.py: an offset means the same at every world size), and yields
(images, targets) ready for the model: float NCHW, normalised, on the training device. Train
targets are soft (B, num_classes) — label smoothing and Mixup/CutMix folded in; val targets are
class indices.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from models import model_info

from .errors import DataError
from .prepare import write_digits
from .sharding import batch_seed, minival_split

__all__ = ["DataError", "Loader", "build_loaders", "dataset_input", "write_digits"]


INSTALL_HINTS = {
    "ffcv": "it builds from source against Debian's libturbojpeg0-dev libopencv-dev pkg-config: install those, "
            "then `pip install --no-build-isolation ffcv==1.0.2` (`make test` or `make demo` does both as root)",
    "nvidia.dali": "`pip install nvidia-dali-cuda130` (the wheel for your CUDA major version; it also runs "
                   "DALI's CPU mode)",
}


def require(module: str, backend: str) -> None:
    """A missing optional library is a configuration problem: say so before any loader starts."""
    from .ffcv_source import torch_threads_kept  # importing ffcv changes torch's thread count
    try:
        with torch_threads_kept():
            __import__(module)
    except ImportError as e:
        raise DataError(f"data.backend={backend} needs the {module} package, which cannot be imported ({e}): "
                        f"{INSTALL_HINTS[module]}") from None


Stage = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class Loader:
    """The common face of every backend. `source.batches(epoch, start, end)` yields the backend's
    micro-batches of global samples [start, end); the on-device `stage` turns them into model inputs,
    seeded per (seed, rank, epoch, sample offset)."""

    def __init__(self, source, stage: Stage, device: torch.device, seed: int, rank: int, world_size: int,
                 batch_size: int, mixup_until_epoch: int | None = None) -> None:
        self.source, self.stage, self.device, self.seed, self.rank = source, stage, device, seed, rank
        self.micro_samples = world_size * batch_size  # global samples per micro-batch
        self.mixup_until_epoch = mixup_until_epoch  # timm's mixup_off_epoch, as the first epoch without
        self.epoch, self.start, self.end = 0, 0, None
        self.bad_files: list[tuple[str, str]] = []  # (path, why) left out when the split was scanned
        self.class_names: list[str] | None = None  # the split's class folders (wnids), in label order, where known
        self.minival: Loader | None = None  # train loaders: the held-out train images (data.minival_per_class)

    @property
    def decode_failures(self) -> int:
        """Samples replaced so far because their file did not decode (folder backend)."""
        return getattr(self.source, "decode_failures", 0)

    @property
    def num_samples(self) -> int:
        """Samples in the whole split (train: before an epoch's tail is cut to whole steps)."""
        return self.source.num_samples

    def __len__(self) -> int:
        return self.source.batches_per_epoch

    def set_window(self, epoch: int, start: int = 0, end: int | None = None) -> None:
        """The next iteration yields global samples [start, end) of epoch `epoch` (None: to its end)."""
        self.epoch, self.start, self.end = epoch, start, end

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, sample = self.epoch, self.start
        if self.mixup_until_epoch is not None:
            self.stage.set_mixup_enabled(epoch < self.mixup_until_epoch)
        for images, labels in self.source.batches(epoch, self.start, self.end):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            yield self.stage(images, labels, batch_seed(self.seed, self.rank, epoch, sample))
            sample += self.micro_samples
        self.epoch, self.start, self.end = epoch + 1, 0, None  # a plain loop over epochs needs no set_window


def _normalizer(mean, std, device: torch.device):
    inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)
    shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255 * inv_std
    return lambda images: torch.addcmul(shift, images.float(), inv_std)  # (x - mean) / std in one pass


def _val_stage(mean, std, device) -> Stage:
    normalize = _normalizer(mean, std, device)
    return lambda images, labels, seed: (normalize(images), labels)


def _train_stage(cfg, mean, std, device, normalized_input: bool, augment: bool) -> Stage:
    """The shared on-device stage, the one implementation of the recipe's augmentation for every
    backend. FFCV on a CPU without auto-augment normalises inside its compiled pipeline; the
    synthetic backend measures model speed, so it gets no augmentation at all."""
    from .augment import DeviceAugment

    a = cfg.aug
    knobs = dict(auto_augment="none" if normalized_input else a.auto_augment, reprob=a.reprob, remode=a.remode,
                 recount=a.recount, mixup=a.mixup, cutmix=a.cutmix, mixup_prob=a.mixup_prob,
                 interpolation=cfg.data.interpolation)
    if not augment:
        knobs.update(auto_augment="none", reprob=0.0, mixup=0.0, cutmix=0.0)
    return DeviceAugment(mean=mean, std=std, normalize=not normalized_input, switch_prob=a.mixup_switch_prob,
                         smoothing=a.smoothing, num_classes=cfg.model.num_classes, device=device, **knobs)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_loaders(cfg, rank: int, world_size: int, device: torch.device | None = None,
                  train: bool = True, val_samples: list[tuple[str, int]] | None = None) -> tuple[Loader | None, Loader]:
    """(train, val) loaders for `cfg.data.backend`, sharded for this rank. `cfg` is resolved
    (trainer.config.resolved): train.batch_size is the per-rank batch. train=False builds the val
    loader only (None for train), so evaluation needs only ROOT/val (or val.beton). val_samples
    (folder and DALI backends, train=False): these (path, label) instead of ROOT/val, in this order."""
    device = device or default_device()
    info = model_info(cfg.model.name)
    d, bs, seed, size = cfg.data, cfg.train.batch_size, cfg.train.seed, cfg.model.img_size
    crop_pct = d.crop_pct or info.crop_pct
    explicit_val = val_samples is not None
    minival_src = None
    if d.minival_per_class and d.backend == "synthetic":
        raise DataError("data.minival_per_class holds out images of a real train tree; data.backend=synthetic has none")
    if d.backend == "synthetic":
        from .synthetic import SyntheticSource
        n_val = max(bs * world_size, d.synthetic_size // 10)
        train_src = SyntheticSource(bs, world_size, d.synthetic_size, size, cfg.model.num_classes, seed + rank, device)
        val_src = SyntheticSource(bs, world_size, n_val, size, cfg.model.num_classes, seed + 10_007 + rank, device)
        normalized = False
    elif explicit_val and (train or d.backend not in ("folder", "dali")):
        raise DataError(f"data.backend={d.backend}: evaluating a file list or another tree needs the folder or dali "
                        "backend (data.backend=folder), and no train loader")
    elif not d.root and not explicit_val:
        raise DataError(f"data.root is not set: data.backend={d.backend} needs the dataset's folder")
    elif d.backend in ("folder", "dali"):  # both read JPEG files: ROOT/{train,val} scanned once, checked once
        if d.backend == "dali":
            require("nvidia.dali", "dali")
        from .folder import FolderSource, check_same_classes, filelist_path, scan_split, screen
        bad: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
        train_samples = None
        if not explicit_val:
            train_samples, train_classes = scan_split(d.root, "train") if train else (None, None)
            val_samples, val_classes = scan_split(d.root, "val")
            for split in ("train", "val") if train else ("val",):  # an unverified tree: a cheap check of every file
                if not filelist_path(d.root, split).is_file():
                    kept, bad[split] = screen(train_samples if split == "train" else val_samples,
                                             rank=rank, world_size=world_size)
                    if split == "train":
                        train_samples = kept
                    else:
                        val_samples = kept
            if train:
                check_same_classes(d.root, train_classes, val_classes)
            if len(val_classes) != cfg.model.num_classes:
                raise DataError(f"data.root {d.root} has {len(val_classes)} classes but model.num_classes="
                                f"{cfg.model.num_classes}")
        minival_samples = None
        if train and d.minival_per_class:  # held out of train/ before anything is sharded: never trained on
            kept, held = minival_split(train_samples.labels, d.minival_per_class, seed)
            train_samples, minival_samples = train_samples.subset(kept), train_samples.subset(held)
        common = dict(rank=rank, world_size=world_size, batch_size=bs, workers=d.workers, seed=seed,
                      img_size=size, interpolation=d.interpolation)
        if d.backend == "folder":
            train_src = FolderSource(train_samples, train=True, scale=d.scale, ratio=d.ratio, hflip=d.hflip,
                                     repeats=cfg.aug.repeats, **common) if train else None
            val_src = FolderSource(val_samples, train=False, crop_pct=crop_pct, **common)
            minival_src = FolderSource(minival_samples, train=False, crop_pct=crop_pct, **common) \
                if minival_samples is not None else None
        else:
            from .dali_source import DaliSource
            train_src = DaliSource(train_samples, f"{d.root}/train", train=True, scale=d.scale, ratio=d.ratio,
                                   hflip=d.hflip, device=device, repeats=cfg.aug.repeats, **common) if train else None
            val_src = DaliSource(val_samples, "the evaluated images" if explicit_val else f"{d.root}/val",
                                 train=False, crop_pct=crop_pct, device=device, **common)
            minival_src = DaliSource(minival_samples, f"{d.root}/train (minival)", train=False, crop_pct=crop_pct,
                                     device=device, **common) if minival_samples is not None else None
        normalized = False
    elif d.backend == "ffcv":
        require("ffcv", "ffcv")
        from .ffcv_source import FfcvSource
        common = dict(rank=rank, world_size=world_size, batch_size=bs, workers=d.workers, seed=seed,
                      img_size=size, device=device, num_classes=cfg.model.num_classes, interpolation=d.interpolation)
        normalized = device.type == "cpu" and cfg.aug.auto_augment == "none"
        kept = held = None
        if train and d.minival_per_class:  # the same rule as the folder backend's, on the .beton's labels
            from ffcv.reader import Reader

            from .ffcv_source import beton_path
            kept, held = minival_split(Reader(str(beton_path(d.root, "train"))).metadata["f1"],
                                       d.minival_per_class, seed)
        train_src = FfcvSource(d.root, "train", train=True, scale=d.scale, ratio=d.ratio, hflip=d.hflip,
                               normalize=(info.mean, info.std) if normalized else None, indices=kept,
                               repeats=cfg.aug.repeats, **common) if train else None
        minival_src = FfcvSource(d.root, "train", train=False, crop_pct=crop_pct, indices=held,
                                 normalize=(info.mean, info.std) if normalized else None, **common) \
            if held is not None else None
        val_src = FfcvSource(d.root, "val", train=False, crop_pct=crop_pct,
                             normalize=(info.mean, info.std) if normalized else None, **common)
    else:
        raise DataError(f"data.backend={d.backend!r}: expected dali, ffcv, folder or synthetic")
    val_stage = (lambda images, labels, seed: (images, labels)) if normalized else \
        _val_stage(info.mean, info.std, device)
    mixup_until = cfg.aug.mixup_off_epoch or None  # timm's meaning: Mixup/CutMix off from this epoch on
    train_loader = Loader(train_src, _train_stage(cfg, info.mean, info.std, device, normalized,
                                                  augment=d.backend != "synthetic"), device, seed, rank,
                          world_size, bs, mixup_until) if train else None
    val_loader = Loader(val_src, val_stage, device, seed, rank, world_size, bs)
    if train_loader is not None:  # data.minival_per_class: train images held out, read as val is
        train_loader.minival = Loader(minival_src, val_stage, device, seed, rank, world_size, bs) \
            if minival_src is not None else None
    if d.backend in ("folder", "dali"):
        if train_loader is not None:
            train_loader.bad_files = bad["train"]
        val_loader.bad_files = bad["val"]
        if not explicit_val:
            for loader in (train_loader, val_loader):
                if loader is not None:
                    loader.class_names = list(val_classes)
    elif d.backend == "ffcv":  # a .beton has labels only; the folder tree it came from names them
        from .folder import scan_split
        for loader, split in ((train_loader, "train"), (val_loader, "val")):
            if loader is not None and (Path(d.root) / split).is_dir():
                loader.class_names = scan_split(d.root, split)[1]
    return train_loader, val_loader


CROP_CANDIDATES = (0.875, 0.9, 0.95, 1.0)


def minival_loader(cfg, rank: int, world_size: int, device: torch.device, crop_pct: float,
                   fork: bool = True) -> Loader:
    """The minival images (data.minival_per_class of train/) read with val's transform at `crop_pct`: the crop fit
    at the end of training and evaluate.py --fit-crop. fork=False: the folder backend decodes in this process (the
    trainer's threads are running by then, and a fork beside them can hang the child)."""
    d, bs, seed, size = cfg.data, cfg.train.batch_size, cfg.train.seed, cfg.model.img_size
    if not d.minival_per_class or not d.root:
        raise DataError("fitting the evaluation crop needs minival: data.root and data.minival_per_class > 0")
    workers = d.workers if fork or d.backend != "folder" else 0  # DALI and FFCV use threads, not processes
    common = dict(rank=rank, world_size=world_size, batch_size=bs, workers=workers, seed=seed, img_size=size,
                  interpolation=d.interpolation)
    info = model_info(cfg.model.name)
    if d.backend == "ffcv":
        require("ffcv", "ffcv")
        from ffcv.reader import Reader

        from .ffcv_source import FfcvSource, beton_path
        _, held = minival_split(Reader(str(beton_path(d.root, "train"))).metadata["f1"], d.minival_per_class, seed)
        normalized = device.type == "cpu" and cfg.aug.auto_augment == "none"
        src = FfcvSource(d.root, "train", train=False, crop_pct=crop_pct, indices=held, device=device,
                         num_classes=cfg.model.num_classes, normalize=(info.mean, info.std) if normalized else None,
                         **common)
        stage = (lambda images, labels, seed: (images, labels)) if normalized else _val_stage(info.mean, info.std, device)
        return Loader(src, stage, device, seed, rank, world_size, bs)
    from .folder import FolderSource, scan_split
    samples, _ = scan_split(d.root, "train")
    _, held = minival_split(samples.labels, d.minival_per_class, seed)
    held_samples = samples.subset(held)
    if d.backend == "dali":
        require("nvidia.dali", "dali")
        from .dali_source import DaliSource
        src = DaliSource(held_samples, f"{d.root}/train (minival)", train=False, crop_pct=crop_pct, device=device,
                         **common)
    else:
        src = FolderSource(held_samples, train=False, crop_pct=crop_pct, **common)
    return Loader(src, _val_stage(info.mean, info.std, device), device, seed, rank, world_size, bs)


def dataset_input(cfg, train: Loader, val: Loader) -> tuple[str, str, str, dict]:
    """(name, source, digest, profile) of the run's data for MLflow's dataset input: the digest is a
    sha256 of the file lists with labels (FFCV: of the .beton files' sizes and times)."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256()
    for loader in (train, val):
        src = loader.source
        if hasattr(src, "dataset"):  # folder
            items = (f"{p} {label}" for p, label in src.dataset.samples)
        elif hasattr(src, "files"):  # dali
            items = (f"{p} {label}" for p, label in zip(src.files, src.labels.tolist()))
        else:  # ffcv, synthetic
            items = [f"{cfg.data.backend} {cfg.data.root} {loader.num_samples}"]
            for split in ("train", "val"):
                path = Path(cfg.data.root or "") / f"{split}.beton"
                if path.is_file():
                    stat = path.stat()
                    items.append(f"{path} {stat.st_size} {int(stat.st_mtime)}")
        for item in items:
            digest.update(item.encode() + b"\n")
    root = cfg.data.root or cfg.data.backend
    profile = {"backend": cfg.data.backend, "train_samples": train.num_samples, "val_samples": val.num_samples,
               "classes": cfg.model.num_classes, "left_out_files": len(train.bad_files) + len(val.bad_files)}
    return Path(str(root)).name or str(root), str(root), digest.hexdigest()[:16], profile

