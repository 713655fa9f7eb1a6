"""Dataset preparation, shared by `launch/prepare_data.py` and the benchmarks.

Small real datasets in ImageNet's layout, ROOT/{train,val}/<class>/*.JPEG (the digits demo set,
synthetic JPEGs), image verification with the file lists the folder and DALI backends read, and
FFCV .beton files. Outputs are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .folder import check_same_classes, filelist_path, load_rgb, scan_split

SPLITS = ("train", "val")


class PrepareError(ValueError):
    """The tree cannot be prepared as asked; the message lists the paths."""


def _check(path: str) -> str | None:
    try:
        img = load_rgb(path)
        img.load()
        return None
    except RuntimeError as e:
        return str(e)


def verified_samples(root: Path, workers: int, skip_bad: bool) -> dict[str, tuple[list, list[str]]]:
    """Scan and decode every image of both splits; fail on a bad file unless skip_bad."""
    out = {}
    for split in SPLITS:
        out[split] = scan_split(root, split, use_filelist=False)  # the folders, not an older list
    check_same_classes(root, out["train"][1], out["val"][1])
    for split, (samples, classes) in out.items():
        with Pool(workers) as pool:
            errors = list(tqdm(pool.imap(_check, [p for p, _ in samples], chunksize=64), total=len(samples),
                               desc=f"verify {split}", unit="img", mininterval=1.0))
        bad = [e for e in errors if e]
        if bad and not skip_bad:
            listing = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
            raise PrepareError(f"{len(bad)} unreadable image(s) in {root}/{split}:\n  {listing}\n"
                             "fix or remove them, or re-run with --skip-bad to leave them out")
        if bad:
            print(f"[{split}] skipped {len(bad)} unreadable image(s):", *bad[:20], sep="\n  ")
        kept = [s for s, e in zip(samples, errors) if not e]
        out[split] = (kept, classes)
        counts = Counter(label for _, label in kept)
        print(f"[{split}] {len(kept)} images in {len(classes)} classes; {class_summary(counts, classes)}")
        empty = [c for i, c in enumerate(classes) if counts[i] == 0]
        if empty:
            raise PrepareError(f"class folder(s) with no readable image in {root}/{split}: {empty[:10]}")
    return out


def class_summary(counts: Counter, classes: list[str], shown: int = 3) -> str:
    """Images per class in one short line (ImageNet's 1,000 classes listed one by one made a 15 KB line):
    min, median and max, the classes at the extremes, and how many classes hold under half the median."""
    per_class = sorted((counts[i], c) for i, c in enumerate(classes))
    values = [n for n, _ in per_class]
    median = values[(len(values) - 1) // 2]
    low = [f"{c} {n}" for n, c in per_class[:shown]]
    high = [f"{c} {n}" for n, c in per_class[-shown:][::-1]]
    small = sum(1 for n in values if n < median / 2)
    return (f"per class: min {values[0]}, median {median}, max {values[-1]} (fewest: {', '.join(low)}; most: "
            f"{', '.join(high)}){f'; {small} class(es) under half the median' if small else ''}")


def write_atomically(path: Path, write) -> None:
    """write(tmp_path), then rename: the final name exists only once the file is complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink()
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_filelists(root: Path, samples: dict[str, tuple[list, list[str]]]) -> None:
    for split, (items, _) in samples.items():
        lines = "".join(f"{Path(p).relative_to(root)} {label}\n" for p, label in items)
        write_atomically(filelist_path(root, split), lambda tmp, lines=lines: tmp.write_text(lines))


class _RgbSamples:
    """What FFCV's writer reads: (RGB image, label) by index."""

    def __init__(self, items: list[tuple[str, int]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return load_rgb(path), label


def write_ffcv(samples, out: Path, max_side: int, quality: int, compress_fraction: float, workers: int) -> None:
    from .ffcv_source import torch_threads_kept
    with torch_threads_kept():
        from ffcv.fields import IntField, RGBImageField
        from ffcv.writer import DatasetWriter

    out.mkdir(parents=True, exist_ok=True)
    for split, (items, _) in samples.items():
        fields = {"image": RGBImageField(write_mode="proportion", max_resolution=max_side,
                                         compress_probability=compress_fraction, jpeg_quality=quality),
                  "label": IntField()}
        write_atomically(out / f"{split}.beton", lambda tmp, fields=fields, items=items: DatasetWriter(
            str(tmp), fields, num_workers=workers).from_indexed_dataset(_RgbSamples(items)))
        print(f"[{split}] wrote {out / f'{split}.beton'} ({(out / f'{split}.beton').stat().st_size / 2**20:.1f} MiB, "
              f"{len(items)} images)")


def _synthetic_image(args: tuple[str, int, int, int, int]) -> None:
    """A smooth random picture with a class-specific tint: compresses like a photo, not like noise."""
    path, width, height, label, seed = args
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(img, dtype=np.float32)
    pixels = 0.7 * pixels + 0.3 * np.array([(label * 67) % 256, (label * 131) % 256, (label * 199) % 256])
    pixels += rng.normal(0, 8, pixels.shape)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_synthetic(out: Path, count: int, classes: int, width: int, height: int, val_fraction: float,
                    seed: int, workers: int) -> dict[str, int]:
    jobs, counts = [], {"train": 0, "val": 0}
    n_val = round(count * val_fraction)
    for i in range(count):
        split = "val" if i < n_val else "train"
        label = i % classes
        path = out / split / f"class_{label:03d}" / f"img_{i:06d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), width, height, label, seed * 1_000_003 + i))
        counts[split] += 1
    with Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(_synthetic_image, jobs, chunksize=16), total=len(jobs),
                      desc="synthetic", unit="img", mininterval=1.0):
            pass
    return counts



SHAPES = ("ring", "plus", "cross")  # o, +, x: strokes like the digits', new classes


def write_shapes(root: str | Path, size: int = 32, train_per_class: int = 40, val_per_class: int = 100,
                 seed: int = 0, quality: int = 95) -> dict[str, int]:
    """A small 3-class set for fine-tuning demos: light strokes on a dark noisy background, drawn like the
    digits set but new classes: rings, plus signs and crosses (random size, position, stroke width,
    +-15 degree tilt, brightness). Few train images on purpose: where pretraining pays.
    Idempotent: a complete tree is left alone."""
    from PIL import ImageDraw

    root = Path(root)
    done = root / ".complete"
    stamp = f"shapes {','.join(SHAPES)} size={size} train={train_per_class} val={val_per_class} seed={seed}\n"
    if done.is_file() and done.read_text() == stamp:
        return {s: sum(1 for _ in (root / s).glob("*/*.JPEG")) for s in ("train", "val")}
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    big = size * 4  # drawn large, then downsampled: smooth edges
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for shape in SHAPES:
            out_dir = root / split / shape
            out_dir.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = Image.new("L", (big, big), 0)
                draw = ImageDraw.Draw(img)
                r = rng.uniform(0.2, 0.4) * big
                cx, cy = rng.uniform(r, big - r, size=2)
                width = int(rng.integers(big // 20, big // 9))
                if shape == "ring":
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=width)
                else:
                    tilt = np.deg2rad(rng.uniform(-15, 15) + (45 if shape == "cross" else 0))
                    for a in (tilt, tilt + np.pi / 2):
                        dx, dy = r * np.cos(a), r * np.sin(a)
                        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
                pixels = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32)
                pixels = (pixels * rng.uniform(0.6, 1.0) + rng.normal(0, 12, pixels.shape)).clip(0, 255)
                out = out_dir / f"{shape}_{split}_{i:04d}.JPEG"
                Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB").save(out, quality=quality)
                counts[split] += 1
    done.write_text(stamp)
    return counts


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


DIGITS_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression")


def write_digits_suite(digits_root: str | Path, out: str | Path, seed: int = 0) -> dict[str, int]:
    """The evaluation suite's layouts built from the digits val images, to try `evaluate.py --suite` without the
    public archives: val/ (with real.json), imagenetv2-matched-frequency/ (the val images, folders 0..9),
    sketch/ (edge maps), imagenet-a/ (4 classes, rotated 30 degrees), imagenet-r/ (4 classes, inverted) and
    imagenet-c/<corruption>/<1-5>/ (4 corruptions at five severities). Returns images per benchmark."""
    from PIL import ImageFilter, ImageOps

    digits_root, out = Path(digits_root), Path(out)
    samples, classes = scan_split(digits_root, "val", use_filelist=False)
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}

    def save(img: Image.Image, path: Path, quality: int = 95) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=quality)

    def corrupt(img: Image.Image, corruption: str, severity: int) -> tuple[Image.Image, int]:
        if corruption == "gaussian_noise":
            x = np.asarray(img, np.float32) + rng.normal(0, 12 * severity, (img.height, img.width, 3))
            return Image.fromarray(x.clip(0, 255).astype(np.uint8)), 95
        if corruption == "defocus_blur":
            return img.filter(ImageFilter.GaussianBlur(0.4 * severity)), 95
        if corruption == "contrast":
            x = np.asarray(img, np.float32)
            return Image.fromarray(((x - x.mean()) * (1 - 0.18 * severity) + x.mean()).clip(0, 255).astype(np.uint8)), 95
        return img, (30, 18, 12, 8, 5)[severity - 1]  # jpeg_compression: the quality

    real = []
    for n, (path, label) in enumerate(samples, 1):
        img, wnid = load_rgb(path), classes[label]
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        save(img, out / "val" / wnid / name)
        real.append([label])
        save(img, out / "imagenetv2-matched-frequency" / str(label) / f"{n}.jpeg")
        save(ImageOps.invert(img.filter(ImageFilter.FIND_EDGES)), out / "sketch" / wnid / name)
        if label % 3 == 0:  # A and R hold a subset of the classes, as the real ones hold 200 of 1,000
            save(img.rotate(30, resample=Image.BICUBIC), out / "imagenet-a" / wnid / name)
            save(ImageOps.invert(img), out / "imagenet-r" / wnid / name)
        for corruption in DIGITS_CORRUPTIONS:
            for severity in range(1, 6):
                corrupted, quality = corrupt(img, corruption, severity)
                save(corrupted, out / "imagenet-c" / corruption / str(severity) / wnid / name, quality)
    (out / "real.json").write_text(json.dumps(real))
    for sub in ("val", "imagenetv2-matched-frequency", "sketch", "imagenet-a", "imagenet-r", "imagenet-c"):
        counts[sub] = sum(1 for _ in (out / sub).rglob("*.*"))
    return counts
