"""Export a DeepSpeed checkpoint (any ZeRO stage) to one safetensors file loadable without DeepSpeed:

    python launch/export.py runs/cs_mixer_l-1234            # the run's latest checkpoint
    python launch/export.py runs/x/checkpoints/step_00050000 --ema --out cs_mixer_l_ema.safetensors

    model = models.create_model("cs_mixer_l", checkpoint_path="cs_mixer_l_ema.safetensors")

The file's header names the model, its num_classes/img_size, the step and the source checkpoint.
Weights are the fp32 master copy (gathered from the ZeRO partitions), or the EMA with --ema.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointError, export, find_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a run directory, its checkpoints/ directory, or a step_N directory")
    p.add_argument("--out", type=Path, help="output file (default: <run dir>/exported/<model>-<step>.safetensors)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs with train.model_ema=true)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args(argv)
    try:
        tag_dir = find_checkpoint(args.checkpoint)
        out = export(tag_dir, args.out, args.ema, torch.float32 if args.dtype == "fp32" else torch.bfloat16)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {tag_dir} ({'EMA' if args.ema else 'model'} weights, {args.dtype}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
