"""The SLURM launchers (slurm/) on a real SLURM cluster on this machine (DeepSpeed's multi-node launcher: test_train.py).

One cluster per module (slurm/local_cluster.sh: munged, slurmctld, two slurmd on 127.0.0.1, own ports),
shaped like two 8-GPU nodes (64 CPUs, 8 emulated GPUs each) so the full-size sbatch headers are checked as
shipped; the tiny jobs run on the CPU over gloo. Missing SLURM or munge binaries fail the module: in CI
nothing may be skipped.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

SLURM_DIR = REPO / "slurm"
LOCAL_CLUSTER = SLURM_DIR / "local_cluster.sh"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
# config -> (world size, batch per GPU, global batch) the sbatch header's allocation gives: the recipe's
# global batch without gradient accumulation, at most 128 images per GPU.
FULL_SIZE = {
    "cs_mixer_t": (8, 128, 1024), "cs_mixer_s": (8, 128, 1024), "cs_mixer_b": (8, 128, 1024),
    "cs_mixer_l": (16, 64, 1024), "s2mlpv2_small": (16, 128, 2048), "s2mlpv2_medium": (16, 128, 2048),
}
TINY = ("cs_mixer_tiny", "s2mlpv2_tiny")


def _installed(name: str) -> bool:
    return bool(shutil.which(name)) or os.access(f"/usr/sbin/{name}", os.X_OK)  # sbin: not on every PATH


def _free_port_block(n: int) -> int:
    """A base port with n free ports after it, below the MASTER_PORT range launch.sh uses (20000+)."""
    for _ in range(100):
        base = random.randrange(10000, 19990)
        socks = []
        try:
            socks = [socket.create_server(("0.0.0.0", base + i)) for i in range(n)]
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without SLURM job variables (pytest may itself run inside a job)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k not in ("RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


class Cluster:
    def __init__(self, root: Path, conf: str) -> None:
        self.root, self.conf = root, conf
        self.runs = root / "runs"

    def env(self, **extra: str) -> dict[str, str]:
        return _clean_env(SLURM_CONF=self.conf, RUN_ROOT=str(self.runs), PYTHON=sys.executable, **extra)

    def submit(self, config: str, *overrides: str, **env: str) -> str:
        """sbatch the shipped slurm/<config>.sbatch from the repository root; overrides go to the trainer."""
        r = subprocess.run(["sbatch", "--parsable", f"--output={self.root}/slurm-%x-%j.out", f"slurm/{config}.sbatch",
                            *overrides],
                           cwd=REPO, env=self.env(**env), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env(), capture_output=True,
                             text=True, timeout=30).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Poll until the job is finished (a requeued job is PENDING again, not finished, in between)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} unfinished after {timeout} s: {self.job(job_id)}\n{self.output(job_id)}")

    def output(self, job_id: str) -> str:
        files = list(self.root.glob(f"slurm-*-{job_id}.out"))
        return files[0].read_text() if files else ""

    def signal_batch_shell(self, job_id: str, sig: str) -> None:
        """What `#SBATCH --signal=B:SIG@T` does at T seconds before the time limit, now."""
        subprocess.run(["scancel", "--batch", f"--signal={sig}", job_id], env=self.env(), check=True, timeout=30)


def mlflow_run(uri: str, run_name: str):
    """The one MLflow run of that name in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def wait_for_line(path: Path, pattern: str, timeout: float = 180) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and re.search(pattern, text := path.read_text()):
            return text
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s")


def step_losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+ loss ([0-9.]+)", log)}


def module_states(run_dir: Path) -> dict[str, torch.Tensor]:
    tag = (run_dir / "checkpoints/latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [b for b in BINARIES if not _installed(b)]
    if missing:
        pytest.fail(f"SLURM tests need {', '.join(missing)}: apt-get install slurm-wlm munge "
                    "(scripts/setup_env.sh does, as root)")
    root = tmp_path_factory.mktemp("slurm")
    env = _clean_env(PORT_BASE=str(_free_port_block(3)), NODE_CPUS="64", NODE_GPUS="8",
                     FIRST_JOB_ID=str(random.randrange(1000, 9000)))  # job ids, hence MASTER_PORTs, differ per run
    start = subprocess.run(["bash", str(LOCAL_CLUSTER), "start", str(root / "cluster")], env=env,
                           capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", str(root / "cluster")], env=env, timeout=120)
        pytest.fail(f"local cluster did not start:\n{start.stdout}\n{start.stderr}")
    conf = re.search(r"^export SLURM_CONF=(\S+)$", start.stdout, re.M).group(1)
    yield Cluster(root, conf)
    subprocess.run(["bash", str(LOCAL_CLUSTER), "stop", str(root / "cluster")], env=env, timeout=120)


# ------------------------------------------------------------------ a, d: the tiny jobs, two at once
# The cs_mixer_tiny jobs are fp32 warmup-stable-decay runs (the decay is epoch 2; a checkpoint every 5 steps kept):
# the uninterrupted one is also the preemption test's reference and the trunk the branch test branches off.
WSD = ("train.log_every=1", "deepspeed.bf16=false", "schedule.sched=wsd", "schedule.cooldown_epochs=1",
       "schedule.warmup_epochs=0.25", "checkpoint.every_steps=5", "checkpoint.keep_last=8", "tracking.log_model=false",
       "tracking.system_metrics=false")


@pytest.fixture(scope="module")
def tiny_jobs(cluster, digits_root):
    """Both shipped tiny sbatch files submitted at once (2 nodes each), and beside them a copy of the cs_mixer_tiny
    job ("preempted") that gets SIGUSR2 at step 3; all run to completion. {config or "preempted": (job id, info)}"""
    common = (f"data.root={digits_root}", "train.epochs=2", "aug.auto_augment=none", "aug.mixup=0", "aug.cutmix=0",
              "aug.reprob=0")  # 2 epochs: learn, do not regularise
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cluster.root}/mlflow.db"}
    ids = {cfg: cluster.submit(cfg, *common, *(WSD if cfg == "cs_mixer_tiny" else ()), **env) for cfg in TINY}
    ids["preempted"] = cluster.submit("cs_mixer_tiny", *common, *WSD, RUN_NAME="preempted", **env)
    wait_for_line(cluster.runs / "preempted/logs/rank0.log", r"step 3/22 ")
    cluster.signal_batch_shell(ids["preempted"], "USR2")
    return {key: (job_id, cluster.wait(job_id)) for key, job_id in ids.items()}


@pytest.mark.parametrize("config", TINY)
def test_tiny_sbatch_trains_on_two_nodes(cluster, tiny_jobs, config):
    job_id, info = tiny_jobs[config]
    out = cluster.output(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    logs = cluster.runs / f"{config}-{job_id}" / "logs"
    rank0, rank1 = (logs / "rank0.log").read_text(), (logs / "rank1.log").read_text()
    assert f"[plan] {config}: world size 2; batch 64/rank x accum 1 x 2 ranks = global 128" in rank0
    # rank 1 has its own log (empty after a quiet start: only rank 0 reports)
    assert (logs / "rank1.log").is_file() and "Traceback" not in rank0 + rank1
    top1 = float(re.search(r"^val_top1=([0-9.]+)$", rank0, re.M).group(1))
    assert top1 > 25, rank0  # 2 epochs on digits (cs_mixer_tiny ~92 %, s2mlpv2_tiny ~35 %): above chance, 10 %
    assert f"done: val_top1={top1:.2f}" in out and "(restart 0 of at most 20)" in out
    assert f"MLflow sqlite:///{cluster.root}/mlflow.db" in out  # the submitting shell's tracking URI arrived
    run = mlflow_run(f"sqlite:///{cluster.root}/mlflow.db", f"{config}-{job_id}")  # ... and the ranks used it
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.tags["slurm_job_id"] == job_id and run.data.tags["slurm_restart_count"] == "0"


def test_two_jobs_at_once_do_not_collide(cluster, tiny_jobs):
    ports, run_dirs, spans = set(), set(), []
    for config in TINY:
        job_id, info = tiny_jobs[config]
        launch = (cluster.runs / f"{config}-{job_id}" / "logs/launch.log").read_text()
        ports.add(int(re.search(r"MASTER_ADDR=127\.0\.0\.1 MASTER_PORT=(\d+)", launch).group(1)))
        run_dirs.add(re.search(r"run dir (\S+);", launch).group(1))
        spans.append((info["StartTime"], info["EndTime"]))
        assert info["ExitCode"] == "0:0"
    assert len(ports) == 2 and len(run_dirs) == 2
    (start_a, end_a), (start_b, end_b) = spans  # ISO timestamps: they ran at the same time
    assert start_a < end_b and start_b < end_a, spans


# ------------------------------------------------------------------ b: preemption, requeue, exact resume
def test_preempted_job_requeues_and_resumes_exactly(cluster, tiny_jobs):
    """SIGUSR2 to the batch shell (what `--signal=B:USR2@T` does): checkpoint, exit 85, requeue, resume; the
    final weights equal those of an uninterrupted run (the cs_mixer_tiny job: fp32, same seed, same world size)."""
    (cut, info), (ref, ref_info) = tiny_jobs["preempted"], tiny_jobs["cs_mixer_tiny"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", \
        cluster.output(cut)
    assert ref_info["ExitCode"] == "0:0"
    reference, uri = cluster.runs / f"cs_mixer_tiny-{ref}", f"sqlite:///{cluster.root}/mlflow.db"
    launch = (cluster.runs / "preempted/logs/launch.log").read_text()
    assert "SIGUSR2: forwarding it to srun" in launch
    assert f"stopped (exit 85): requeueing job {cut} (restart 1 of at most 20)" in launch
    assert f"job {cut} (restart 1 of at most 20)" in launch  # SLURM_RESTART_COUNT=1 in the second run
    log = (cluster.runs / "preempted/logs/rank0.log").read_text()
    stopped = int(re.search(r"\[stop\] signal received: checkpoint \S+ written at step (\d+); exit 85", log).group(1))
    assert 3 <= stopped < 22
    assert f"[resume] {cluster.runs}/preempted/checkpoints/step_{stopped:08d}: step {stopped}" in log
    resumed = step_losses(log.split("[resume]")[1])
    full = step_losses((reference / "logs/rank0.log").read_text())
    assert sorted(resumed) == list(range(stopped + 1, 23))
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)
    a, b = module_states(reference), module_states(cluster.runs / "preempted")
    assert (cluster.runs / "preempted/checkpoints/latest").read_text().strip() == "step_00000022"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    run = mlflow_run(uri, "preempted")  # one MLflow run across the requeue
    assert run.info.status == "FINISHED" and run.data.tags["restart_count"] == "1"
    assert run.data.tags["slurm_restart_count"] == "1" and run.data.tags["restart_1_from_step"] == str(stopped)
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 23))


def test_branches_submitted_to_slurm_replay_the_trunks_decay_and_export(cluster, tiny_jobs):
    """launch/branch.py --submit: two cooldown branches of the cs_mixer_tiny job (a wsd trunk), one sbatch job each (the variant's
    slurm/cs_mixer_tiny.sbatch, 2 nodes, slurm/launch.sh running the branch's branch.yaml). The branch at epoch 1
    with a 1-epoch cooldown is the trunk's own decay: the same losses and weights, step for step. The branch at
    step 5 ends at step 16. Both MLflow runs nest under the trunk's, in the trunk's store: the trunk got it from
    MLFLOW_TRACKING_URI, which branch.py's environment here lacks. A branch exports like any run."""
    from mlflow.tracking import MlflowClient

    from models.exported import load_exported

    job_id, info = tiny_jobs["cs_mixer_tiny"]
    assert info["ExitCode"] == "0:0"
    trunk = cluster.runs / f"cs_mixer_tiny-{job_id}"
    b1, s5 = f"{trunk.name}-b1-cd1", f"{trunk.name}-s5-cd1"
    r = subprocess.run([sys.executable, "launch/branch.py", str(trunk), "--at", "epoch_1", "step_5",
                        "--cooldown-epochs", "1", "--submit", f"--sbatch-args=--output={cluster.root}/slurm-%x-%j.out"],
                       cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = dict(re.findall(r"submitted (\S+): job (\d+) \(slurm/cs_mixer_tiny.sbatch\)", r.stdout))
    assert sorted(jobs) == [b1, s5], r.stdout
    infos = {name: cluster.wait(job) for name, job in jobs.items()}
    assert all(i["ExitCode"] == "0:0" and i["NumNodes"] == "2" for i in infos.values()), \
        [cluster.output(j) for j in jobs.values()]
    replay = (cluster.runs / b1 / "logs/rank0.log").read_text()
    assert f"[resume] {cluster.runs}/{b1}/checkpoints/step_00000011: step 11" in replay
    losses, full = step_losses(replay), step_losses((trunk / "logs/rank0.log").read_text())
    assert sorted(losses) == list(range(12, 23)) and all(losses[s] == full[s] for s in losses)
    a, b = module_states(trunk), module_states(cluster.runs / b1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    short = (cluster.runs / s5 / "logs/rank0.log").read_text()
    assert sorted(step_losses(short)) == list(range(6, 17)) and "val_top1=" in short
    uri = f"sqlite:///{cluster.root}/mlflow.db"
    parent = mlflow_run(uri, trunk.name)
    for name in jobs:
        run = mlflow_run(uri, name)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["slurm_job_id"] == jobs[name]
    assert max(m.step for m in MlflowClient(uri).get_metric_history(parent.info.run_id, "train/loss")) == 22
    out = cluster.root / "branch.safetensors"
    exported = subprocess.run([sys.executable, "launch/export.py", str(cluster.runs / s5), "--out",
                               str(out)], cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    weights = load_exported(out)[0]
    final = module_states(cluster.runs / s5)
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k].float()) for k in final)


# ------------------------------------------------------------------ c: full-size headers
@pytest.fixture(scope="module")
def dry_runs(cluster):
    """Every full-size sbatch file, header as shipped, submitted with DRY_RUN=1: launch.sh resolves the
    allocation and the config, prints the plan and the srun command, and starts no rank."""
    ids = {cfg: cluster.submit(cfg, "data.root=/data/imagenet", DRY_RUN="1") for cfg in FULL_SIZE}
    return {cfg: (job_id, cluster.wait(job_id, timeout=180)) for cfg, job_id in ids.items()}


@pytest.mark.parametrize("config", FULL_SIZE)
def test_full_size_sbatch_fits_and_resolves(cluster, dry_runs, config):
    test_only = subprocess.run(["sbatch", "--test-only", f"slurm/{config}.sbatch"], cwd=REPO, env=cluster.env(),
                               capture_output=True, text=True, timeout=60)
    world, per_gpu, global_batch = FULL_SIZE[config]
    nodes = "n[1-2]" if world == 16 else "n1"
    assert test_only.returncode == 0 and f"using {world * 8} processors on nodes {nodes}" in test_only.stderr, \
        test_only.stderr
    job_id, info = dry_runs[config]
    out = cluster.output(job_id)
    assert info["ExitCode"] == "0:0", out
    assert info["TRES"].startswith(f"cpu={world * 8},") and info["NumNodes"] == str(world // 8), info
    assert f"{world} tasks, 8 CPUs each; MASTER_ADDR=127.0.0.1 MASTER_PORT={20000 + int(job_id) % 20000}" in out
    assert (f"[plan] {config}: world size {world}; batch {per_gpu}/rank x accum 1 x {world} ranks = "
            f"global {global_batch};") in out
    assert "DRY_RUN: would run: srun --kill-on-bad-exit=1 --cpus-per-task=8" in out
    assert not (cluster.runs / f"{config}-{job_id}").exists()


# ------------------------------------------------------------------ f: no requeue loops
@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "the config does not resolve (exit 2): not starting the ranks, not requeueing"),
    ("data.root=/nonexistent/digits", "the trainer failed (exit 2; 2 bad input, 3 non-finite loss, 4 replicas differ): "
                                        "not requeueing"),
])
def test_real_failure_is_not_requeued(cluster, override, message):
    job_id = cluster.submit("s2mlpv2_tiny", override, "tracking.enabled=false")
    info = cluster.wait(job_id)
    out = cluster.output(job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", out
    assert message in out


def test_job_at_max_requeues_stops_instead_of_requeueing(cluster, digits_root):
    job_id = cluster.submit("s2mlpv2_tiny", f"data.root={digits_root}", "train.epochs=2", "train.log_every=1",
                            "tracking.enabled=false", MAX_REQUEUES="0")
    run = cluster.runs / f"s2mlpv2_tiny-{job_id}"
    wait_for_line(run / "logs/rank0.log", r"step 2/22 ")
    cluster.signal_batch_shell(job_id, "USR2")
    info = cluster.wait(job_id)
    out = cluster.output(job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "85:0" and info["Restarts"] == "0", out
    assert "after 0 requeues, MAX_REQUEUES=0: not requeueing; to resume: RUN_NAME=" in out
    stopped = int(re.search(r"written at step (\d+); exit 85", (run / "logs/rank0.log").read_text()).group(1))
    assert (run / "checkpoints/latest").read_text().strip() == f"step_{stopped:08d}"


def test_a_node_failing_the_preflight_is_excluded_and_the_job_requeued(cluster, digits_root):
    """Rank 1 (on n2) reads a pre-flight matmul 1 s slower: exit 87 before training, launch.sh sets the
    job's ExcNodeList to n2 and requeues it. This 2-node cluster has no third node, so the requeued job
    waits (PENDING) with n2 excluded; the test then cancels it."""
    job_id = cluster.submit("cs_mixer_tiny", f"data.root={digits_root}", "tracking.enabled=false",
                            TRAIN_TEST_SLOW_PREFLIGHT="1")
    end, info = time.monotonic() + 180, {}
    while time.monotonic() < end:
        info = cluster.job(job_id)
        # the requeue counts at once; the job shows COMPLETING until its first run's steps have ended
        if info.get("Restarts") == "1" and info.get("ExcNodeList") == "n2" and info.get("JobState") != "COMPLETING":
            break
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=cluster.env(), timeout=30)
    out = cluster.output(job_id)
    assert info.get("ExcNodeList") == "n2" and info.get("Restarts") == "1", (info, out)
    assert info.get("JobState") == "PENDING" and "held" not in info.get("Reason", ""), info  # waits to restart
    assert "pre-flight failed on node(s) n2" in out and f"job {job_id} requeued with ExcNodeList=n2" in out, out
    run = cluster.runs / f"cs_mixer_tiny-{job_id}"
    assert (run / "exclude_nodes").read_text() == "n2\n"
    assert re.search(r"pre-flight: rank 1 on n2: matmul \d+ ms", (run / "logs/rank0.log").read_text() +
                     (run / "logs/rank1.log").read_text())


# ------------------------------------------------------------------ a hung rank: stacks, exit 86, requeue
def test_a_hung_rank_dumps_stacks_and_the_job_requeues_and_finishes(cluster, digits_root):
    """Rank 1 (on n2) waits 1 s per batch (a straggler), then blocks for good after step 4 in the job's
    first run; rank 0 blocks in the next collective. With train.hang_timeout_s=5 both watchdogs write
    their stacks and exit 86; launch.sh requeues like a preemption and the requeued job (no hang)
    resumes into the same MLflow run and finishes."""
    uri = f"sqlite:///{cluster.root}/hang.db"
    job_id = cluster.submit("cs_mixer_tiny", f"data.root={digits_root}", "train.max_steps=10", "train.log_every=1",
                            "train.hang_timeout_s=5", f"tracking.uri={uri}", RUN_NAME="hung",
                            TRAIN_TEST_SLOW_RANK="1:1.0", TRAIN_TEST_HANG_AT_STEP="4:1")
    info = cluster.wait(job_id)
    run_dir = cluster.runs / "hung"
    launch = (run_dir / "logs/launch.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", launch
    assert "a rank hung (no optimizer step within its timeout" in launch
    assert f"stopped (exit 85): requeueing job {job_id} (restart 1 of at most 20)" in launch
    rank0, rank1 = ((run_dir / f"logs/rank{r}.log").read_text() for r in (0, 1))
    assert re.search(r"\[straggler\] rank 1 on n2: \d+ ms/step of its own work, [0-9.]+x the median", rank0), rank0
    assert "(step 1)" not in rank0  # the first window (warm-up) gets no verdict
    for rank, log in ((0, rank0), (1, rank1)):
        assert f"[hang] rank {rank} on n{rank + 1}: no optimizer step for" in log, log
        stacks = (run_dir / f"hang/rank{rank}.txt").read_text()
        assert "after step 4" in stacks and "most recent call first" in stacks
    assert "in beat" in (run_dir / "hang/rank1.txt").read_text()  # where the test made it stop
    assert "[resume]" not in rank0 and "step 10/10" in rank0  # no checkpoint before the hang: from step 0 again
    run = mlflow_run(uri, "hung")  # one run: marked FAILED with the hang, then resumed and finished
    assert run.info.status == "FINISHED" and "no optimizer step" in run.data.tags["hang"]
    assert run.data.tags["slurm_restart_count"] == "1" and run.data.tags["straggler_rank1"].startswith("n2")
    hung_at = re.search(r"\[launch (\S+ \S+)\] a rank hung", launch).group(1)
    print(f"stacks written, exit 86, requeue decided at {hung_at}; dumps: "
          f"{[time.strftime('%H:%M:%S', time.localtime((run_dir / f'hang/rank{r}.txt').stat().st_mtime)) for r in (0, 1)]}")


# ------------------------------------------------------------------ a stop signal after the last step
def test_a_stop_signal_after_training_finished_does_not_requeue(cluster, digits_root):
    """SIGUSR2 (the time limit's warning) arrives while rank 0 exports the finished run: the ranks ignore
    it, the job completes, is not requeued, and the MLflow run is FINISHED (not KILLED)."""
    uri = f"sqlite:///{cluster.root}/late.db"
    job_id = cluster.submit("cs_mixer_tiny", f"data.root={digits_root}", "train.max_steps=4",
                            f"tracking.uri={uri}", "tracking.system_metrics=false", RUN_NAME="late",
                            TRAIN_TEST_PAUSE_AFTER_TRAINING="6")
    run_dir = cluster.runs / "late"
    wait_for_line(run_dir / "logs/rank0.log", r"\[test\] pausing before the export")
    cluster.signal_batch_shell(job_id, "USR2")
    info = cluster.wait(job_id)
    launch = (run_dir / "logs/launch.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", launch
    assert "SIGUSR2: forwarding it to srun" in launch and "requeueing" not in launch and "done: val_top1=" in launch
    assert (run_dir / "FINISHED").read_text().startswith("step 4 val_top1 ")
    run = mlflow_run(uri, "late")
    assert run.info.status == "FINISHED" and run.data.tags["restart_count"] == "0"


# ------------------------------------------------------------------ sweeps: job arrays under one MLflow parent
def sweep(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=REPO, env=cluster.env(),
                          capture_output=True, text=True, timeout=120)


def test_sweep_dry_run_plans_one_array_per_config_and_submits_nothing(cluster):
    r = sweep(cluster, "submit", "--config", "cs_mixer_tiny", "--config", "configs/s2mlpv2_medium.yaml",
              "--grid", "optim.weight_decay=0.05,0.1", "train.seed=0,1", "--name", "plan", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "sweep plan: 8 task(s) = 2 config(s) x 4 grid point(s)" in r.stdout
    assert "s2mlpv2_medium: array of 4, world size 16 each" in r.stdout  # the variant's own allocation
    assert "[3] plan-s2mlpv2_medium-3: optim.weight_decay=0.1 train.seed=1" in r.stdout
    assert "sbatch --parsable --array=0-3 --job-name=plan.cs_mixer_tiny" in r.stdout
    assert not (cluster.runs / "sweeps/plan").exists()
    # a swept value that changes nothing (cs_mixer_tiny pins optim.lr) is refused before anything is created
    r = sweep(cluster, "submit", "--config", "cs_mixer_tiny", "--grid", "optim.lr_base=5e-4,1e-3", "--dry-run")
    assert r.returncode == 2 and "grid points 0 and 1 (optim.lr_base=1e-3) resolve to the same run" in r.stderr


def test_sweep_array_nests_runs_and_a_preempted_task_resumes_its_own_run(cluster, digits_root):
    """A 2 x 3 (lr x seed) grid as one job array (1 node each); task 1 is preempted mid-run (SIGUSR2 to its batch
    shell), requeued, and resumes its own run directory and MLflow run, still nested under the parent.
    `sweep.py status` lists the six tasks, then per lr the mean +- sd (n=3) of their best top-1."""
    import statistics

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{cluster.root}/sweep.db"
    r = sweep(cluster, "submit", "--config", "cs_mixer_tiny", "--grid", "optim.lr=1e-3,2e-3", "train.seed=0,1,2",
              "--name", "sw", "--set", f"data.root={digits_root}", "train.epochs=1", "schedule.warmup_epochs=0",
              "train.log_every=1", "tracking.log_model=false", "tracking.system_metrics=false", "--uri", uri,
              "--sbatch-args", f"--nodes=1 --output={cluster.root}/slurm-%x-%j.out")
    assert r.returncode == 0, r.stdout + r.stderr
    array = re.search(r"submitted cs_mixer_tiny: job array (\d+)", r.stdout).group(1)
    task1 = cluster.runs / "sw-cs_mixer_tiny-1"
    wait_for_line(task1 / "logs/rank0.log", r"step 3/22 ")
    cluster.signal_batch_shell(f"{array}_1", "USR2")
    infos = [cluster.wait(f"{array}_{i}") for i in range(6)]
    # only task 1 requeued: `scontrol requeue <array id>` (the last task's SLURM_JOB_ID) would requeue them all
    assert [i["ExitCode"] for i in infos] == ["0:0"] * 6 and [i["Restarts"] for i in infos] == ["0", "1"] + ["0"] * 4, \
        (infos, (task1 / "logs/launch.log").read_text())
    assert re.search(r"\[stop\] signal received: checkpoint \S+ written at step \d+; exit 85",
                     (task1 / "logs/rank0.log").read_text())

    client = MlflowClient(uri)
    parent = mlflow_run(uri, "sw")
    assert parent.data.tags["sweep.role"] == "parent" and parent.data.params["grid.optim.lr"] == "1e-3,2e-3"
    children = {r.info.run_name: r for r in client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert sorted(children) == [f"sw-cs_mixer_tiny-{i}" for i in range(6)]  # one run per task, across the requeue
    assert [(children[n].data.params["optim.lr"], children[n].data.params["train.seed"]) for n in sorted(children)] \
        == [(lr, seed) for lr in ("0.001", "0.002") for seed in "012"]
    assert children["sw-cs_mixer_tiny-1"].data.tags["restart_count"] == "1"

    r = sweep(cluster, "status", "sw")
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.startswith("cs_mixer_tiny[")}
    # task  overrides (lr, seed)  state  epoch  best-top-1  best-EMA  restarts
    assert rows["cs_mixer_tiny[0]"][1:5] == ["optim.lr=1e-3", "train.seed=0", "FINISHED", "1/1"]
    assert rows["cs_mixer_tiny[1]"][1:5] == ["optim.lr=1e-3", "train.seed=1", "FINISHED", "1/1"]
    assert [rows[f"cs_mixer_tiny[{i}]"][-1] for i in range(6)] == ["0", "1", "0", "0", "0", "0"]
    best = [float(rows[f"cs_mixer_tiny[{i}]"][5]) for i in range(6)]
    assert min(best) > 25
    for lr, values in (("1e-3", best[:3]), ("2e-3", best[3:])):  # the seeds of each lr: mean +- sd (n=3)
        assert re.search(rf"cs_mixer_tiny optim\.lr={lr}\s+{statistics.mean(values):.2f} \+- "
                         rf"{statistics.stdev(values):.2f}\s+\(n=3\)", r.stdout), r.stdout
    assert "every task has ended: parent run marked FINISHED" in r.stdout
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert "sweep.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    png = cluster.root / "sw.png"
    r = subprocess.run([sys.executable, "launch/compare.py", "sw", "--uri", uri, "--out", str(png)], cwd=REPO,
                       env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and png.stat().st_size > 10_000, r.stderr
    assert r.stdout.count("best top-1 over 3 seeds") == 2 and f"logged to run {parent.info.run_id}" in r.stdout
