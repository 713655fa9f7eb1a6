"""Branch a cooldown off a warmup-stable-decay trunk: one trunk, every budget.

    python launch/branch.py runs/trunk --at epoch_100 --cooldown-epochs 20         # a 120-epoch model
    python launch/branch.py runs/trunk --at step_250000 --cooldown-epochs 20 --name trunk-250k
    torchrun --nproc_per_node 8 launch/train.py --config runs/trunk-b100-cd20/branch.yaml   # then run it
    python launch/branch.py runs/trunk --at epoch_100 epoch_200 --cooldown-epochs 20 --submit   # SLURM, one job each

The trunk (schedule.sched=wsd) keeps its checkpoints at the branch points (checkpoint.keep_every_epochs).
The branch is a run of its own: its own run directory (<output_dir>/<name>, default
<trunk>-b<epoch|step>-cd<K>), whose checkpoints/ starts with the trunk's checkpoint at the branch point
(hard links: no copy of the weights), so its first start resumes the trunk's exact state (weights,
optimizer, EMA, data position, RNG), then decays the lr to min_lr over --cooldown-epochs
(schedule.cooldown_shape). Its MLflow run is nested under the trunk's, in the trunk's store (even where that came
from MLFLOW_TRACKING_URI), tagged branch_of and branch_step.
Preemption, resume and export work on it as on any run: run the printed command again. Overrides
(section.key=value) go into the branch's config (schedule.cooldown_shape=linear, ...).

--submit sbatches every branch with the trunk's variant's slurm/<model>.sbatch (--sbatch FILE for another,
--sbatch-args for its options): slurm/launch.sh runs the branch's branch.yaml (CONFIG_FILE) in the branch's
run directory, with its preemption handling; a preempted branch is requeued and resumes, as any job.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


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


@dataclass
class Branch:
    name: str
    dir: Path
    tag: Path           # the trunk's checkpoint it starts from
    meta: dict
    config: object      # the checked RunConfig
    cooldown_steps: int


def plan_branch(trunk: Path, trunk_cfg: dict, at: str, cooldown_epochs: float, name: str | None,
                overrides: list[str]) -> Branch:
    """Every check, nothing created: the branch point, its place in the stable phase, the branch's config."""
    from trainer.checkpoint import check_complete
    from trainer.config import config_from_dict
    from trainer.tracking import run_record

    tag = find_branch_point(trunk, at)
    meta = check_complete(tag)
    sched = trunk_cfg["schedule"]
    state, steps_per_epoch = meta["state"], meta["state"]["epoch_end"] // meta["plan"]["global_batch"]
    trunk_total = trunk_cfg["train"]["epochs"] * steps_per_epoch
    if trunk_cfg["train"].get("max_steps"):
        trunk_total = min(trunk_total, trunk_cfg["train"]["max_steps"])
    trunk_decay = round(sched["cooldown_epochs"] * steps_per_epoch) if sched["cooldown_epochs"] else \
        round(sched["cooldown_fraction"] * trunk_total)
    if state["step"] > trunk_total - trunk_decay:
        raise ValueError(f"{tag} (step {state['step']}) is in the trunk's own decay (from step "
                         f"{trunk_total - trunk_decay}): branch from its stable phase")
    cooldown_steps = round(cooldown_epochs * steps_per_epoch)
    point = at.replace("epoch_", "b").replace("step_", "s")
    name = name or f"{trunk.name}-{point}-cd{cooldown_epochs:g}"
    branch = trunk.parent / name
    if branch.exists():
        raise ValueError(f"{branch} exists: a branch is made once; run its command to resume it, or pick --name")
    end = state["step"] + cooldown_steps
    cfg = dict(trunk_cfg)
    cfg["train"] = {**trunk_cfg["train"], "run_name": name, "output_dir": str(trunk.parent),
                    "epochs": math.ceil(end / steps_per_epoch), "max_steps": end, "resume": "auto",
                    "branch_of": f"{trunk.resolve()}@step_{state['step']}"}
    cfg["schedule"] = {**sched, "cooldown_epochs": cooldown_epochs, "cooldown_fraction": 0.0}
    logged = run_record(trunk)
    trunk_run = state.get("tracking_run_id") or logged.get("run_id")  # the id is filed once the run exists
    # the store the trunk's run is in, even where it came from MLFLOW_TRACKING_URI and not the config: a nested
    # run belongs beside its parent, whatever the environment the branch is started from
    store = {"uri": logged["uri"]} if logged.get("uri") else {}
    cfg["tracking"] = {**trunk_cfg["tracking"], "parent_run_id": trunk_run, **store}
    checked = config_from_dict(cfg, overrides, source=f"{trunk}/config.yaml + the branch")
    return Branch(name, branch, tag, meta, checked, cooldown_steps)


def make_branch(b: Branch) -> None:
    """The branch's run directory: its checkpoints/ starts at the trunk's checkpoint (hard links), its config."""
    checkpoints = b.dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    start = checkpoints / b.tag.name
    shutil.copytree(b.tag, start, copy_function=_link_or_copy)
    branched = {**b.meta, "state": {**b.meta["state"], "tracking_run_id": None}}  # its own MLflow run
    (start / "meta.json").unlink()  # a link to the trunk's file: replaced, never written through
    (start / "meta.json").write_text(json.dumps(branched, indent=1))
    (checkpoints / "latest").write_text(b.tag.name + "\n")  # what the branch's first start resumes
    (b.dir / "branch.yaml").write_text(b.config.to_yaml())


def submit(b: Branch, sbatch: Path, sbatch_args: list[str]) -> str:
    """sbatch the variant's own sbatch file (its allocation, its preemption handling in slurm/launch.sh) with the
    branch's config: slurm/launch.sh runs CONFIG_FILE in place of configs/<config>.yaml, in the branch's run
    directory (RUN_ROOT/RUN_NAME); a requeued job resumes it."""
    env = {**os.environ, "CONFIG_FILE": str((b.dir / "branch.yaml").resolve()),
           "RUN_ROOT": str(b.dir.parent.resolve()), "RUN_NAME": b.name}
    cmd = ["sbatch", "--parsable", f"--job-name={b.name}", *sbatch_args, str(sbatch)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"sbatch failed for {b.name} (exit {r.returncode}): {r.stderr.strip()}\n  "
                           f"CONFIG_FILE={env['CONFIG_FILE']} RUN_ROOT={env['RUN_ROOT']} RUN_NAME={b.name} "
                           f"{shlex.join(cmd)}")
    return r.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trunk", type=Path, help="the trunk's run directory (schedule.sched=wsd)")
    p.add_argument("--at", required=True, nargs="+", metavar="POINT",
                   help="branch point(s): step_N, or epoch_E (the end of E epochs); one branch each")
    p.add_argument("--cooldown-epochs", type=float, required=True, help="the decay to min_lr, in epochs")
    p.add_argument("--name", help="the branch's run name, with one --at point (default <trunk>-b<point>-cd<K>)")
    p.add_argument("--submit", action="store_true",
                   help="sbatch each branch with its variant's slurm/<model>.sbatch (or --sbatch FILE)")
    p.add_argument("--sbatch", type=Path, help="the sbatch file to submit with (default slurm/<model.name>.sbatch)")
    p.add_argument("--sbatch-args", help="extra sbatch options for every branch, one string: \"--nodes=1 ...\"")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)

    import yaml

    from trainer.config import ConfigError

    try:
        if not (args.trunk / "config.yaml").is_file():
            raise ValueError(f"{args.trunk} is not a run directory (no config.yaml)")
        if args.cooldown_epochs <= 0:
            raise ValueError(f"--cooldown-epochs {args.cooldown_epochs}: must be > 0")
        if args.name and len(args.at) > 1:
            raise ValueError(f"--name names one branch; --at gives {len(args.at)}: leave --name out")
        if len(set(args.at)) != len(args.at):
            raise ValueError(f"--at repeats a point: {' '.join(args.at)}")
        trunk_cfg = yaml.safe_load((args.trunk / "config.yaml").read_text())
        if trunk_cfg["schedule"]["sched"] != "wsd":
            raise ValueError(f"{args.trunk} trains with schedule.sched={trunk_cfg['schedule']['sched']}: a cooldown "
                             "branches off the stable phase of a warmup-stable-decay trunk (schedule.sched=wsd)")
        sbatch = None
        if args.submit or args.sbatch:
            sbatch = args.sbatch or REPO / "slurm" / f"{trunk_cfg['model']['name']}.sbatch"
            if not sbatch.is_file():
                raise ValueError(f"no sbatch file {sbatch} for model {trunk_cfg['model']['name']}: give --sbatch FILE")
        branches = [plan_branch(args.trunk, trunk_cfg, at, args.cooldown_epochs, args.name, args.overrides)
                    for at in args.at]
    except (ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    for b in branches:
        make_branch(b)
        state = b.meta["state"]
        print(f"branch {b.dir}: from {b.tag} (step {state['step']}, epoch {state['epoch']}), decay over "
              f"{args.cooldown_epochs:g} epochs ({b.cooldown_steps} steps, {b.config.schedule.cooldown_shape}) to step "
              f"{state['step'] + b.cooldown_steps}")
        if sbatch is None:
            print(f"run it (and again to resume): torchrun --nproc_per_node N launch/train.py --config {b.dir}/branch.yaml")
            continue
        try:
            job = submit(b, sbatch, shlex.split(args.sbatch_args or ""))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"submitted {b.name}: job {job} ({sbatch.relative_to(REPO) if sbatch.is_relative_to(REPO) else sbatch})")
    return 0


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: a copy
        shutil.copy2(src, dst)


if __name__ == "__main__":
    sys.exit(main())
