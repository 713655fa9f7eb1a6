"""What the model sees: image grids of augmented training batches, and the statistics of the
augmentation stage's own draws (launch/preview_augment.py; the trainer logs the first batch's grid)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .augment import DrawRecorder


def grid_image(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], columns: int = 8,
               pad: int = 2) -> Image.Image:
    """A normalised float batch (B, 3, H, W) back to pixels, tiled `columns` wide on a white ground."""
    x = images.detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    x = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    b, h, w, _ = x.shape
    cols = min(columns, b)
    rows = -(-b // cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    return Image.fromarray(canvas)


def sample_grids(loader, count: int, mean, std, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Two PNGs of the first `count` training samples of epoch 0 through the loader's own stage:
    after augmentation (auto-augment, erasing; Mixup/CutMix off), and the same draws with Mixup/CutMix."""
    stage = loader.stage
    images, labels = next(iter(loader.source.batches(0, 0, None)))
    images, labels = images[:count].to(loader.device), labels[:count].to(loader.device)
    if images.shape[0] % 2:  # Mixup/CutMix pair the batch with its reverse: an even count
        images, labels = images[:-1], labels[:-1]
    seed = 12345
    paths = []
    for name, mixing in (("augment", False), ("mixed", True)):
        stage.set_mixup_enabled(mixing)
        x, _ = stage(images, labels, seed)  # the same seed: the same draws, mixing on or off
        path = out_dir / f"{stem}_{name}.png"
        grid_image(x, mean, std).save(path)
        paths.append(path)
    stage.set_mixup_enabled(True)
    return paths[0], paths[1]


def draw_statistics(loader, images: int) -> dict:
    """Run the loader (epoch after epoch) until its stage has drawn for `images` samples; the
    statistics of those draws (DrawRecorder.summary)."""
    recorder = DrawRecorder()
    loader.stage.record(recorder)
    try:
        loader.set_window(0)
        while recorder.images < images:
            for _ in loader:
                if recorder.images >= images:
                    break
    finally:
        loader.stage.record(None)
    return recorder.summary()
