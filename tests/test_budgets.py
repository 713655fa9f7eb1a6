"""One run, many budgets: a warmup-stable-decay trunk and cooldown branches off it (launch/branch.py)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_script

TRAIN, BRANCH = str(REPO / "launch/train.py"), str(REPO / "launch/branch.py")


def losses(stdout: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+ loss ([\d.]+)", stdout)}


@pytest.mark.slow
def test_a_branch_resumes_the_trunk_exactly_and_a_preempted_branch_ends_the_same(tmp_path, digits_root):
    """A 3-epoch wsd trunk (15 steps an epoch); two branches at epoch 1 with a 1-epoch cooldown, both distilling
    from the trunk's exported final weights. Branch A runs through; branch B is stopped by SIGUSR1 mid-cooldown
    and run again. Both end with the same weights and losses; the lr falls from the peak to min_lr over steps
    16-30; the MLflow runs nest under the trunk's; the distillation's plan line and loss terms are there, the
    checkpoints hold the student only, and a teacher of another class count fails at start."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    common = [f"data.root={digits_root}", f"train.output_dir={tmp_path}", "train.log_every=1", "data.workers=1",
              f"tracking.uri={store}", "tracking.system_metrics=false", "tracking.log_model=false"]
    trunk = run_script(TRAIN, "--config", "cs_mixer_tiny", *common, "train.run_name=trunk", "train.epochs=3",
                       "train.global_batch=96", "train.batch_size=96", "train.grad_accum=null",
                       "schedule.sched=wsd", "schedule.cooldown_epochs=1", "schedule.warmup_epochs=0.5",
                       "checkpoint.keep_every_epochs=1", cwd=tmp_path)
    assert trunk.returncode == 0, trunk.stderr[-3000:]
    bad = run_script(BRANCH, str(tmp_path / "trunk"), "--at", "epoch_3", "--cooldown-epochs", "1")
    assert bad.returncode == 2 and "in the trunk's own decay (from step 30)" in bad.stderr, bad.stderr
    missing = run_script(BRANCH, str(tmp_path / "trunk"), "--at", "step_7", "--cooldown-epochs", "1")
    assert missing.returncode == 2 and "no complete checkpoint at step_7" in missing.stderr and "step_15" in missing.stderr

    # the branches distil from a teacher: the trunk's final weights, exported (the same 10 classes)
    teacher = tmp_path / "teacher.safetensors"
    assert run_script(str(REPO / "launch/export.py"), str(tmp_path / "trunk"), "--out", str(teacher)).returncode == 0

    def branch(name: str) -> str:
        made = run_script(BRANCH, str(tmp_path / "trunk"), "--at", "epoch_1", "--cooldown-epochs", "1",
                          "--name", name, f"distill.teacher={teacher}", "distill.alpha=0.5", "distill.tau=2")
        assert made.returncode == 0, made.stderr[-2000:]
        assert "decay over 1 epochs (15 steps, 1-sqrt) to step 30" in made.stdout
        return str(tmp_path / name / "branch.yaml")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # A runs through while B (one process each) is stopped and run again beside it
    a_out, a_err = open(tmp_path / "A.out", "w+"), open(tmp_path / "A.err", "w+")  # files: nothing to drain
    proc_a = subprocess.Popen([sys.executable, TRAIN, "--config", branch("A")], cwd=tmp_path, env=env, text=True,
                              stdout=a_out, stderr=a_err)
    config = branch("B")
    proc = subprocess.Popen([sys.executable, TRAIN, "--config", config], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = []
    for line in proc.stdout:
        first.append(line)
        if "step 20/30" in line:
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 85 and "[stop] signal received" in "".join(first)
    b = run_script(TRAIN, "--config", config, cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    a = subprocess.CompletedProcess(proc_a.args, proc_a.wait(timeout=300), (tmp_path / "A.out").read_text(),
                                    (tmp_path / "A.err").read_text())
    a_out.close(), a_err.close()
    assert a.returncode == 0, a.stderr[-3000:]
    assert f"[resume] {tmp_path}/A/checkpoints/step_00000015" in a.stdout
    assert re.search(r"\[plan\] distillation \(soft, alpha 0.5, tau 2.0\): teacher cs_mixer_tiny from \S+ "
                     r"\(safetensors\), [\d.]+ GMACs per image", a.stdout), a.stdout[:3000]
    assert len(re.findall(r"loss terms: base [\d.]+ distill [\d.]+", a.stdout)) == 15
    lrs = {int(s): float(v) for s, v in re.findall(r"step (\d+)/30 loss [\d.]+ lr ([\d.e+-]+)", a.stdout)}
    assert sorted(lrs) == list(range(16, 31)) and lrs[30] == pytest.approx(1e-5, rel=1e-3)  # min_lr at the end
    assert all(lrs[s] > lrs[s + 1] for s in range(16, 30))

    merged = {**losses("".join(first)), **losses(b.stdout)}
    assert merged == losses(a.stdout)  # the same continuation, step for step
    wa = torch.load(tmp_path / "A/checkpoints/step_00000030/mp_rank_00_model_states.pt", weights_only=False)["module"]
    wb = torch.load(tmp_path / "B/checkpoints/step_00000030/mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    trunk_meta = json.loads((tmp_path / "trunk/checkpoints/step_00000015/meta.json").read_text())
    branch_meta = json.loads((tmp_path / "A/checkpoints/step_00000015/meta.json").read_text())
    assert trunk_meta["seq"] == branch_meta["seq"]  # the same checkpoint, its weights hard links (no copy):
    assert (tmp_path / "trunk/checkpoints/step_00000015/mp_rank_00_model_states.pt").stat().st_nlink >= 2
    client = MlflowClient(store)
    runs = {r.info.run_name: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert set(runs) == {"trunk", "A", "B"}  # each branch its own run; the trunk's run got nothing from them
    assert max(m.step for m in client.get_metric_history(runs["trunk"].info.run_id, "train/loss")) == 45
    assert {"train/loss_base", "train/loss_distill"} <= set(runs["A"].data.metrics)
    state = torch.load(tmp_path / "A/checkpoints/step_00000030/mp_rank_00_model_states.pt", weights_only=False)
    assert set(state["module"]) == set(wa)  # the student only: no teacher weights in the checkpoint
    from models import create_model
    from models.exported import save_exported
    other = tmp_path / "teacher3.safetensors"
    save_exported(other, "cs_mixer_tiny", create_model("cs_mixer_tiny", num_classes=3).state_dict(),
                  {"num_classes": 3, "img_size": 32})
    from trainer.build import build_teacher  # what train() builds first; its ConfigError is train.py's exit 2
    from trainer.config import ConfigError, find_config, load_config
    with pytest.raises(ConfigError, match="has 3 classes but model.num_classes=10"):
        build_teacher(load_config(find_config("cs_mixer_tiny"), [f"distill.teacher={other}"]), torch.device("cpu"),
                      torch.float32)
    for name in ("A", "B"):
        tags = runs[name].data.tags
        assert tags["mlflow.parentRunId"] == runs["trunk"].info.run_id
        assert tags["branch_of"] == str((tmp_path / "trunk").resolve()) and tags["branch_step"] == "15"


def test_sweep_status_groups_the_seeds_of_each_grid_point_and_off_track_uses_their_spread(tmp_path):
    """A 2 x 3 (lr x seed) sweep's runs in a real MLflow store (as the SLURM array logs them): `sweep.py status`
    prints each task, then per lr the mean, standard deviation and n of the best top-1 over the seeds."""
    import statistics

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweeps", str(tmp_path / "artifacts"))  # not ./mlruns in the cwd
    parent = client.create_run(exp, run_name="ls", tags={"sweep.role": "parent", "sweep.name": "ls"})
    client.log_param(parent.info.run_id, "grid.optim.lr", "1e-3,2e-3")
    client.log_param(parent.info.run_id, "grid.train.seed", "0,1,2")
    best = {("1e-3", "0"): 90.1, ("1e-3", "1"): 90.5, ("1e-3", "2"): 89.6,
            ("2e-3", "0"): 91.0, ("2e-3", "1"): 92.2, ("2e-3", "2"): 91.3}
    for i, ((lr, seed), top1) in enumerate(best.items()):
        run = client.create_run(exp, run_name=f"ls-cs_mixer_tiny-{i}", tags={
            "mlflow.parentRunId": parent.info.run_id, "model": "cs_mixer_tiny", "recipe": "r"})
        client.log_param(run.info.run_id, "optim.lr", lr)
        client.log_param(run.info.run_id, "train.seed", seed)
        client.log_param(run.info.run_id, "train.epochs", "1")
        for step, value in ((1, top1 - 3), (2, top1)):
            client.log_metric(run.info.run_id, "val/top1", value, step=step)
            client.log_metric(run.info.run_id, "val/top1_by_epoch", value, step=step)
        client.set_terminated(run.info.run_id, "FINISHED")
    out = run_script(str(REPO / "launch/sweep.py"), "status", "ls", "--uri", uri, env={"RUN_ROOT": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout)
    groups = dict(re.findall(r"optim\.lr=(\S+)\s+([\d.]+ \+- [\d.]+)\s+\(n=3\)", out.stdout))
    for lr in ("1e-3", "2e-3"):
        values = [v for (point_lr, _), v in best.items() if point_lr == lr]
        assert groups[lr] == f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"
    # the off-track check: the best setting at epoch 2 is lr 2e-3, 91.50 +- 0.62 over 3 seeds; a run is off-track
    # 3 sd below that mean (89.63), though far less than tracking.off_track_points (5) behind it
    from trainer.trainer import Reference, earlier_settings, off_track_verdict

    ref = earlier_settings(uri, "sweeps", "r", "none", print)[2]
    assert ref.mean == pytest.approx(91.5) and ref.sd == pytest.approx(statistics.stdev([91.0, 92.2, 91.3]))
    assert sorted(ref.runs) == ["ls-cs_mixer_tiny-3", "ls-cs_mixer_tiny-4", "ls-cs_mixer_tiny-5"]
    assert off_track_verdict(ref, 90.0, 5.0, 3.0)[0] is None  # 1.5 points, 2.4 sd: within the seeds' noise
    verdict, metrics = off_track_verdict(ref, 89.0, 5.0, 3.0)
    assert verdict.startswith("val top-1 89.00 is 2.5 points, 4.0 sd, below 91.50 +- 0.62, the mean of 3 seeds")
    assert metrics == pytest.approx({"val/off_track_points": 2.5, "val/off_track_sd": 2.5 / ref.sd})
    single = earlier_settings(uri, "sweeps", "r", run.info.run_id, print)[2]  # lr 2e-3 seed 2 is this run
    assert sorted(single.runs) == ["ls-cs_mixer_tiny-3", "ls-cs_mixer_tiny-4"]  # still two seeds: still the spread
    one = Reference(91.5, None, ["ls-cs_mixer_tiny-3"])  # one earlier run: no spread, the points rule
    assert off_track_verdict(one, 89.0, 5.0, 3.0)[0] is None
    assert off_track_verdict(one, 86.0, 5.0, 3.0)[0].startswith("val top-1 86.00 is 5.5 points behind 91.50 of run")
    # compare.py: one curve per lr, the mean over its seeds with a band, and mean +- sd printed
    png = tmp_path / "ls.png"
    drawn = run_script(str(REPO / "launch/compare.py"), "ls", "--uri", uri, "--out", str(png))
    assert drawn.returncode == 0 and png.stat().st_size > 10_000, drawn.stderr[-2000:]
    for lr in ("1e-3", "2e-3"):
        values = [v for (point_lr, _), v in best.items() if point_lr == lr]
        assert f"lr={lr}" in drawn.stdout and \
            f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} best top-1 over 3 seeds" in drawn.stdout
