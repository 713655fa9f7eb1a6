"""Hang detection: a rank stuck in a collective (a dead peer, a wedged NCCL/gloo call, a hung input
pipeline) otherwise burns the job's whole time limit silently.

A daemon thread per rank watches for optimizer steps. No step for `timeout` seconds (evaluation and
checkpoints excluded) -> every Python thread's stack of this rank is written to
<run dir>/hang/rank<R>.txt (faulthandler), a line names the rank, host and step, rank 0 records it in
MLflow, and the process exits EXIT_HUNG, which slurm/launch.sh treats like a preemption: requeue and
resume from the last checkpoint. The timeout is train.hang_timeout_s, or derived from the measured
step time: max(HANG_FLOOR_S, HANG_STEP_FACTOR x the step time of the first log window), and
HANG_STARTUP_S until that is measured (the first steps compile and warm up).
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .preflight import node_name

EXIT_HUNG = 86
HANG_FLOOR_S = 300.0
HANG_STEP_FACTOR = 20.0
HANG_STARTUP_S = 1800.0


class HangWatchdog:
    def __init__(self, timeout_s: float | None, run_dir: Path, rank: int,
                 on_hang: Callable[[str, Path], None] | None = None) -> None:
        self.fixed = timeout_s
        self.timeout = timeout_s or HANG_STARTUP_S
        self.run_dir, self.rank, self.on_hang = run_dir, rank, on_hang
        self.host = node_name()
        self.step, self.last, self.paused_depth, self.stopped = 0, time.monotonic(), 0, False
        # test-only "STEP:RANK": that rank blocks after STEP, in a job's first run only (a requeued job,
        # SLURM_RESTART_COUNT >= 1, runs through)
        test_hang = os.environ.get("TRAIN_TEST_HANG_AT_STEP")
        first_run = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
        self.test_hang = tuple(int(v) for v in test_hang.split(":")) if test_hang and first_run else None
        threading.Thread(target=self._watch, name="hang-watchdog", daemon=True).start()

    def beat(self, step: int) -> None:
        """An optimizer step was taken."""
        self.step, self.last = step, time.monotonic()
        if self.test_hang == (step, self.rank):
            time.sleep(10 ** 6)  # test-only: this rank stops; the others block in their next collective

    def measured(self, step_s: float) -> None:
        """The first log window's seconds per step: the timeout it implies, unless one was set."""
        if self.fixed is None:
            self.timeout = max(HANG_FLOOR_S, HANG_STEP_FACTOR * step_s)

    def stop(self) -> None:
        """Training is over (finished or stopped): teardown and export are not steps."""
        self.stopped = True

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoints: long, and not steps."""
        self.paused_depth += 1
        try:
            yield
        finally:
            self.paused_depth -= 1
            self.last = time.monotonic()

    def _watch(self) -> None:
        while not self.stopped:
            time.sleep(max(0.2, min(5.0, self.timeout / 20)))
            idle = time.monotonic() - self.last
            if self.paused_depth == 0 and idle > self.timeout and not self.stopped:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        folder = self.run_dir / "hang"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{self.rank}.txt"
        what = (f"rank {self.rank} on {self.host}: no optimizer step for {idle:.0f} s (timeout {self.timeout:.0f} s) "
                f"after step {self.step}")
        with open(path, "w") as f:
            f.write(what + "\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        print(f"[hang] {what}; every thread's stack in {path}; exit {EXIT_HUNG} (requeue and resume)",
              file=sys.stderr, flush=True)
        if self.on_hang is not None:
            with contextlib.suppress(Exception):
                self.on_hang(what, path)
        # The other ranks stopped stepping at the same step, so their timers run out within about a step
        # of ours. Exiting at once makes srun (--kill-on-bad-exit) terminate them before they dump: the
        # rank that really hung would leave no stacks. Give them that moment.
        time.sleep(min(30.0, max(3.0, 0.1 * self.timeout)))
        os._exit(EXIT_HUNG)
