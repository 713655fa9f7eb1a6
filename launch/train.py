"""Train a model: `python launch/train.py --config configs/cs_mixer_l.yaml [section.key=value ...]`.

Runs the same under `deepspeed --num_gpus N`, `torchrun --nproc_per_node N`, `srun` (ranks from the
SLURM variables) and as one plain process. `--print-config` prints the resolved config, `--dry-run`
the run's plan (world size, batches, lr, ZeRO stage), and both exit without creating anything.
Every rule is checked on the merged config (YAML, overrides, the DeepSpeed JSON) before a rank starts.
Exit codes: 0 done, 2 bad input, 3 non-finite loss after train.max_rollbacks reloads, 4 the
replicated weights differ between ranks (silent corruption; not saved), 85 stopped by a signal after
writing a checkpoint, 86 a rank hung (trainer/watchdog.py): for both, requeue and run the same
command to resume; 87 a node failed the pre-flight check (trainer/preflight.py): exclude the nodes
in <run dir>/exclude_nodes and requeue.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.config import ConfigError, find_config, load_config, plan_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file, or a name from configs/ (cs_mixer_l)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the run's plan and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_intermixed_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    try:
        cfg = load_config(find_config(args.config), args.overrides)
        # every rule, on the merged config, before anything starts
        run = plan_run(cfg, world_size, check_data=not (args.print_config or args.dry_run))
        plan = run.batch
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(f"# {args.config} resolved for world size {world_size}: lr from the {plan.lr_rule}")
        print(run.cfg.to_yaml(), end="")
        return 0
    if args.dry_run:
        print(f"[plan] {cfg.model.name}: world size {world_size}; batch {plan.batch_size}/rank x accum "
              f"{plan.grad_accum} x {world_size} ranks = global {plan.global_batch}; {cfg.train.epochs} epochs"
              f"{f', max_steps {cfg.train.max_steps}' if cfg.train.max_steps else ''}; lr {plan.lr:g} "
              f"({plan.lr_rule}); ZeRO stage {run.zero_stage}; {run.dtype}; "
              f"data {cfg.data.backend} at {cfg.data.root}; output {cfg.train.output_dir}")
        return 0

    from data_pipeline import DataError  # heavy imports only when training
    from trainer.checkpoint import CheckpointError
    from trainer.distributed import shutdown
    from trainer.preflight import EXIT_BAD_NODE, BadNode
    from trainer.tracking import TrackingAccessDenied
    from trainer.trainer import EXIT_CORRUPT, EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteLoss, ReplicaMismatch, train
    try:
        result = train(cfg)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, TrackingAccessDenied) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except (ReplicaMismatch, BadNode) as e:  # every rank agrees: leave the process group in order
        print(f"error: {e}", file=sys.stderr)
        shutdown()
        return EXIT_CORRUPT if isinstance(e, ReplicaMismatch) else EXIT_BAD_NODE
    shutdown()
    if result.preempted:
        return EXIT_PREEMPTED
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"val_top1={result.top1:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
