"""Every command shown in README.md, slurm/README.md and docs/*.md exists and parses: scripts and sbatch
files exist, their flags are accepted (checked against each script's own argparse --help),
config names resolve and `section.key=value` overrides are valid keys and values."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script
from trainer.config import find_config, load_config

DOCS = [REPO / "README.md", REPO / "slurm/README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAMS = ("python", "torchrun", "deepspeed", "sbatch", "make", "scripts/", "bash", "mlflow")


def commands() -> list[tuple[str, str]]:
    """(doc name, command) for each command line in the docs' ```bash blocks (continuations joined)."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"^([A-Z_]+=\S*\s+)+", "", line.split(" #")[0].strip())  # env settings
                if line.startswith(PROGRAMS):
                    found.append((doc.name, line))
    return found


def test_the_docs_show_the_commands_users_need():
    shown = " ".join(cmd for _, cmd in commands())
    for needed in ("make demo", "make test", "launch/train.py", "launch/evaluate.py", "launch/export.py",
                   "launch/prepare_data.py", "sbatch slurm/cs_mixer_l.sbatch", "deepspeed --hostfile"):
        assert needed in shown, needed


_help_cache: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def prefetched_help():
    """Every script's --help, two at a time (each is a process start): what the command checks compare with."""
    from concurrent.futures import ThreadPoolExecutor

    scripts = sorted({w for _, cmd in commands() for w in shlex.split(cmd) if w.endswith(".py") and (REPO / w).is_file()}
                     | {"scripts/gpu_check.py"})
    with ThreadPoolExecutor(2) as pool:
        for script, result in zip(scripts, pool.map(lambda s: run_script(s, "--help"), scripts)):
            if result.returncode == 0:  # a failure is reported by the test that needs it
                _help_cache[script] = result.stdout


def script_help(script: str) -> str:
    if script not in _help_cache:
        result = run_script(script, "--help")
        assert result.returncode == 0, f"{script} --help failed: {result.stderr[-1000:]}"
        _help_cache[script] = result.stdout
    return _help_cache[script]


def check_python_command(words: list[str]) -> None:
    script = next(w for w in words if w.endswith(".py"))
    assert (REPO / script).is_file(), f"{script} does not exist"
    args = words[words.index(script) + 1:]
    help_text = script_help(script)
    usage = help_text.split("\n\n")[0]
    if args and not args[0].startswith("-") and re.search(r"(\]|\.py)\s+\{", usage):  # a subcommand
        assert args[0] in help_text, f"{script}: no subcommand {args[0]}"
        help_text = run_script(script, args[0], "--help").stdout
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", help_text), f"{script}: no option {flag}"
    if script == "launch/sweep.py":  # its --dry-run resolves every grid point itself
        if "--dry-run" in args:
            result = run_script(script, *args)
            assert result.returncode == 0, f"{' '.join(words)}: {result.stderr[-1000:]}"
        return
    if script == "launch/train.py" or "--config" in args:
        config = args[args.index("--config") + 1] if "--config" in args else None
        overrides = [a for a in args if re.fullmatch(r"[a-z_]+\.[a-z_]+=\S*", a)]
        load_config(find_config(config or "cs_mixer_tiny"), overrides)  # raises ConfigError if not


@pytest.mark.parametrize("doc, command", commands(), ids=[c for _, c in commands()])
def test_command_exists_and_parses(doc, command):
    words = shlex.split(command)
    program = words[0]
    if program == "make":
        targets = re.findall(r"^([a-z]+):", (REPO / "Makefile").read_text(), re.M)
        assert words[1] in targets, f"make {words[1]}: no such target"
    elif program == "sbatch":
        batch = next(w for w in words if w.endswith(".sbatch"))
        assert (REPO / batch).is_file()
        config = re.search(r'launch\.sh" (\S+)', (REPO / batch).read_text()).group(1)
        overrides = [w for w in words[words.index(batch) + 1:] if "=" in w]
        load_config(find_config(config), overrides)
    elif program in ("python", "torchrun", "deepspeed"):
        if program == "python" and words[1] == "-m":
            assert subprocess.run([sys.executable, "-m", words[2], "--help"], cwd=REPO,
                                  capture_output=True).returncode == 0
        else:
            check_python_command(words)
    elif program in ("bash",) or program.startswith("scripts/"):
        script = words[1] if program == "bash" else program
        assert (REPO / script).is_file(), f"{script} does not exist"
        if script == "scripts/gpu_check.sh":  # its options are gpu_check.py's
            help_text = script_help("scripts/gpu_check.py")
            for flag in (w for w in words[2:] if w.startswith("--")):
                assert flag in help_text, f"{script}: no option {flag}"
    elif program == "mlflow":
        assert words[1] in ("ui", "server")
        help_text = subprocess.run([str(Path(sys.executable).parent / "mlflow"), words[1], "--help"], capture_output=True,
                                   text=True).stdout
        for flag in (w for w in words[2:] if w.startswith("--")):
            assert flag in help_text, f"mlflow {words[1]}: no option {flag}"
