"""Branch a cooldown off a warmup-stable-decay trunk: one trunk, every budget.

    python launch/branch.py runs/trunk --at epoch_100 --cooldown-epochs 20         # a 120-epoch model
    python launch/branch.py runs/trunk --at step_250000 --cooldown-epochs 20 --name trunk-250k
    torchrun --nproc_per_node 8 launch/train.py --config runs/trunk-b100-cd20/branch.yaml   # then run it

The trunk (schedule.sched=wsd) keeps its checkpoints at the branch points (checkpoint.keep_every_epochs).
The branch is a run of its own: its own run directory (<output_dir>/<name>, default
<trunk>-b<epoch|step>-cd<K>), whose checkpoints/ starts with the trunk's checkpoint at the branch point
(hard links: no copy of the weights), so its first start resumes the trunk's exact state (weights,
optimizer, EMA, data position, RNG), then decays the lr to min_lr over --cooldown-epochs
(schedule.cooldown_shape). Its MLflow run is nested under the trunk's, tagged branch_of and branch_step.
Preemption, resume and export work on it as on any run: run the printed command again. Overrides
(section.key=value) go into the branch's config (schedule.cooldown_shape=linear, ...).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path


def find_branch_point(trunk: Path, at: str) -> Path:
    """The trunk's checkpoint at `step_N`, or at the end of `epoch_E` (E epochs done)."""
    from trainer.checkpoint import check_complete

    match = re.fullmatch(r"(step|epoch)_(\d+)", at)
    if not match:
        raise ValueError(f"--at {at!r}: expected step_N or epoch_E")
    kind, value = match[1], int(match[2])
    found = {}
    for tag in sorted((trunk / "checkpoints").glob("step_*")):
        try:
            state = check_complete(tag)["state"]
        except Exception:  # an incomplete checkpoint (a save cut short) is no branch point
            continue
        found[tag] = state
        if (kind == "step" and state["step"] == value) or \
                (kind == "epoch" and state["epoch"] == value and state["epoch_sample"] == 0):
            return tag
    have = ", ".join(f"step_{s['step']} (epoch {s['epoch']}{'' if s['epoch_sample'] == 0 else ' +'})"
                     for s in found.values()) or "none"
    raise ValueError(f"{trunk}/checkpoints has no complete checkpoint at {at}; it has: {have}. Keep the branch "
                     "points on the trunk with checkpoint.keep_every_epochs (or checkpoint.every_steps)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trunk", type=Path, help="the trunk's run directory (schedule.sched=wsd)")
    p.add_argument("--at", required=True, help="the branch point: step_N, or epoch_E (the end of E epochs)")
    p.add_argument("--cooldown-epochs", type=float, required=True, help="the decay to min_lr, in epochs")
    p.add_argument("--name", help="the branch's run name (default <trunk>-b<point>-cd<K>)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)

    import yaml

    from trainer.checkpoint import check_complete
    from trainer.config import ConfigError, config_from_dict

    try:
        if not (args.trunk / "config.yaml").is_file():
            raise ValueError(f"{args.trunk} is not a run directory (no config.yaml)")
        if args.cooldown_epochs <= 0:
            raise ValueError(f"--cooldown-epochs {args.cooldown_epochs}: must be > 0")
        tag = find_branch_point(args.trunk, args.at)
        meta = check_complete(tag)
        trunk_cfg = yaml.safe_load((args.trunk / "config.yaml").read_text())
        sched = trunk_cfg["schedule"]
        if sched["sched"] != "wsd":
            raise ValueError(f"{args.trunk} trains with schedule.sched={sched['sched']}: a cooldown branches off the "
                             "stable phase of a warmup-stable-decay trunk (schedule.sched=wsd)")
        state, steps_per_epoch = meta["state"], meta["state"]["epoch_end"] // meta["plan"]["global_batch"]
        trunk_total = trunk_cfg["train"]["epochs"] * steps_per_epoch
        if trunk_cfg["train"].get("max_steps"):
            trunk_total = min(trunk_total, trunk_cfg["train"]["max_steps"])
        trunk_decay = round(sched["cooldown_epochs"] * steps_per_epoch) if sched["cooldown_epochs"] else \
            round(sched["cooldown_fraction"] * trunk_total)
        if state["step"] > trunk_total - trunk_decay:
            raise ValueError(f"{tag} (step {state['step']}) is in the trunk's own decay (from step "
                             f"{trunk_total - trunk_decay}): branch from its stable phase")
        cooldown_steps = round(args.cooldown_epochs * steps_per_epoch)
        point = args.at.replace("epoch_", "b").replace("step_", "s")
        name = args.name or f"{args.trunk.name}-{point}-cd{args.cooldown_epochs:g}"
        branch = args.trunk.parent / name
        if branch.exists():
            raise ValueError(f"{branch} exists: a branch is made once; run its command to resume it, or pick --name")
        end = state["step"] + cooldown_steps
        cfg = dict(trunk_cfg)
        cfg["train"] = {**trunk_cfg["train"], "run_name": name, "output_dir": str(args.trunk.parent),
                        "epochs": math.ceil(end / steps_per_epoch), "max_steps": end, "resume": "auto",
                        "branch_of": f"{args.trunk.resolve()}@step_{state['step']}"}
        cfg["schedule"] = {**sched, "cooldown_epochs": args.cooldown_epochs, "cooldown_fraction": 0.0}
        from trainer.tracking import run_id_of
        trunk_run = state.get("tracking_run_id") or run_id_of(args.trunk)  # the id is filed once the run exists
        cfg["tracking"] = {**trunk_cfg["tracking"], "parent_run_id": trunk_run}
        checked = config_from_dict(cfg, args.overrides, source=f"{args.trunk}/config.yaml + the branch")
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    checkpoints = branch / "checkpoints"
    checkpoints.mkdir(parents=True)
    start = checkpoints / tag.name
    shutil.copytree(tag, start, copy_function=_link_or_copy)
    branched = {**meta, "state": {**meta["state"], "tracking_run_id": None}}  # its own MLflow run, not the trunk's
    (start / "meta.json").unlink()  # a link to the trunk's file: replaced, never written through
    (start / "meta.json").write_text(json.dumps(branched, indent=1))
    (checkpoints / "latest").write_text(tag.name + "\n")  # what the branch's first start resumes
    (branch / "branch.yaml").write_text(checked.to_yaml())
    print(f"branch {branch}: from {tag} (step {state['step']}, epoch {state['epoch']}), decay over "
          f"{args.cooldown_epochs:g} epochs ({cooldown_steps} steps, {checked.schedule.cooldown_shape}) to step {end}")
    print(f"run it (and again to resume): torchrun --nproc_per_node N launch/train.py --config {branch}/branch.yaml")
    return 0


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: a copy
        shutil.copy2(src, dst)


if __name__ == "__main__":
    sys.exit(main())
