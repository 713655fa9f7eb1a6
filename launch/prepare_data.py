"""Prepare datasets in ImageNet's layout (ROOT/{train,val}/<class>/*.JPEG).

    python launch/prepare_data.py digits --out data/digits [--size 32]
"""
from __future__ import annotations

import argparse
import sys

from data_pipeline import write_digits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("digits", help="scikit-learn's bundled 8x8 digits, upscaled to JPEG files")
    digits.add_argument("--out", default="data/digits")
    digits.add_argument("--size", type=int, default=32, help="output side in pixels")
    args = parser.parse_args(argv)
    if args.command == "digits":
        if args.size < 8:
            parser.error(f"--size {args.size}: must be at least 8")
        counts = write_digits(args.out, size=args.size)
        print(f"{args.out}: train {counts['train']} images, val {counts['val']} images, 10 classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
