"""Several runs in one picture: val top-1 and train loss against epoch, from MLflow.

    python launch/compare.py RUN [RUN ...] [--uri sqlite:///runs/mlflow.db] [--out compare.png] [--log-to RUN]

RUN is a run id or a run name, or a sweep (launch/sweep.py: its name or parent run id), which stands for
all its runs and, without --log-to, receives the PNG. Runs that differ only in train.seed are drawn as one
curve, their mean, with a band of one standard deviation (and printed as mean +- sd). The legend names each
run with the parameters that differ between the runs (the sweep's knobs). --log-to logs the PNG to that run
(a sweep's parent, say) under artifacts/compare/. Prints each run's best and last val top-1.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def find_run(client, key: str):
    from mlflow.exceptions import MlflowException
    try:
        return client.get_run(key)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"attributes.run_name = '{key}'") if experiments else []
    if not runs:
        raise SystemExit(f"error: no run with id or name {key!r} in {client.tracking_uri}")
    return runs[0]


def expand_sweep(client, run) -> list:
    """A sweep's parent run stands for its children (MLflow's parentRunId tag), by name."""
    if run.data.tags.get("sweep.role") != "parent":
        return [run]
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                                  max_results=10_000)
    if not children:
        raise SystemExit(f"error: sweep {run.info.run_name} has no runs yet")
    return sorted(children, key=lambda r: r.info.run_name)


def seed_groups(runs: list, differ: list[str]) -> dict[str, list]:
    """Runs that differ only in train.seed, by the values of the other differing parameters (groups of 2+)."""
    if "train.seed" not in differ:
        return {}
    others = [k for k in differ if k != "train.seed"]
    groups: dict[str, list] = {}
    for run in runs:
        label = " ".join(f"{k.split('.')[-1]}={run.data.params.get(k, '-')}" for k in others[:3]) or "seeds"
        groups.setdefault(label, []).append(run)
    return {k: v for k, v in groups.items() if len(v) > 1}


def draw_seed_band(client, ax, label: str, members: list) -> None:
    """Mean val top-1 by epoch over the seeds, the band at +- one standard deviation; printed as mean +- sd (n)."""
    import statistics

    curves = [dict((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "val/top1_by_epoch"))
              for r in members]
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    if not epochs:
        return
    mean = [statistics.mean(c[e] for c in curves) for e in epochs]
    sd = [statistics.stdev(c[e] for c in curves) for e in epochs]
    line, = ax.plot(epochs, mean, marker="o", label=f"{label} (mean of {len(members)} seeds)")
    ax.fill_between(epochs, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                    color=line.get_color(), alpha=0.2)
    best = [max(c.values()) for c in curves]
    print(f"{label:<28}{statistics.mean(best):>11.2f} +- {statistics.stdev(best):.2f} best top-1 over "
          f"{len(members)} seeds")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="tracking URI (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--out", type=Path, default=Path("compare.png"))
    p.add_argument("--log-to", metavar="RUN", help="log the PNG to this run (id or name)")
    args = p.parse_args(argv)
    if not args.uri:
        print("error: give --uri (or set MLFLOW_TRACKING_URI), e.g. --uri sqlite:///runs/mlflow.db", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    from trainer.tracking import NOT_A_SETTING, store_lock
    with store_lock(args.uri):  # opening may migrate a SQLite store: not beside a job doing the same
        client = MlflowClient(args.uri)
    named = [find_run(client, key) for key in args.runs]
    runs = [r for run in named for r in expand_sweep(client, run)]
    sweeps = [r for r in named if r.data.tags.get("sweep.role") == "parent"]
    if not args.log_to and len(sweeps) == 1:
        args.log_to = sweeps[0].info.run_id
    keys = sorted({k for r in runs for k in r.data.params})
    differ = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1
              and (k == "train.seed" or not k.startswith(NOT_A_SETTING))]  # seeds: grouped below
    fig, (top1_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    seeded = seed_groups(runs, differ)
    if seeded:  # runs that differ only in train.seed: one curve, the mean over the seeds, with a band
        differ = [k for k in differ if k != "train.seed"]
        for label, members in seeded.items():
            draw_seed_band(client, top1_ax, label, members)
        runs = [r for r in runs if not any(r in m for m in seeded.values())]
    print(f"{'run':<28}{'best top-1':>11}{'last top-1':>11}  {'  '.join(differ[:3])}")
    for run in runs:
        rid, name = run.info.run_id, run.info.run_name
        label = name + "".join(f" {k.split('.')[-1]}={run.data.params[k]}" for k in differ[:3] if k in run.data.params)
        top1 = sorted((m.step, m.value) for m in client.get_metric_history(rid, "val/top1_by_epoch"))
        per_epoch = float(run.data.tags.get("steps_per_epoch", 0)) or None
        loss = sorted((m.step, m.value) for m in client.get_metric_history(rid, "train/loss"))
        if top1:
            top1_ax.plot([e for e, _ in top1], [v for _, v in top1], marker="o", label=label)
        if loss:
            loss_ax.plot([s / per_epoch if per_epoch else s for s, _ in loss], [v for _, v in loss], label=label)
        best = max((v for _, v in top1), default=float("nan"))
        last = top1[-1][1] if top1 else float("nan")
        print(f"{name:<28}{best:>11.2f}{last:>11.2f}  {'  '.join(run.data.params.get(k, '-') for k in differ[:3])}")
    top1_ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation top-1")
    loss_ax.set(xlabel="epoch" if all(r.data.tags.get("steps_per_epoch") for r in runs) else "step",
                ylabel="train loss", title="training loss")
    for ax in (top1_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    if args.log_to:
        parent = find_run(client, args.log_to)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / args.out.name
            copy.write_bytes(args.out.read_bytes())
            client.log_artifact(parent.info.run_id, str(copy), "compare")
        print(f"logged to run {parent.info.run_id} (artifacts/compare/{args.out.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
