"""DALI backend: nvJPEG decode on the GPU ("mixed"), or DALI's CPU-only mode without a GPU.

The reader shards by GLOBAL rank (shard_id = rank, num_shards = world size): with the local
rank, multi-node runs would silently read one node's shards only. The file order of each epoch
comes from data_pipeline/sharding.py, handed to the reader as an explicit list, so every epoch
is reshuffled from the run's seed and a run can be positioned at any (epoch, sample offset). Crop and flip
run inside DALI from its per-sample RNGs, seeded per (rank, epoch); those RNGs advance with every
batch and cannot be set to a position, so a resume inside an epoch at the same world size replays
the epoch's pipeline up to the resume point (decode and crop, outputs dropped, no training): the
continuation is then the same as an uninterrupted run's, at the cost of at most one epoch of
input-pipeline time.

DALI hands on uint8 (B, 3, H, W) batches, as the folder and FFCV backends do, and RandAugment /
AutoAugment, normalisation, erasing and Mixup run in the shared device stage
(data_pipeline/augment.py): one implementation of the recipe for every backend. DALI's own
`nvidia.dali.auto_aug` is not used: its RandAugment applies every drawn op (timm: each with p=0.5),
has another op set, no magnitude noise, and its AutoAugment is timm's v0 policy, not the original.
The train resize is antialiased bicubic, as Pillow's is on the folder path and as the eval resize.
"""
from __future__ import annotations

import contextlib
import gc
import math
import sys

import numpy as np
import torch

from .errors import DataError
from .folder import SampleList
from .sharding import batch_seed, epoch_end, train_shard, val_shard


@contextlib.contextmanager
def _gc_paused():
    """DALI's conditionals (used by its RandAugment/AutoAugment) rewrite the pipeline with
    autograph, which builds ASTs. On CPython < 3.11.8 a garbage collection inside that build can run
    finalizers that parse code too and corrupt the interpreter's AST depth counter ("AST constructor
    recursion depth mismatch", python/cpython#106905), so no collection may start meanwhile."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# nvJPEG's buffers sized up front for the largest image in ImageNet (the figures of NVIDIA's own ImageNet
# examples): with DALI's defaults (16 MB device, 8 MB host) the mixed decoder reallocates, and stalls, each
# time a larger image arrives. Fancy (smooth) chroma upsampling: what libjpeg-turbo, and so Pillow and DALI's
# CPU decoder, do by default; the mixed decoder's default (off) gives other pixels than the CPU decoders
# the parity tests hold every backend to.
NVJPEG_ARGS = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512,
                   preallocate_width_hint=5_980, preallocate_height_hint=6_430, jpeg_fancy_upsampling=True)


class DaliSource:
    def __init__(self, samples: SampleList | list[tuple[str, int]], where: str, rank: int, world_size: int, batch_size: int,
                 train: bool, workers: int, seed: int, img_size: int, device: torch.device, *,
                 interpolation: str = "bicubic", scale=(0.08, 1.0), ratio=(0.75, 4 / 3), hflip: float = 0.5,
                 crop_pct: float = 0.875, repeats: int = 1) -> None:
        """samples: (path, class index) from folder.scan_split, checked by build_loaders; where: for messages.
        repeats: repeated augmentation (each copy gets its own draws: DALI's random ops draw per sample read)."""
        samples = SampleList.from_pairs(samples)
        self.files, self.where = samples.paths(), where
        self.labels = samples.labels.astype(np.int32)
        self.rank, self.world_size, self.batch_size, self.train = rank, world_size, batch_size, train
        self.threads, self.seed, self.device, self.repeats = max(1, workers), seed, device, repeats
        self.opts = dict(img_size=img_size, interp=interpolation, scale=tuple(scale), ratio=tuple(ratio),
                         hflip=hflip, crop_pct=crop_pct)
        n = self.num_samples = len(samples)
        self.micro = world_size * batch_size
        if train and n < self.micro:
            raise DataError(f"{n} images in {where} cannot fill a batch of {batch_size} on {world_size} ranks")
        per_rank = epoch_end(n, self.micro) // world_size if train else len(val_shard(n, rank, world_size))
        self.batches_per_epoch = -(-per_rank // batch_size)
        self._next: dict = {}  # (epoch, start, end) -> an iterator already built and prefetching
        self.decode_failures = 0  # files replaced because DALI could not decode them

    def _epoch_files(self, epoch: int, start: int, end: int) -> tuple[list[str], list[int]]:
        """The global file list for the reader: rank blocks of samples [start, end) (the reader's
        shard r is the r-th contiguous block)."""
        if not self.train:
            return self.files, self.labels.tolist()
        n = len(self.files)
        order = np.concatenate([train_shard(n, r, self.world_size, self.batch_size, self.seed, epoch, start, end,
                                            self.repeats) for r in range(self.world_size)])
        return [self.files[i] for i in order], self.labels[order].tolist()

    def _pipeline(self, files: list[str], labels: list[int], seed: int):
        from nvidia.dali import fn, pipeline_def, types

        o, gpu = self.opts, self.device.type == "cuda"
        size = o["img_size"]
        interp = types.INTERP_CUBIC if o["interp"] == "bicubic" else types.INTERP_LINEAR

        @pipeline_def
        def pipe():
            jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=self.rank,
                                           num_shards=self.world_size, random_shuffle=False,
                                           pad_last_batch=not self.train, name="reader")
            decode_device, decode_args = ("mixed", NVJPEG_ARGS) if gpu else ("cpu", {})
            if self.train:
                images = fn.decoders.image_random_crop(
                    jpegs, device=decode_device, output_type=types.RGB, random_area=list(o["scale"]),
                    random_aspect_ratio=list(o["ratio"]), num_attempts=10, **decode_args)
                images = fn.resize(images, size=[size, size], interp_type=interp, antialias=True)
                mirror = fn.random.coin_flip(probability=o["hflip"]) if o["hflip"] else 0
                images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", mirror=mirror)
            else:
                images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **decode_args)
                images = fn.resize(images, resize_shorter=math.floor(size / o["crop_pct"]), interp_type=interp)
                images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="CHW", crop=[size, size])
            return images, label

        return pipe(batch_size=self.batch_size, num_threads=self.threads,
                    device_id=self.device.index or 0 if gpu else None, seed=seed,
                    prefetch_queue_depth=2)

    def _iterator(self, epoch: int, start: int, end: int):
        files, labels = self._epoch_files(epoch, start, end)
        with _gc_paused():  # DALI's first import parses signatures with ast too
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

            pipe = self._pipeline(files, labels, batch_seed(self.seed, self.rank, epoch, 0) % 2 ** 31)
            policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
            # Building the iterator builds and starts the pipeline: it prefetches its first batches from here on.
            return DALIGenericIterator(pipe, ["images", "labels"], reader_name="reader",
                                       last_batch_policy=policy, auto_reset=False)

    def _rank_order(self, epoch: int, start: int, end: int | None) -> np.ndarray:
        """This rank's sample indices in the order its reader reads them."""
        n = len(self.files)
        if self.train:
            return train_shard(n, self.rank, self.world_size, self.batch_size, self.seed, epoch, start, end,
                               self.repeats)
        return np.arange(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def _replace_undecodable(self, candidates: np.ndarray, error: Exception) -> None:
        """DALI stops its pipeline on a file it cannot decode and does not say which: find the first of
        `candidates` (the batches from the failing one on) that Pillow cannot decode either, name it,
        and put the next decodable file (and its label) in its place, for the rest of the run."""
        from .folder import load_rgb

        for i in candidates.tolist():
            try:
                load_rgb(self.files[i])
                continue
            except RuntimeError as e:
                reason = str(e)
            j = next(k % len(self.files) for k in range(i + 1, i + len(self.files)) if self._decodes(k % len(self.files)))
            lines = str(error).splitlines()
            after = lines[next((i + 1 for i, line in enumerate(lines) if line.strip() == "encountered:"), 0):]
            said = next((line for line in after if line.strip()), lines[-1])
            print(f"[data] WARNING {reason} (DALI: {said.strip()}); replaced by {self.files[j]}", file=sys.stderr,
                  flush=True)
            self.files[i], self.labels[i] = self.files[j], self.labels[j]
            self.decode_failures += 1
            return
        raise DataError(f"DALI could not decode an image of {self.where} that Pillow decodes, so it cannot be "
                        f"named; run `python launch/prepare_data.py verify --root <data.root> --skip-bad` to "
                        f"list and leave out unreadable files. DALI said: {error}")

    def _decodes(self, i: int) -> bool:
        from .folder import load_rgb
        try:
            load_rgb(self.files[i])
            return True
        except RuntimeError:
            return False

    def batches(self, epoch: int, start: int, end: int | None):
        if self.train:
            end = epoch_end(len(self.files), self.micro) if end is None else end
            replay = start if start % self.micro == 0 else 0  # same micro-batch grid: replay to the same RNG state
            start -= replay
        else:
            replay, end = 0, None
        it = self._next.pop((epoch, start, end), None) or self._iterator(epoch, start, end)
        self._next.clear()  # a prepared pipeline for another position is no longer wanted
        skip, handed_on = replay // self.micro, 0
        while True:
            try:
                for out in it:
                    if skip:
                        skip -= 1
                        continue
                    yield out[0]["images"], out[0]["labels"].view(-1).long()
                    handed_on += 1
                break
            except RuntimeError as e:  # an undecodable file: replace it, rebuild, replay to where we were
                if "Critical error in pipeline" not in str(e):
                    raise
                del it
                done = replay // self.micro + handed_on
                self._replace_undecodable(self._rank_order(epoch, start, end)[done * self.batch_size:], e)
                it, skip, handed_on = self._iterator(epoch, start, end), done, 0
                replay = 0
        if self.train:  # the next epoch's pipeline fills its queue while the trainer evaluates
            self._next = {(epoch + 1, 0, end): self._iterator(epoch + 1, 0, end)}
