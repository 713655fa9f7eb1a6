"""MLflow tracking from rank 0, never a reason for training to stall.

The loop hands records (metrics, params, tags, artifacts, the final status) to `Tracker`, which
only appends them to a bounded in-memory queue. A background thread sends them with `log_batch`
(one HTTP call per batch, not per metric). When the server is slow, down or restarting, what
cannot be sent goes to `<run dir>/tracking_spool.jsonl` and is retried every `retry_s` seconds,
at the end of the run, and at the next start of the run: nothing is lost, and the log says
what was deferred. A resumed run continues the same MLflow run (its id is in the checkpoint),
tags the restart, and drops training points at steps that run already has (an exact resume
recomputes the same values), so no step appears twice.

Default store without any setting: `sqlite:///<train.output_dir>/mlflow.db`, artifacts in
`<train.output_dir>/mlartifacts`; `mlflow ui --backend-store-uri sqlite:///...` shows it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SPOOL = "tracking_spool.jsonl"
RUN_FILE = "tracking_run.json"  # which store, experiment and run the spool belongs to
# Parameters that say where or how a run was kept, not what it trained: runs of one recipe that differ only in
# these and train.seed are seeds of one setting (the off-track check, launch/compare.py).
NOT_A_SETTING = ("train.seed", "train.run_name", "train.output_dir", "train.resume", "train.branch_of", "tracking.",
                 "checkpoint.")
TRAINING_PREFIXES = ("train/", "val/")  # keys deduplicated by step on resume
MAX_BATCH = 1000                        # MLflow's limit of metrics per log_batch


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def run_record(run_dir: Path) -> dict:
    """What a run directory logged to (tracking_run.json: uri, experiment, run_id), once the run was created
    ({} before, or without tracking)."""
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_id_of(run_dir: Path) -> str | None:
    """The MLflow run id a run directory logged to, once the run was created (None before)."""
    return run_record(run_dir).get("run_id")


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go next to its file (MLflow's default, ./mlruns, would land in
    whatever directory the job started in); a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts")
    return None


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise opening a SQLite store across processes: MLflow creates and migrates a new
    database on first open, and two jobs doing that at once leave it half-migrated ("table
    _alembic_tmp_experiments already exists"). A server needs no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_uri(output_dir: str) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def quick_http() -> None:
    """A hung or refusing server costs a request 10 s, not minutes: the tracker retries by itself."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


class Tracker:
    """Rank 0's MLflow run. Every public method returns at once; `finish` waits (bounded)."""

    def __init__(self, uri: str, experiment: str, run_dir: Path, run_name: str, run_id: str | None,
                 artifact_root: str | None = None, system_metrics: bool = True, retry_s: float = 10.0,
                 queue_size: int = 10_000, log=print, background: bool = True, parent_run_id: str | None = None) -> None:
        quick_http()
        self.uri, self.experiment, self.run_name, self.artifact_root = uri, experiment, run_name, artifact_root
        self.run_id, self.resumed = run_id, run_id is not None
        self.parent_run_id = parent_run_id
        self.spool_path = run_dir / SPOOL
        self.retry_s, self.log = retry_s, log
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.skip_until: dict[str, int] = {}
        self._last_logged: dict[str, int] = {}  # per training key, the last step this process logged
        self.deferred = 0      # records written to the spool since it was last emptied
        self._spool_lock = threading.Lock()
        self._step = 0
        self._client = None
        self._offline_since: float | None = None  # set while the server cannot be reached
        self._stop = threading.Event()
        self._write_run_file()
        # Import MLflow here, once, before the sender and the system-metrics threads start: two threads
        # importing it at the same moment fail with "partially initialized module 'mlflow.tracking'",
        # which ended the sender (no run at all) and the metrics (seen with several jobs starting at once).
        import mlflow.tracking  # noqa: F401
        if system_metrics:
            with contextlib.suppress(ImportError):  # psutil missing: _sample_system says so
                import mlflow.system_metrics.system_metrics_monitor  # noqa: F401
        if not background:  # flush_spool: the caller sends synchronously
            return
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        if system_metrics:
            threading.Thread(target=self._sample_system, name="mlflow-system", daemon=True).start()

    # ------------------------------------------------------------------ called by the training loop
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Training points at a step this process already logged for that key are dropped: after a
        rollback the steps between the checkpoint and the bad window run again (with the same values)."""
        self._step = step
        now = int(time.time() * 1000)
        points = []
        for k, v in metrics.items():
            if k.startswith(TRAINING_PREFIXES):
                if step <= self._last_logged.get(k, -1):
                    continue
                self._last_logged[k] = step
            points.append([k, float(v), now, step])
        if points:
            self._put({"kind": "metrics", "points": points})

    def log_params(self, params: dict[str, str]) -> None:
        self._put({"kind": "params", "params": params})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        self._put({"kind": "artifact", "path": str(Path(path).resolve()), "dir": artifact_dir})

    def log_dataset(self, name: str, source: str, digest: str, profile: dict) -> None:
        """The run's dataset input (MLflow's Datasets tab): where it is, a digest of its file list, counts."""
        self._put({"kind": "dataset", "name": name, "source": source, "digest": digest, "profile": profile})

    def register_model(self, name: str, artifact_path: str, tags: dict[str, str]) -> None:
        """A Model Registry version of `name` from this run's artifact (sent after the artifact itself)."""
        self._put({"kind": "register", "name": name, "path": artifact_path, "tags": tags})

    def finish(self, status: str, timeout: float = 60.0) -> None:
        """End the run as FINISHED, FAILED or KILLED after sending what is queued (or spooling it)."""
        self._put({"kind": "status", "status": status})
        self._stop.set()
        self._thread.join(timeout)
        if self.deferred or self._thread.is_alive():
            self.log(f"[tracking] server {self.uri} unreachable: {self.deferred} record(s) kept in "
                     f"{self.spool_path}; they are sent at the next start of this run, or now with "
                     f"`python -m trainer.tracking flush {self.spool_path.parent}`")
        elif self.run_id:
            self.log(f"[tracking] run {self.run_id} {status}; see it with: " + (
                f"mlflow ui --backend-store-uri {self.uri}" if self.uri.startswith("sqlite") else self.uri))

    # ------------------------------------------------------------------ the sender thread
    def _write_run_file(self) -> None:
        info = dict(uri=self.uri, experiment=self.experiment, run_name=self.run_name,
                    artifact_root=self.artifact_root, run_id=self.run_id)
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        (self.spool_path.parent / RUN_FILE).write_text(json.dumps(info, indent=1))

    def _put(self, record: dict) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:  # the sender is far behind: to disk, never block the loop
            self._spool([record])

    def _spool(self, records: list[dict]) -> None:
        with self._spool_lock, open(self.spool_path, "a") as f:
            for r in records:
                f.write(json.dumps({**r, "run_id": r.get("run_id") or self.run_id}) + "\n")
            f.flush()
        self.deferred += len(records)

    def _take_spool(self) -> list[dict]:
        with self._spool_lock:
            if not self.spool_path.is_file():
                return []
            records = [json.loads(line) for line in self.spool_path.read_text().splitlines() if line.strip()]
            self.spool_path.unlink()
            self.deferred = 0
            return records

    def _connect(self) -> bool:
        """Create or resume the run; False while the server cannot be reached."""
        from mlflow.tracking import MlflowClient

        try:
            with store_lock(self.uri):
                client = MlflowClient(self.uri)
                if self.run_id is None:
                    # MLflow's own nesting tag: the UI shows the run under its parent (a sweep's)
                    nest = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
                    self.run_id = client.create_run(self._experiment_id(client), run_name=self.run_name,
                                                    tags=nest).info.run_id
                    self._write_run_file()
                else:
                    client.update_run(self.run_id, status="RUNNING")
            self._client = client
            return True
        except Exception as e:  # noqa: BLE001 - any failure of the server is the same to us: retry later
            self._offline(e)
            return False

    def _experiment_id(self, client) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp:
            return exp.experiment_id
        try:
            return client.create_experiment(self.experiment, artifact_location=self.artifact_root)
        except Exception:  # another job created it meanwhile
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def _offline(self, error: Exception) -> None:
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            self.log(f"[tracking] cannot reach {self.uri} ({type(error).__name__}: {str(error)[:160]}); "
                     f"records go to {self.spool_path} until it is back")

    def _send(self, records: list[dict]) -> None:
        """Send records in order, removing each from the list once the server has it; raises if
        the server fails, leaving in `records` what it does not have yet."""
        from mlflow.entities import Metric, Param, RunTag

        client = self._client
        while records:
            r = records[0]
            run_id = r.get("run_id") or self.run_id
            if r["kind"] == "metrics":
                points = [p for p in r["points"] if not (p[0].startswith(TRAINING_PREFIXES) and
                                                          p[3] <= self.skip_until.get(p[0], -1))]
                for i in range(0, len(points), MAX_BATCH):
                    client.log_batch(run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in points[i:i + MAX_BATCH]])
            elif r["kind"] == "params":
                items = list(r["params"].items())
                for i in range(0, len(items), 100):
                    client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
            elif r["kind"] == "tags":
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in r["tags"].items()])
            elif r["kind"] == "artifact":
                client.log_artifact(run_id, r["path"], r["dir"])
            elif r["kind"] == "status":
                client.set_terminated(run_id, r["status"])
            elif r["kind"] == "dataset":
                from mlflow.entities import Dataset, DatasetInput
                dataset = Dataset(name=r["name"], digest=r["digest"], source_type="local", source=json.dumps(
                    {"uri": r["source"]}), profile=json.dumps(r["profile"]))
                client.log_inputs(run_id, datasets=[DatasetInput(dataset)])
            elif r["kind"] == "register":
                self._register(client, run_id, r)
            records.pop(0)

    def _register(self, client, run_id: str, r: dict) -> None:
        from mlflow.exceptions import MlflowException
        try:
            client.create_registered_model(r["name"])
        except MlflowException as e:  # it exists already: add a version
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        source = f"{client.get_run(run_id).info.artifact_uri}/{r['path']}"
        version = client.create_model_version(r["name"], source, run_id=run_id, tags=r["tags"])
        self.log(f"[tracking] registered {r['name']} version {version.version} ({r['path']})")

    def _learn_logged_steps(self) -> None:
        """On resume: the last step of each training metric the run already has."""
        run = self._client.get_run(self.run_id)
        for key in run.data.metrics:
            if key.startswith(TRAINING_PREFIXES):
                history = self._client.get_metric_history(self.run_id, key)
                self.skip_until[key] = max((m.step for m in history), default=-1)
        if self.skip_until:
            self.log(f"[tracking] resuming run {self.run_id}: training metrics up to step "
                     f"{max(self.skip_until.values())} are already logged")

    def _work(self, final_attempts: int = 3) -> None:
        connected, next_try, learned, attempts = False, 0.0, not self.resumed, 0
        while True:
            stopping = self._stop.is_set()
            batch = []
            try:
                batch.append(self.queue.get(timeout=0.5 if not stopping else 0.01))
                while len(batch) < 256:
                    batch.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            now = time.monotonic()
            if not connected and (now >= next_try or stopping):
                connected = self._connect()
                next_try = now + self.retry_s
            todo = batch
            if connected:
                try:
                    if not learned:  # resumed: first what earlier attempts left (not their end status),
                        backlog = [r for r in self._take_spool() if r["kind"] != "status"]
                        todo = backlog + batch
                        self._send(backlog)  # consumes backlog as it goes
                        todo = batch
                        self._learn_logged_steps()  # then which steps the run has
                        learned = True
                    backlog = self._take_spool()  # older records first
                    todo = backlog + batch
                    self._send(todo)
                    if self._offline_since is not None:
                        self.log(f"[tracking] {self.uri} is back after {time.monotonic() - self._offline_since:.0f} s: "
                                 f"sent {len(backlog)} deferred record(s)")
                        self._offline_since = None
                except Exception as e:  # noqa: BLE001
                    if not learned:
                        todo = backlog + batch
                    connected = False
                    next_try = now + self.retry_s
                    self._offline(e)
            if todo:
                self._spool(todo)
            if stopping and self.queue.empty():
                attempts += 1
                if connected or attempts >= final_attempts:  # all sent, or the spool keeps the rest
                    return
                time.sleep(2.0)

    def _sample_system(self) -> None:
        """CPU, memory, disk, network (and GPU with pynvml) through the same queue, as system/*,
        every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (MLflow's variable; default 10)."""
        try:
            import logging

            logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # tracking_uri: else it opens ./mlflow.db. It opens the store (an MlflowClient) at once, so
            # under the lock: unlocked, it raced another job's first migration of a new SQLite store.
            with store_lock(self.uri):
                monitor = SystemMetricsMonitor(run_id="unused", tracking_uri=self.uri)
        except Exception as e:  # noqa: BLE001 - psutil missing: say so once, train on
            self.log(f"[tracking] no system metrics: {e}")
            return
        while not self._stop.wait(monitor.sampling_interval):
            monitor.collect_metrics()
            metrics = monitor.aggregate_metrics()
            for m in monitor.monitors:
                m.clear_metrics()
            self.log_metrics({f"system/{k}": v for k, v in metrics.items()}, self._step)


def flush_spool(run_dir: Path, uri: str | None = None) -> int:
    """Send a run directory's spooled records now (creating its MLflow run if the server was
    never reached); returns how many were sent."""
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise SystemExit(f"error: {run_file} does not exist: {run_dir} is not a tracked run directory")
    info = json.loads(run_file.read_text())
    tracker = Tracker(uri or info["uri"], info["experiment"], run_dir, info["run_name"], info["run_id"],
                      info["artifact_root"], system_metrics=False, background=False)
    if not tracker.spool_path.is_file():
        return 0
    if not tracker._connect():
        raise SystemExit(f"error: cannot reach {tracker.uri}; the records stay in {tracker.spool_path}")
    records = tracker._take_spool()
    count = len(records)
    try:
        tracker._send(records)
    finally:
        if records:  # what the server did not take goes back to the spool
            tracker._spool(records)
    return count


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description="Send a run's spooled MLflow records: python -m trainer.tracking "
                                            "flush RUN_DIR [--uri URI]")
    p.add_argument("command", choices=["flush"])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--uri", help="default: the store the run was logging to")
    args = p.parse_args()
    print(f"sent {flush_spool(args.run_dir, args.uri)} record(s) from {args.run_dir / SPOOL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


class TrackingAccessDenied(RuntimeError):
    """The tracking server refused this run's credentials (or their absence): a setting to fix, not an
    outage to wait out."""


def check_access(uri: str) -> None:
    """One read against an MLflow server before the run starts. A server that answers 401/403 (MLflow's
    basic-auth app without valid MLFLOW_TRACKING_USERNAME/PASSWORD) is an error now: spooled records
    would wait for credentials that never come. A server that does not answer is the usual outage
    (records spooled, sent later)."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as e:
        status = e.get_http_status_code()
        if status in (401, 403):
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise TrackingAccessDenied(
                f"tracking.uri={uri} refused this run (HTTP {status}"
                f"{', user ' + repr(who) if who else ', no credentials'}): set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (MLflow's own variables; or MLFLOW_TRACKING_TOKEN) to an account of "
                "that server, or tracking.enabled=false") from None
    except Exception:  # noqa: BLE001 - unreachable now: the tracker spools and retries
        return


def start_run_tracking(cfg, run_dir: Path, world_size: int, run_id: str | None, restarts: int, step: int,
                       log) -> Tracker:
    """Rank 0's MLflow run: a new one (params, tags, config files), or the checkpoint's run continued
    with a restart tag."""
    from models import model_info

    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(cfg.train.output_dir)
    quick_http()
    check_access(uri)
    tracker = Tracker(uri, cfg.tracking.experiment, run_dir, run_dir.name, run_id, artifact_root=local_artifact_root(uri),
                      system_metrics=cfg.tracking.system_metrics, retry_s=cfg.tracking.retry_s, log=log,
                      parent_run_id=cfg.tracking.parent_run_id)
    tags = {"world_size": world_size, "restart_count": restarts, "slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
    if "SLURM_JOB_ID" in os.environ:  # SLURM sets the count from the first requeue on
        tags["slurm_restart_count"] = os.environ.get("SLURM_RESTART_COUNT", "0")
    if run_id is None:
        info = model_info(cfg.model.name)
        tracker.log_params(flatten(cfg.to_dict()))
        if cfg.train.branch_of:  # launch/branch.py: a cooldown off a trunk (nested under its run)
            trunk, _, step = cfg.train.branch_of.rpartition("@step_")
            tags.update(branch_of=trunk, branch_step=step)
        tracker.set_tags({**tags, "model": cfg.model.name, "family": info.family, "git_commit": git_commit(),
                          "mlflow.runName": run_dir.name})
        for name in ("config.yaml", "deepspeed_config.json"):
            tracker.log_artifact(run_dir / name)
    else:
        tracker.set_tags({**tags, f"restart_{restarts}_from_step": step})
        for name in ("config.yaml", "deepspeed_config.json"):
            tracker.log_artifact(run_dir / name, f"restart_{restarts}")
    return tracker
