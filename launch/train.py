"""Train a model: `python launch/train.py --config configs/cs_mixer_l.yaml [section.key=value ...]`.

Runs the same under torchrun / deepspeed (ranks from the environment) and as one plain process.
`--print-config` prints the resolved config and exits without creating anything.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.config import ConfigError, find_config, load_config, plan_batch, resolved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file, or a name from configs/ (cs_mixer_l)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(find_config(args.config), args.overrides)
        plan = plan_batch(cfg, world_size)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(f"# {args.config} resolved for world size {world_size}: lr from the {plan.lr_rule}")
        print(resolved(cfg, world_size).to_yaml(), end="")
        return 0

    from data_pipeline import DataError  # heavy imports only when training
    from trainer.loop import train
    try:
        top1 = train(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"val_top1={top1:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
