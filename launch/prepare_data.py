"""Prepare datasets in ImageNet's layout (ROOT/{train,val}/<class>/*.JPEG) for every backend.

    python launch/prepare_data.py digits    --out data/digits            # demo set, no download
    python launch/prepare_data.py shapes    --out data/shapes            # 3 classes, for the fine-tuning demo
    python launch/prepare_data.py digits-suite --from data/digits --out data/digits-suite  # evaluate.py --suite demo
    python launch/prepare_data.py synthetic --out /tmp/jpegs --count 2000  # JPEGs of a chosen size
    python launch/prepare_data.py verify    --root /data/imagenet [--skip-bad]
    python launch/prepare_data.py ffcv      --root /data/imagenet --out /data/imagenet-ffcv

`verify` decodes every image, reports counts per split and class, and writes the file lists
(ROOT/{split}_filelist.txt) that the folder and DALI backends read; an unreadable file stops it
with the file's path, unless --skip-bad (then it is left out and counted). `ffcv` does the same
check, then writes train.beton and val.beton (FFCV's ImageNet settings by default). Outputs are
written under a temporary name and renamed when complete: an interrupted run leaves no corrupt
file behind and can simply be re-run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_pipeline.folder import filelist_path
from data_pipeline.prepare import (
    PrepareError,
    verified_samples,
    write_digits,
    write_digits_suite,
    write_ffcv,
    write_filelists,
    write_shapes,
    write_synthetic,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("digits", help="scikit-learn's bundled 8x8 digits, upscaled to JPEG files")
    p.add_argument("--out", default="data/digits")
    p.add_argument("--size", type=int, default=32, help="output side in pixels")
    p = sub.add_parser("digits-suite", help="the evaluation suite's layouts (V2, Sketch, A, R, C) made from the "
                       "digits val images, for evaluate.py --suite")
    p.add_argument("--from", dest="source", default="data/digits", help="the digits tree (prepare_data.py digits)")
    p.add_argument("--out", default="data/digits-suite")
    p = sub.add_parser("shapes", help="circles, squares, triangles (3 classes, few train images): fine-tuning demo")
    p.add_argument("--out", default="data/shapes")
    p.add_argument("--size", type=int, default=32, help="output side in pixels")
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=100)
    p = sub.add_parser("synthetic", help="random smooth JPEGs of a chosen size and count")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    for name, help_ in (("verify", "decode every image; write the file lists the folder and DALI backends read"),
                        ("ffcv", "verify, then write train.beton and val.beton")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--root", required=True, help="ImageNet-layout tree: ROOT/{train,val}/<class>/*")
        p.add_argument("--skip-bad", action="store_true", help="leave unreadable images out (counted) instead of failing")
        if name == "ffcv":
            p.add_argument("--out", help="folder for the .beton files (default: ROOT)")
            p.add_argument("--max-side", type=int, default=500, help="longest side stored (FFCV ImageNet: 500)")
            p.add_argument("--jpeg-quality", type=int, default=90, help="(FFCV ImageNet: 90)")
            p.add_argument("--compress-fraction", type=float, default=0.5,
                           help="fraction stored as JPEG, the rest raw (FFCV ImageNet: 0.5)")
    for p in sub.choices.values():
        p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    if args.command == "digits":
        if args.size < 8:
            parser.error(f"--size {args.size}: must be at least 8")
        counts = write_digits(args.out, size=args.size)
        print(f"{args.out}: train {counts['train']} images, val {counts['val']} images, 10 classes")
    elif args.command == "digits-suite":
        if not (Path(args.source) / "val").is_dir():
            print(f"error: {args.source}/val does not exist: run prepare_data.py digits --out {args.source} first",
                  file=sys.stderr)
            return 2
        counts = write_digits_suite(args.source, args.out)
        print(f"{args.out}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
    elif args.command == "shapes":
        if args.size < 8 or args.train_per_class < 1 or args.val_per_class < 1:
            parser.error("--size >= 8, --train-per-class >= 1 and --val-per-class >= 1 are required")
        counts = write_shapes(args.out, args.size, args.train_per_class, args.val_per_class)
        print(f"{args.out}: train {counts['train']} images, val {counts['val']} images, 3 classes")
    elif args.command == "synthetic":
        if args.count < 2 or args.classes < 1 or not 0 < args.val_fraction < 1:
            parser.error("--count >= 2, --classes >= 1 and 0 < --val-fraction < 1 are required")
        counts = write_synthetic(Path(args.out), args.count, args.classes, args.width, args.height,
                                 args.val_fraction, args.seed, args.workers)
        print(f"{args.out}: train {counts['train']} images, val {counts['val']} images, {args.classes} classes, "
              f"{args.width}x{args.height}")
    else:
        root = Path(args.root)
        try:
            samples = verified_samples(root, args.workers, args.skip_bad)
        except (FileNotFoundError, PrepareError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.command == "verify":
            write_filelists(root, samples)
            print(f"wrote {filelist_path(root, 'train')} and {filelist_path(root, 'val')}")
        else:
            if not 0 <= args.compress_fraction <= 1 or not 1 <= args.jpeg_quality <= 100:
                parser.error("--compress-fraction must be in [0, 1] and --jpeg-quality in [1, 100]")
            write_ffcv(samples, Path(args.out or root), args.max_side, args.jpeg_quality,
                       args.compress_fraction, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
