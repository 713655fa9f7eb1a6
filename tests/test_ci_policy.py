"""CI's rule: with CI=true a skipped test fails the run, unless it is a `gpu` test on a GPU-less machine."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO

INNER = '''
import pytest

def test_needs_something():
    pytest.skip("DALI missing")

@pytest.mark.gpu
def test_needs_gpu():
    import torch
    assert torch.cuda.is_available()

def test_plain():
    assert True
'''


@pytest.mark.parametrize("ci, failed", [("true", 1), ("", 0)])
def test_skips_fail_only_in_ci(tmp_path, ci, failed):
    shutil.copy(REPO / "tests/conftest.py", tmp_path / "conftest.py")
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")  # the markers
    (tmp_path / "test_inner.py").write_text(INNER)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, capture_output=True, text=True, env={"CI": ci, "PATH": "/usr/bin:/bin"})
    summary = result.stdout.strip().splitlines()[-1]
    gpu = torch.cuda.is_available()  # with a GPU the gpu test runs and passes
    if failed:
        expected = "1 failed, 2 passed" if gpu else "1 failed, 1 passed, 1 skipped"
        assert result.returncode == 1 and expected in summary, result.stdout
        assert "skipped in CI (only GPU tests may skip): " in result.stdout and "DALI missing" in result.stdout
    else:
        expected = "2 passed, 1 skipped" if gpu else "1 passed, 2 skipped"
        assert result.returncode == 0 and expected in summary, result.stdout
