"""Test-suite policy and shared fixtures.

In CI (CI=true) a skipped test is a hidden gap: it fails the run, unless the test is marked
`gpu` and there is no GPU. Locally, skips are reported as usual.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not item.get_closest_marker("gpu"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (only GPU tests may skip): {reason}"


def run_script(*args: str, cwd: Path | str = REPO, env: dict | None = None, timeout: float = 600,
               nproc: int = 0) -> subprocess.CompletedProcess:
    """Run a repo script as a user would: `python launch/x.py ...`, or under torchrun with nproc > 0."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, *args] if not nproc else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from data_pipeline import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root, size=32)
    return root
