"""Small real datasets written in ImageNet's layout, ROOT/{train,val}/<class>/*.JPEG, for the
demo and tests: scikit-learn's bundled digits (no download), upscaled to JPEG files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: str | Path, size: int = 32, val_every: int = 5, quality: int = 95) -> dict[str, int]:
    """Write the 1,797 8x8 digits as size x size RGB JPEGs; every `val_every`-th image of each class
    goes to val/. Returns the image count per split. Idempotent: a complete tree is left alone."""
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"digits size={size} val_every={val_every}\n":
        return {s: sum(1 for _ in (root / s).glob("*/*.JPEG")) for s in ("train", "val")}
    counts = {"train": 0, "val": 0}
    seen_per_class: dict[int, int] = {}
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        k = seen_per_class.get(int(label), 0)
        seen_per_class[int(label)] = k + 1
        split = "val" if k % val_every == val_every - 1 else "train"
        out = root / split / f"digit_{label}" / f"{i:05d}.JPEG"
        out.parent.mkdir(parents=True, exist_ok=True)
        pixels = (np.asarray(img) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).convert("RGB").save(out, quality=quality)
        counts[split] += 1
    done.write_text(f"digits size={size} val_every={val_every}\n")
    return counts
