"""MLflow tracking against a real `mlflow server` on 127.0.0.1 (stopped and restarted by PID),
and the default local SQLite store read back with MlflowClient."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, run_script

TRAIN = str(REPO / "launch/train.py")
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One `mlflow server` (SQLite store, local artifacts) that a test can stop and start again."""

    ADMIN = ("admin", "an-Admin-passw0rd")

    def __init__(self, root: Path, auth: bool = False) -> None:
        self.root, self.port, self.proc, self.auth = root, free_port(), None, auth
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        auth: list[str] = []
        if self.auth:  # MLflow's basic-auth app, as docs/tracking.md tells a cluster to run it
            (self.root / "auth.ini").write_text(
                f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{self.root / 'auth.db'}\n"
                f"admin_username = {self.ADMIN[0]}\nadmin_password = {self.ADMIN[1]}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(self.root / "auth.ini"), MLFLOW_FLASK_SERVER_SECRET_KEY="test-key")
            auth = ["--app-name", "basic-auth"]
        self.proc = subprocess.Popen(
            [MLFLOW, "server", *auth, "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            env=env, stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not become healthy: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the server and its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module's tests, each in its own experiment; a test that stops it starts it again."""
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def steps_of(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def train_args(tmp_path, digits_root, server, name: str, *extra: str, experiment: str = "t",
               config: str = "cs_mixer_tiny") -> list[str]:
    return [TRAIN, "--config", config, f"data.root={digits_root}", f"train.output_dir={tmp_path}/runs",
            f"train.run_name={name}", f"tracking.uri={server.uri}", f"tracking.experiment={experiment}",
            "tracking.retry_s=1", *extra]


def step_losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step (\d+)/\d+ loss ([0-9.]+)", log)}


@pytest.mark.slow
def test_two_process_run_logs_everything_to_the_server(tmp_path, digits_root, server):
    result = run_script(*train_args(tmp_path, digits_root, server, "full", "train.max_steps=20", "train.log_every=5",
                                    experiment="two-process"),
                        nproc=2, cwd=tmp_path, env={"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    client = server.client()
    run = only_run(client, "two-process")
    assert run.info.status == "FINISHED" and run.info.run_name == "full"
    params = run.data.params
    assert params["model.name"] == "cs_mixer_tiny" and params["train.global_batch"] == "128"
    assert params["deepspeed.zero_stage"] == "2" and len(params) > 50
    tags = run.data.tags
    assert tags["model"] == "cs_mixer_tiny" and tags["family"] == "cs_mixer" and tags["world_size"] == "2"
    assert tags["restart_count"] == "0" and re.fullmatch(r"[0-9a-f]{40}|unknown", tags["git_commit"])
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_sec"):
        assert steps_of(client, run.info.run_id, key) == [5, 10, 15, 20], key
    assert steps_of(client, run.info.run_id, "val/top1") == [11, 20]  # 11 steps per epoch
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    files = artifacts(client, run.info.run_id)
    assert "config.yaml" in files and "deepspeed_config.json" in files
    assert "model/cs_mixer_tiny-step_00000020.safetensors" in files
    assert f"[tracking] run {run.info.run_id} FINISHED" in result.stdout


@pytest.mark.slow
def test_preempt_crash_and_resume_continue_one_run_exactly_without_duplicate_steps(tmp_path, digits_root, server):
    """fp32, S2-MLPv2 with EMA, 2 processes. Attempt 1 is stopped by SIGUSR1 on one rank only (the ranks agree,
    checkpoint, KILLED); attempt 2 is SIGKILLed after it logged steps past its last checkpoint; attempt 3 resumes
    from that checkpoint and finishes: one MLflow run with every step once, and the losses step for step, the
    weights and the EMA of an uninterrupted run."""
    extra = ("train.max_steps=24", "train.log_every=1", "checkpoint.every_steps=8", "deepspeed.bf16=false",
             "train.model_ema=true", "train.model_ema_decay=0.9", "deepspeed.zero_stage=1", "data.workers=1")
    args = train_args(tmp_path, digits_root, server, "r", *extra, experiment="preempt", config="s2mlpv2_tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run_until(marker: str, sig: int) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node=2", *args], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out = []
        for line in proc.stdout:
            out.append(line)
            if marker in line:
                if sig == signal.SIGKILL:  # the whole job dies at once, as on a node failure
                    launcher = psutil.Process(proc.pid)
                    for p in [*launcher.children(recursive=True), launcher]:  # workers have their own sessions
                        p.send_signal(signal.SIGKILL)
                else:
                    psutil.Process(proc.pid).children()[-1].send_signal(sig)  # one rank only
                marker = "\0"
        proc.wait(timeout=300)
        return "".join(out)

    full = run_script(*train_args(tmp_path, digits_root, server, "full", *extra, experiment="preempt-reference",
                                  config="s2mlpv2_tiny"), nproc=2, cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    first = run_until("step 4/24", signal.SIGUSR1)
    assert "[stop] signal received" in first, first[-2000:]
    stopped = int(re.search(r"written at step (\d+)", first).group(1))
    assert 4 <= stopped < 8
    client = server.client()
    run = only_run(client, "preempt")
    assert run.info.status == "KILLED"
    second = run_until("step 10/24", signal.SIGKILL)  # checkpoint at 8; steps 9 and 10 logged after it
    assert f"[resume] {tmp_path}/runs/r/checkpoints/step_{stopped:08d}" in second
    third = run_script(*args, nproc=2, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"[resume] {tmp_path}/runs/r/checkpoints/step_00000008: step 8" in third.stdout, (second[-1500:], third.stdout[-3000:])
    run = only_run(client, "preempt")
    assert run.info.status == "FINISHED" and run.data.tags["restart_count"] == "2"
    assert "restart_1_from_step" in run.data.tags and run.data.tags["restart_2_from_step"] == "8"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 25))  # every step once
    # the same continuation as the uninterrupted run: losses, weights and EMA
    reference = step_losses(full.stdout)
    resumed = {**step_losses(first), **step_losses(second), **step_losses(third.stdout)}
    assert sorted(resumed) == list(range(1, 25)) and resumed == reference, (resumed, reference)
    assert all(reference[s] == v for s, v in step_losses(second).items())  # the killed attempt's steps too
    a = torch.load(tmp_path / "runs/full/checkpoints/step_00000024/mp_rank_00_model_states.pt", weights_only=False)
    b = torch.load(tmp_path / "runs/r/checkpoints/step_00000024/mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
    ema_a, ema_b = (torch.load(tmp_path / f"runs/{n}/checkpoints/step_00000024/ema.pt") for n in ("full", "r"))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


@pytest.mark.slow
def test_server_outage_loses_nothing_and_does_not_stop_training(tmp_path, digits_root, server):
    """The server goes away at step 10 and comes back while training goes on; later it is down at
    the end of a run, whose records wait in the spool until `python -m trainer.tracking flush`."""
    args = train_args(tmp_path, digits_root, server, "o", "train.max_steps=120", "train.log_every=1",
                      "checkpoint.every_steps=0", experiment="outage")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *args], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    out, restarted = [], False
    for line in proc.stdout:
        out.append(line)
        if "step 10/120" in line and not restarted:
            server.stop()
            server.start()  # down for the server's start-up time (several seconds, many steps)
            restarted = True
    assert proc.wait(timeout=600) == 0
    log = "".join(out)
    assert "[tracking] cannot reach" in log and re.search(r"\[tracking\] \S+ is back after \d+ s: sent \d+ deferred", log)
    ips = [float(x) for x in re.findall(r" (\d+) img/s", log)]
    print(f"img/s, steps 2-10: {sorted(ips[1:10])[4]:.0f} median; during/after the outage, steps 11-120: "
          f"{sorted(ips[10:])[len(ips[10:]) // 2]:.0f} median")
    client = server.client()
    run = only_run(client, "outage")
    assert run.info.status == "FINISHED"
    assert steps_of(client, run.info.run_id, "train/loss") == list(range(1, 121))
    assert not (tmp_path / "runs/o/tracking_spool.jsonl").exists()

    server.stop()  # down at the end of the next run
    down = run_script(*train_args(tmp_path, digits_root, server, "d", "train.max_steps=12", "train.log_every=1",
                                  experiment="outage-at-the-end"), nproc=2, cwd=tmp_path)
    assert down.returncode == 0, down.stderr[-3000:]
    spool = tmp_path / "runs/d/tracking_spool.jsonl"
    assert spool.is_file() and "kept in" in down.stdout
    server.start()
    flushed = run_script("-m", "trainer.tracking", "flush", str(tmp_path / "runs/d"), "--uri", server.uri)
    assert flushed.returncode == 0, flushed.stderr[-3000:]
    run = only_run(client, "outage-at-the-end")
    assert run.info.status == "FINISHED" and steps_of(client, run.info.run_id, "train/loss") == list(range(1, 13))
    assert "model/cs_mixer_tiny-step_00000012.safetensors" in artifacts(client, run.info.run_id)
    assert not spool.exists()


def test_default_local_store_opens_with_mlflow_ui_and_the_client(tmp_path, digits_root):
    result = run_script(TRAIN, "--config", "s2mlpv2_tiny", f"data.root={digits_root}",
                        f"train.output_dir={tmp_path}/runs", "train.run_name=local", "train.max_steps=6",
                        "train.log_every=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    db = tmp_path / "runs/mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in result.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    run = only_run(client, "s2mlpv2")
    assert run.info.status == "FINISHED" and steps_of(client, run.info.run_id, "train/loss") == [2, 4, 6]
    assert "model/s2mlpv2_tiny-step_00000006.safetensors" in artifacts(client, run.info.run_id)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()  # nothing in the cwd
    assert (tmp_path / "runs/mlartifacts").is_dir()
    port = free_port()
    ui = subprocess.Popen([MLFLOW, "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True,
                          env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        from mlflow.tracking import MlflowClient as Client

        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        served = Client(f"http://127.0.0.1:{port}").get_run(run.info.run_id)
        assert served.data.metrics["train/loss"] == run.data.metrics["train/loss"]
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)

    # the run's page in headless Chromium: the metric charts are drawn (their blue lines are there)
    png = tmp_path / "run.png"
    shot = subprocess.run(["bash", str(REPO / "scripts/mlflow_screenshot.sh"), str(tmp_path / "runs"), "local", str(png)],
                          capture_output=True, text=True, timeout=300)
    assert shot.returncode == 0, shot.stderr[-2000:]
    from PIL import Image

    image = Image.open(png).convert("RGB")
    assert image.size == (1600, 1400)
    blue = sum(1 for r, g, b in image.crop((200, 250, 1150, 1400)).get_flattened_data() if b > 150 and b > r + 80)
    assert blue > 1000, f"{blue} chart-line pixels: the charts did not render"


def test_sqlite_stores_keep_artifacts_beside_the_database(tmp_path):
    """Not in ./mlruns of whatever directory a job started in (it once landed in the repository)."""
    from trainer.tracking import local_artifact_root

    assert local_artifact_root(f"sqlite:///{tmp_path}/db/t.db") == str(tmp_path / "db/mlartifacts")
    assert local_artifact_root("http://127.0.0.1:5000") is None


CONCURRENT_CONNECT = """
import os, sys, time
from pathlib import Path
os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
from trainer.tracking import Tracker
uri, run_dir, start = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))
tracker = Tracker(uri, "shared", run_dir, run_dir.name, None, system_metrics=True,
                  log=lambda *a: print(*a, file=sys.stderr))
time.sleep(8)  # a few system-metrics samples (opening the store is serialised across the 4 jobs)
tracker.finish("FINISHED")
"""


def test_jobs_opening_a_new_sqlite_store_at_once_all_get_their_run(tmp_path):
    """Two SLURM jobs once created the same new store together and left it half-migrated; later one of
    two jobs starting together lost its system metrics ("Online migration expected to match one row"):
    four trackers start at the same instant on a new store, each gets its run and its system/* metrics."""
    script = tmp_path / "connect.py"
    script.write_text(CONCURRENT_CONNECT)
    uri, start = f"sqlite:///{tmp_path}/store/mlflow.db", time.time() + 8  # all imports done by then
    procs = [subprocess.Popen([sys.executable, str(script), uri, str(tmp_path / f"run{i}"), str(start)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2", "run3"]
    assert not any("no system metrics" in e for e in errors), errors
    for run in runs:
        assert run.info.status == "FINISHED" and any(k.startswith("system/") for k in run.data.metrics), run


def test_the_off_track_query_opens_the_store_under_the_trackers_lock(tmp_path):
    """The off-track check opens the store from the training loop. Opening a new SQLite store migrates it,
    and beside another job's migration that left it half-migrated (seen in the suite: "table
    _alembic_tmp_params already exists" for every later client). It now waits for the same lock as the
    trackers: while another holder has the lock, it has not touched the database file."""
    import threading

    from trainer.tracking import store_lock
    from trainer.trainer import earlier_settings

    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    result: list[dict] = []
    with store_lock(uri):  # another job creating the store
        query = threading.Thread(target=lambda: result.append(earlier_settings(uri, "e", "r", "x", print)))
        query.start()
        query.join(3)
        assert query.is_alive() and not db.exists()  # waiting; the database not opened
    query.join(120)
    assert result == [{}] and db.exists()  # then it opened (and created) the store: no runs yet


@pytest.mark.slow
def test_a_server_with_authentication_refuses_a_run_without_credentials(tmp_path, monkeypatch):
    """MLflow's basic-auth app: a run without credentials stops at start with an error naming MLflow's
    variables (its records would otherwise wait in the spool for ever); a user's run authenticated through
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD logs everything."""
    import base64
    import json as jsonlib

    server = MlflowServer(tmp_path, auth=True)
    server.start()
    try:
        token = base64.b64encode(":".join(server.ADMIN).encode()).decode()
        request = urllib.request.Request(f"{server.uri}/api/2.0/mlflow/users/create", method="POST",
                                         data=jsonlib.dumps({"username": "trainer", "password": "a-Trainer-pw1"}).encode(),
                                         headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"})
        assert urllib.request.urlopen(request, timeout=30).status == 200
        args = [TRAIN, "--config", "cs_mixer_tiny", "data.backend=synthetic", "data.synthetic_size=256",
                "train.max_steps=4", "train.log_every=2", f"tracking.uri={server.uri}", "tracking.experiment=auth",
                f"train.output_dir={tmp_path}/runs"]
        clean = {k: "" for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")}
        refused = run_script(*args, "train.run_name=anonymous", cwd=tmp_path, env=clean)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert f"tracking.uri={server.uri} refused this run (HTTP 401, no credentials): set " \
               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in refused.stderr
        creds = {**clean, "MLFLOW_TRACKING_USERNAME": "trainer", "MLFLOW_TRACKING_PASSWORD": "a-Trainer-pw1"}
        logged = run_script(*args, "train.run_name=signed", cwd=tmp_path, env=creds)
        assert logged.returncode == 0, logged.stderr[-2000:]
        for k, v in creds.items():
            monkeypatch.setenv(k, v)
        client = server.client()
        run = only_run(client, "auth")
        assert run.info.status == "FINISHED" and run.info.run_name == "signed"
        assert steps_of(client, run.info.run_id, "train/loss") == [2, 4]
        assert run.data.params["model.name"] == "cs_mixer_tiny" and "val/top1" in run.data.metrics
        assert {"config.yaml", "deepspeed_config.json"} <= set(artifacts(client, run.info.run_id))
    finally:
        server.stop()
