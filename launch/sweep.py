"""Sweeps as SLURM job arrays, one MLflow parent run per sweep.

    python launch/sweep.py submit --config cs_mixer_tiny [--config s2mlpv2_tiny ...] \\
        --grid optim.lr_base=5e-4,1e-3 train.seed=0,1 [--set data.root=data/digits ...] \\
        [--name NAME] [--sbatch-args "--nodes=1 --time=02:00:00"] [--max-parallel N] [--dry-run]
    python launch/sweep.py status SWEEP [--uri URI]

`submit` takes the cartesian product of the --grid values and submits, per --config, one job array of
that variant's own slurm/<config>.sbatch (its allocation, its preemption handling in slurm/launch.sh):
one array task per grid point. Every task's MLflow run is nested under one parent run (MLflow's
`mlflow.parentRunId` tag), which holds the grid, the configs and sweep.json (the plan). A task's run
name is <sweep>-<config>-<task>; a requeued task resumes its own run directory and MLflow run.
Every grid point is checked (config keys, values, the batch plan at the sbatch allocation's world size)
before anything is submitted. --dry-run prints the plan and the sbatch commands and submits nothing.

The store is --uri, else $MLFLOW_TRACKING_URI, else the config's tracking.uri, else the local SQLite
store $RUN_ROOT/mlflow.db that the tasks would use anyway; every task is pointed at the same one.
A campaign of many tasks starting at once is better served by a tracking server (`mlflow server`).

`status` prints, from MLflow, one line per task: overrides, state, epoch, best val top-1 (and EMA
top-1), restarts; tasks still pending in SLURM show as such. SWEEP is the sweep's name or the parent
run's id. When every task has ended it closes the parent run (FINISHED, or FAILED if a task failed).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.config import ConfigError, find_config, load_config, plan_run  # noqa: E402
from trainer.tracking import default_uri, local_artifact_root, store_lock  # noqa: E402

SWEEP_ROLE_TAG = "sweep.role"  # "parent" on the sweep's own run
SWEEP_NAME_TAG = "sweep.name"
TERMINAL = {"FINISHED", "FAILED", "KILLED"}


@dataclass
class Task:
    config: str
    index: int          # SLURM_ARRAY_TASK_ID
    overrides: list[str]  # this grid point's section.key=value
    run_name: str


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z_]+\.[a-z_0-9]+", key.strip()):
            raise ConfigError(f"--grid {item!r}: expected section.key=value1,value2,... (e.g. optim.lr_base=5e-4,1e-3)")
        if key in grid:
            raise ConfigError(f"--grid names {key} twice: give all its values in one --grid {key}=a,b")
        vals = [v.strip() for v in values.split(",")]
        if not all(vals):
            raise ConfigError(f"--grid {item!r}: an empty value (stray comma?)")
        if len(set(vals)) != len(vals):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        grid[key.strip()] = vals
    return grid


def sbatch_world_size(sbatch: Path, extra_args: list[str]) -> int:
    """Ranks the array task will get: --nodes x --ntasks-per-node (or --ntasks) from the sbatch header,
    with --sbatch-args applied over it, as sbatch does."""
    opts: dict[str, str] = {}
    header = [m.group(1) for line in sbatch.read_text().splitlines() if (m := re.match(r"#SBATCH\s+(\S+)", line))]
    for arg in header + extra_args:
        m = re.fullmatch(r"--(nodes|ntasks-per-node|ntasks)=(\d+)(?:-\d+)?", arg) or \
            re.fullmatch(r"-(N|n)(\d+)", arg)
        if m:
            opts[{"N": "nodes", "n": "ntasks"}.get(m.group(1), m.group(1))] = m.group(2)
    if "ntasks" in opts:
        return int(opts["ntasks"])
    return int(opts.get("nodes", 1)) * int(opts.get("ntasks-per-node", 1))


def plan_tasks(name: str, configs: list[str], grid: dict[str, list[str]], fixed: list[str],
               sbatch_args: list[str]) -> tuple[list[Task], dict[str, int], list[str]]:
    """Every task, checked; the world size per config; the configs' MLflow experiments."""
    keys = list(grid)
    points = [list(zip(keys, values)) for values in itertools.product(*grid.values())] if grid else [[]]
    tasks, worlds, experiments, seen = [], {}, [], {}
    for config in configs:
        sbatch = REPO / "slurm" / f"{config}.sbatch"
        if not sbatch.is_file():
            known = sorted(p.stem for p in (REPO / "slurm").glob("*.sbatch"))
            raise ConfigError(f"--config {config}: no slurm/{config}.sbatch to submit (sweeps run the variants' "
                              f"sbatch files: {', '.join(known)})")
        worlds[config] = sbatch_world_size(sbatch, sbatch_args)
        for i, point in enumerate(points):
            overrides = [f"{k}={v}" for k, v in point]
            try:
                cfg = load_config(find_config(config), [*fixed, *overrides])
                resolved = plan_run(cfg, worlds[config], check_data=False).cfg.to_dict()
                for key in ("lr_base", "lr_base_size"):  # folded into the resolved optim.lr
                    del resolved["optim"][key]
                resolved = json.dumps(resolved, sort_keys=True)
            except ConfigError as e:
                raise ConfigError(f"{config} task {i} ({' '.join(overrides) or 'no grid'}): {e}") from None
            if resolved in seen:  # e.g. optim.lr_base swept while the config pins optim.lr
                raise ConfigError(f"{config}: grid points {seen[resolved]} and {i} ({' '.join(overrides)}) resolve to "
                                  "the same run: a swept value has no effect (python launch/train.py --config "
                                  f"{config} --print-config KEY=VALUE shows the resolved config)")
            seen[resolved] = i
            experiments += [cfg.tracking.experiment] * (cfg.tracking.experiment not in experiments)
            tasks.append(Task(config, i, overrides, f"{name}-{config}-{i}"))
    return tasks, worlds, experiments


def tracking_uri(explicit: str | None, config: str, fixed: list[str], run_root: Path) -> str:
    if explicit or os.environ.get("MLFLOW_TRACKING_URI"):
        return explicit or os.environ["MLFLOW_TRACKING_URI"]
    cfg = load_config(find_config(config), fixed)
    return cfg.tracking.uri or default_uri(str(run_root))


def submit(args: argparse.Namespace) -> int:
    configs = [find_config(c).stem for c in args.config]
    if len(set(configs)) != len(configs):
        raise ConfigError(f"--config repeats a variant: {' '.join(configs)}")
    name = args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '_', '.', '-' (it names run directories)")
    grid = parse_grid(args.grid)
    fixed = list(args.set)
    for item in fixed:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        if item.split("=", 1)[0] in grid:
            raise ConfigError(f"--set {item} and --grid both give {item.split('=', 1)[0]}")
        if item.startswith(("train.run_name=", "tracking.parent_run_id=", "train.output_dir=", "tracking.experiment=",
                            "tracking.uri=")):
            raise ConfigError(f"--set {item}: the sweep sets it itself (--uri, --experiment; run directories "
                              "under $RUN_ROOT)")
    sbatch_args = shlex.split(args.sbatch_args or "")
    run_root = Path(os.environ.get("RUN_ROOT", "runs"))
    run_root = run_root if run_root.is_absolute() else REPO / run_root
    tasks, worlds, experiments = plan_tasks(name, configs, grid, fixed, sbatch_args)
    # MLflow nests runs under a parent of the same experiment only: the whole sweep logs to one.
    experiment = args.experiment or experiments[0]
    if len(experiments) > 1 and not args.experiment:
        print(f"note: the configs log to {', '.join(experiments)}; the sweep puts every run in {experiment} "
              "(--experiment NAME to choose)")
    uri = tracking_uri(args.uri, configs[0], fixed, run_root)
    sweep_dir = run_root / "sweeps" / name
    if sweep_dir.exists() and not args.dry_run:
        raise ConfigError(f"sweep {name} exists already ({sweep_dir}): choose another --name")

    common = [*fixed, f"tracking.uri={uri}", f"tracking.experiment={experiment}"]
    print(f"sweep {name}: {len(tasks)} task(s) = {len(configs)} config(s) x "
          f"{len(tasks) // len(configs)} grid point(s); MLflow {uri}, experiment {experiment}")
    if uri.startswith("sqlite:") and len(tasks) > 8:
        print(f"note: {len(tasks)} tasks share one SQLite store; a tracking server (mlflow server, then "
              "MLFLOW_TRACKING_URI=http://host:5000) serves many runs at once better")
    arrays = {}
    for config in configs:
        mine = [t for t in tasks if t.config == config]
        array = f"0-{len(mine) - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
        cmd = ["sbatch", "--parsable", f"--array={array}", f"--job-name={name}.{config}",
               f"--export=ALL,SWEEP_TASKS={sweep_dir / config}", *sbatch_args,
               f"slurm/{config}.sbatch", *common]
        print(f"\n{config}: array of {len(mine)}, world size {worlds[config]} each (slurm/{config}.sbatch"
              f"{' ' + ' '.join(sbatch_args) if sbatch_args else ''})")
        for t in mine:
            print(f"  [{t.index}] {t.run_name}: {' '.join(t.overrides) or '(no grid)'}")
        arrays[config] = cmd
    if args.dry_run:
        print("\n--dry-run: nothing created, nothing submitted. Would run (plus "
              "tracking.parent_run_id=<the new parent run>):")
        for cmd in arrays.values():
            print("  " + shlex.join(cmd))
        return 0

    # One file per task with its overrides, one per line (values may hold spaces): slurm/launch.sh reads
    # SWEEP_TASKS/<SLURM_ARRAY_TASK_ID>.args and appends them to the job's arguments.
    for t in tasks:
        (sweep_dir / t.config).mkdir(parents=True, exist_ok=True)
        (sweep_dir / t.config / f"{t.index}.args").write_text(
            "".join(f"{o}\n" for o in [*t.overrides, f"train.run_name={t.run_name}"]))
    parent = create_parent(uri, experiment, name, configs, grid, fixed)
    plan = dict(name=name, uri=uri, experiment=experiment, parent_run_id=parent, grid=grid, set=fixed,
                sbatch_args=sbatch_args, run_root=str(run_root), tasks=[asdict(t) for t in tasks], arrays={})
    for config, cmd in arrays.items():
        cmd.append(f"tracking.parent_run_id={parent}")
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "RUN_ROOT": str(run_root)})
        if r.returncode != 0:
            print(f"error: sbatch for {config} failed (exit {r.returncode}): {r.stderr.strip()}\n  {shlex.join(cmd)}",
                  file=sys.stderr)
            finish_parent(uri, parent, "FAILED")
            write_plan(sweep_dir, plan, uri, parent)
            return 1
        plan["arrays"][config] = r.stdout.strip().split(";")[0]
        print(f"submitted {config}: job array {plan['arrays'][config]}")
    write_plan(sweep_dir, plan, uri, parent)
    print(f"\nparent run {parent}; follow it with: python launch/sweep.py status {name}")
    return 0


def create_parent(uri: str, experiment: str, name: str, configs: list[str], grid: dict[str, list[str]],
                  fixed: list[str]) -> str:
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment, local_artifact_root(uri))
        note = (f"Sweep `{name}`: {', '.join(configs)} x " +
                (" x ".join(f"`{k}` in {{{', '.join(v)}}}" for k, v in grid.items()) or "no grid"))
        run = client.create_run(exp_id, run_name=name, tags={SWEEP_ROLE_TAG: "parent", SWEEP_NAME_TAG: name,
                                                              "mlflow.note.content": note})
    params = [Param(f"grid.{k}", ",".join(v)) for k, v in grid.items()] + [Param("configs", ",".join(configs))]
    params += [Param(f"set.{k}", v) for k, _, v in (item.partition("=") for item in fixed)]
    client.log_batch(run.info.run_id, params=params, tags=[RunTag("grid", json.dumps(grid))])
    return run.info.run_id


def write_plan(sweep_dir: Path, plan: dict, uri: str, parent: str) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / "sweep.json"
    path.write_text(json.dumps(plan, indent=1))
    from mlflow.tracking import MlflowClient
    MlflowClient(uri).log_artifact(parent, str(path))


def finish_parent(uri: str, parent: str, status: str) -> None:
    from mlflow.tracking import MlflowClient
    MlflowClient(uri).set_terminated(parent, status)


# ---------------------------------------------------------------------------------------------- status
def find_sweep(key: str, uri: str | None, run_root: Path):
    """(client, parent run, plan or None) for a sweep name or a parent run id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    plan_path = run_root / "sweeps" / key / "sweep.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    uri = uri or (plan or {}).get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(str(run_root))
    with store_lock(uri):  # opening may migrate a SQLite store: not beside a job doing the same
        client = MlflowClient(uri)
    if plan:
        return client, client.get_run(plan["parent_run_id"]), plan
    try:
        parent = client.get_run(key)
    except MlflowException:
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(experiments, f"tags.`{SWEEP_NAME_TAG}` = '{key}' and "
                                                f"tags.`{SWEEP_ROLE_TAG}` = 'parent'") if experiments else []
        if not found:
            raise ConfigError(f"no sweep {key!r}: neither {plan_path} nor a parent run of that name or id in {uri}") \
                from None
        parent = found[0]
    name = parent.data.tags.get(SWEEP_NAME_TAG)
    plan_path = run_root / "sweeps" / str(name) / "sweep.json"
    return client, parent, json.loads(plan_path.read_text()) if plan_path.is_file() else None


def slurm_states(arrays: dict[str, str]) -> dict[str, str]:
    """'<array id>_<task>' -> SLURM state, for the tasks squeue still knows (pending, running)."""
    if not arrays:
        return {}
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays.values())],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)


def status(args: argparse.Namespace) -> int:
    run_root = Path(os.environ.get("RUN_ROOT", "runs"))
    run_root = run_root if run_root.is_absolute() else REPO / run_root
    client, parent, plan = find_sweep(args.sweep, args.uri, run_root)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=10_000)
    by_name = {r.info.run_name: r for r in children}
    grid_keys = [k.removeprefix("grid.") for k in parent.data.params if k.startswith("grid.")]
    tasks = [Task(**t) for t in plan["tasks"]] if plan else \
        [Task(r.data.tags.get("model", "?"), i, [f"{k}={r.data.params.get(k)}" for k in grid_keys], r.info.run_name)
         for i, r in enumerate(sorted(children, key=lambda r: r.info.run_name))]
    queued = slurm_states(plan.get("arrays", {})) if plan else {}
    name = parent.data.tags.get(SWEEP_NAME_TAG, parent.info.run_name)
    print(f"sweep {name}: parent run {parent.info.run_id} ({parent.info.status}) in {client.tracking_uri}")
    rows, states = [], []
    for t in tasks:
        run = by_name.get(t.run_name)
        slurm = queued.get(f"{plan['arrays'].get(t.config)}_{t.index}") if plan else None
        if run is None:
            state = f"{slurm} (slurm)" if slurm else "NO RUN"
            rows.append((f"{t.config}[{t.index}]", " ".join(t.overrides), state, "-", "-", "-", "-"))
            states.append("QUEUED" if slurm else "NO RUN")
            continue
        # a preempted task's run reads KILLED until its requeued job resumes it: SLURM still has it
        state = run.info.status if slurm in (None, run.info.status) else f"{run.info.status}, slurm {slurm}"
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val/top1_by_epoch")]
        total = run.data.params.get("train.epochs", "?")
        best = max((m.value for m in client.get_metric_history(run.info.run_id, "val/top1")), default=None)
        ema = max((m.value for m in client.get_metric_history(run.info.run_id, "val/ema_top1")), default=None)
        rows.append((f"{t.config}[{t.index}]", " ".join(t.overrides), state, f"{max(epochs, default=0)}/{total}",
                     "-" if best is None else f"{best:.2f}", "-" if ema is None else f"{ema:.2f}",
                     run.data.tags.get("restart_count", "0")))
        states.append(run.info.status if slurm is None else "QUEUED")
    header = ("task", "overrides", "state", "epoch", "best top-1", "best EMA", "restarts")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print_seed_groups([(t.config, t.overrides, row[4]) for t, row in zip(tasks, rows)])
    if states and all(s in TERMINAL for s in states):
        final = "FINISHED" if all(s == "FINISHED" for s in states) else "FAILED"
        if parent.info.status != final:
            client.set_terminated(parent.info.run_id, final)
            print(f"every task has ended: parent run marked {final}")
    elif parent.info.status != "RUNNING":  # a task was requeued or resubmitted after the sweep was closed
        client.update_run(parent.info.run_id, status="RUNNING")
    return 0


def seed_groups(results: list[tuple[str, list[str], str]]) -> dict[tuple[str, str], list[float]]:
    """Best top-1 of the tasks that differ only in train.seed, per grid point (config, the other overrides);
    only points with more than one seed."""
    groups: dict[tuple[str, str], list[float]] = {}
    for config, overrides, best in results:
        rest = " ".join(o for o in overrides if not o.startswith("train.seed="))
        if best not in ("-", None) and any(o.startswith("train.seed=") for o in overrides):
            groups.setdefault((config, rest), []).append(float(best))
    return {k: v for k, v in groups.items() if len(v) > 1}


def print_seed_groups(results: list[tuple[str, list[str], str]]) -> None:
    """Seeds are noise, not settings: per grid point the mean, standard deviation and n of the best top-1 over
    its seeds, so two settings are compared against their spread."""
    import statistics

    groups = seed_groups(results)
    if not groups:
        return
    print("\nover seeds (best top-1):")
    width = max(len(f"{c} {rest}") for c, rest in groups)
    for (config, rest), values in groups.items():
        sd = statistics.stdev(values)
        print(f"  {f'{config} {rest}'.ljust(width)}  {statistics.mean(values):.2f} +- {sd:.2f}  (n={len(values)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="submit one job array per config, nested under a new MLflow parent run")
    s.add_argument("--config", action="append", required=True, help="a config name or file; repeat for several")
    s.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2", help="values to sweep (cartesian product)")
    s.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides every task gets")
    s.add_argument("--name", help="the sweep's name (default sweep-<date>-<time>)")
    s.add_argument("--sbatch-args", help="extra sbatch options for every array, one string: \"--nodes=1 ...\"")
    s.add_argument("--max-parallel", type=int, help="at most this many tasks of an array run at once (%%N)")
    s.add_argument("--uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, the config's, or the local store)")
    s.add_argument("--experiment", help="MLflow experiment of the sweep (default the first config's)")
    s.add_argument("--dry-run", action="store_true", help="print the plan, create and submit nothing")
    st = sub.add_parser("status", help="one line per task, from MLflow")
    st.add_argument("sweep", metavar="SWEEP", help="the sweep's name or its parent run id")
    st.add_argument("--uri", help="MLflow tracking URI (default: the one the sweep was submitted with)")
    args = p.parse_args(argv)
    try:
        return submit(args) if args.command == "submit" else status(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
