"""One run, many budgets, measured: cosine runs of E/3, 2E/3 and E epochs against one warmup-stable-decay trunk of
E epochs with cooldown branches ending at E/3 and 2E/3 (launch/branch.py), over several seeds; optionally
aug.repeats and distillation from a larger teacher against the plain recipe. Prints the table (val top-1
mean +- sd, n) and writes it as JSON.

    python launch/bench_budgets.py --config cs_mixer_tiny --epochs 30 --cooldown 3 --seeds 0,1,2 \\
        --repeats 3 --out benchmarks/budgets_digits.json
    python launch/bench_budgets.py --epochs 15 --parts distill --teacher cs_mixer_mini --out benchmarks/budgets_digits.json

Each run is `torchrun --nproc_per_node N launch/train.py` (the config's data, here the digits set) in
--runs-dir; val top-1 is the run's last line (val_top1=...), its optimizer steps from its last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(args: argparse.Namespace, *command: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          f"--nproc_per_node={args.nproc}", *command], cwd=REPO, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{out.stderr[-3000:]}")
    print(f"  {' '.join(c for c in command if not c.startswith(('data.', 'tracking.')))}: "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return out.stdout


def train(args: argparse.Namespace, name: str, *overrides: str) -> tuple[float, int]:
    stdout = run(args, str(REPO / "launch/train.py"), "--config", args.config, f"train.output_dir={args.runs_dir}",
                 f"train.run_name={name}", "tracking.enabled=false", *overrides)
    return result(args, name, stdout)


def result(args: argparse.Namespace, name: str, stdout: str) -> tuple[float, int]:
    top1 = float(re.findall(r"val_top1=([\d.]+)", stdout)[-1])
    steps = int(re.findall(r"step (\d+)/\d+ ", stdout)[-1]) if re.search(r"step (\d+)/\d+ ", stdout) else 0
    latest = (args.runs_dir / name / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((args.runs_dir / name / "checkpoints" / latest / "meta.json").read_text())
    return top1, max(steps, meta["state"]["step"])


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 2), "sd": round(statistics.stdev(values), 2) if len(values) > 1
            else 0.0, "n": len(values), "values": values}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cs_mixer_tiny")
    p.add_argument("--epochs", type=int, default=30, help="E: the longest budget (divisible by 3)")
    p.add_argument("--cooldown", type=int, default=3, help="the branches' and the trunk's decay, in epochs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--repeats", type=int, default=0, help="also aug.repeats=R at E epochs against the plain runs")
    p.add_argument("--teacher", help="also distillation at E epochs from this (larger) model, trained here first for "
                                     "E epochs on the same data, against the plain runs")
    p.add_argument("--distill", nargs="*", default=["distill.type=soft", "distill.alpha=0.5", "distill.tau=1"],
                   metavar="KEY=VALUE", help="the students' distill.* settings")
    p.add_argument("--parts", default="budgets,repeats,distill",
                   help="what to run; without budgets, the plain E-epoch runs come from --out's earlier table")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--runs-dir", type=Path, default=Path("runs/budgets"))
    p.add_argument("--out", type=Path, help="write the table as JSON")
    args = p.parse_args(argv)
    args.runs_dir = args.runs_dir.resolve()
    e, c, seeds = args.epochs, args.cooldown, [int(s) for s in args.seeds.split(",")]
    budgets = [e // 3, 2 * e // 3, e]
    if e % 3 or c >= e // 3:
        p.error("--epochs must be divisible by 3 and --cooldown shorter than a third of it")
    parts = set(args.parts.split(","))
    earlier = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    if "budgets" not in parts:
        if not earlier.get("budgets"):
            p.error(f"--parts without budgets needs the plain runs in an earlier --out table ({args.out})")
        budgets = []  # nothing of the budget table runs; its plain E-epoch values are reused
    cosine = {b: [] for b in budgets}
    wsd = {b: [] for b in budgets}
    steps = {"cosine": 0, "wsd": 0}
    repeated = []
    for seed in seeds if budgets else []:
        print(f"seed {seed}", flush=True)
        for b in budgets:
            top1, n = train(args, f"cos{b}-s{seed}", f"train.epochs={b}", f"train.seed={seed}")
            cosine[b].append(top1)
            steps["cosine"] += n if seed == seeds[0] else 0
        trunk = f"wsd{e}-s{seed}"
        top1, n = train(args, trunk, f"train.epochs={e}", f"train.seed={seed}", "schedule.sched=wsd",
                        f"schedule.cooldown_epochs={c}", "checkpoint.keep_every_epochs=1")
        wsd[e].append(top1)
        steps["wsd"] += n if seed == seeds[0] else 0
        for b in budgets[:2]:
            name = f"{trunk}-at{b - c}"
            made = subprocess.run([sys.executable, str(REPO / "launch/branch.py"), str(args.runs_dir / trunk), "--at",
                                   f"epoch_{b - c}", "--cooldown-epochs", str(c), "--name", name],
                                  cwd=REPO, capture_output=True, text=True)
            if made.returncode:
                sys.exit(made.stderr)
            stdout = run(args, str(REPO / "launch/train.py"), "--config", str(args.runs_dir / name / "branch.yaml"))
            top1, n = result(args, name, stdout)
            wsd[b].append(top1)
            spe = n // b
            steps["wsd"] += c * spe if seed == seeds[0] else 0
    for seed in seeds if args.repeats and "repeats" in parts else []:
        repeated.append(train(args, f"rep{args.repeats}-{e}-s{seed}", f"train.epochs={e}", f"train.seed={seed}",
                              f"aug.repeats={args.repeats}")[0])
    distilled, teacher_top1 = [], None
    if args.teacher and "distill" in parts:
        teacher_top1, _ = train(args, f"teacher-{args.teacher}-{e}", f"model.name={args.teacher}", f"train.epochs={e}")
        exported = args.runs_dir / f"teacher-{args.teacher}-{e}.safetensors"
        made = subprocess.run([sys.executable, str(REPO / "launch/export.py"), str(args.runs_dir / f"teacher-{args.teacher}-{e}"),
                               "--out", str(exported)], cwd=REPO, capture_output=True, text=True)
        if made.returncode:
            sys.exit(made.stderr)
        for seed in seeds:
            distilled.append(train(args, f"distill-{args.teacher}-{e}-s{seed}", f"train.epochs={e}", f"train.seed={seed}",
                                   f"distill.teacher={exported}", *args.distill)[0])
    if not budgets:
        plain = earlier["budgets"][str(e)]["cosine"]
        print(f"plain {e}-epoch runs from {args.out}: {plain['mean']:.2f} +- {plain['sd']:.2f} (n={plain['n']})")
        table = {**earlier}
        cosine[e] = plain["values"]
    else:
        table = {"config": args.config, "epochs": e, "cooldown_epochs": c, "seeds": seeds, "nproc": args.nproc,
                 "budgets": {str(b): {"cosine": spread(cosine[b]), "wsd": spread(wsd[b])} for b in budgets},
                 "optimizer_steps_per_seed": steps,
                 "wsd_share_of_cosine_steps": round(steps["wsd"] / steps["cosine"], 3)}
    if distilled:
        table["distillation"] = {"teacher": args.teacher, "teacher_top1": teacher_top1, "settings": args.distill,
                                 "plain": spread(cosine[e]), "distilled": spread(distilled)}
        print(f"distillation from {args.teacher} ({teacher_top1:.2f} top-1, {e} epochs) at {e} epochs: "
              f"{spread(distilled)['mean']:.2f} +- {spread(distilled)['sd']:.2f} vs plain "
              f"{spread(cosine[e])['mean']:.2f} +- {spread(cosine[e])['sd']:.2f}")
    if not budgets:
        if args.out:
            args.out.write_text(json.dumps(table, indent=1))
        return 0
    print(f"\n{args.config}, {len(seeds)} seeds, val top-1 mean +- sd:")
    print(f"{'epochs':>7} {'cosine (its own run)':>22} {'wsd (trunk / branch)':>22}")
    for b in budgets:
        co, ws = table["budgets"][str(b)]["cosine"], table["budgets"][str(b)]["wsd"]
        print(f"{b:>7} {co['mean']:>14.2f} +- {co['sd']:<5.2f} {ws['mean']:>14.2f} +- {ws['sd']:<5.2f}")
    print(f"optimizer steps per seed: cosine {steps['cosine']}, wsd trunk + branches {steps['wsd']} "
          f"({100 * table['wsd_share_of_cosine_steps']:.0f} %)")
    if repeated:
        plain, rep = spread(cosine[e]), spread(repeated)
        table["repeats"] = {"plain": plain, f"aug.repeats={args.repeats}": rep}
        print(f"aug.repeats={args.repeats} at {e} epochs: {rep['mean']:.2f} +- {rep['sd']:.2f} vs plain "
              f"{plain['mean']:.2f} +- {plain['sd']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
