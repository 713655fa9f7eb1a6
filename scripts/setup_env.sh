#!/usr/bin/env bash
# Sets up everything the project needs on a fresh Debian machine with Python 3.11:
# Debian packages (as root), a virtual environment in .venv, torch first, then the rest
# pinned against it. Idempotent; a no-op (well under a second) when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# Debian packages: FFCV builds against libturbojpeg + OpenCV; SLURM and munge run the local
# test cluster; numactl backs DeepSpeed's --bind_cores_to_rank; chromium renders the MLflow UI.
DEB_PACKAGES=(libturbojpeg0-dev libopencv-dev pkg-config munge slurm-wlm numactl chromium)
STAMP_INPUTS=(scripts/setup_env.sh setup.cfg pyproject.toml constraints.txt)
stamp_value() { cat "${STAMP_INPUTS[@]}" | sha256sum | cut -d' ' -f1; }
STAMP="$VENV/.setup-stamp"

missing_debs=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing_debs+=("$p")
done

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_value)" && ${#missing_debs[@]} -eq 0 ]]; then
  exit 0
fi

if [[ ${#missing_debs[@]} -gt 0 ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    echo "[setup] apt-get install ${missing_debs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
  else
    echo "[setup] WARNING: not root, so the Debian packages ${missing_debs[*]} are not installed." >&2
    echo "[setup]   Without them: FFCV cannot be built (no .beton backend), the local SLURM cluster" >&2
    echo "[setup]   and its tests cannot run, and the MLflow UI screenshot check has no browser." >&2
    echo "[setup]   Ask an administrator to run: apt-get install ${missing_debs[*]}" >&2
  fi
fi

[[ -x "$VENV/bin/python" ]] || { echo "[setup] creating $VENV with $PY"; "$PY" -m venv "$VENV"; }
# pip's "Location ... is ignored" lines come from this machine's global find-links: noise.
pip_install() {
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
# Torch first, by itself, with the torchvision built for it (timm imports torchvision): PyPI's
# torch 2.14.1 wheel is the CUDA build, which also runs on a CPU, so clusters and CPU machines run
# the same bits. torch 2.13.0's CPU wheel had no matching torchvision on PyPI, so timm could not
# import beside it.
pip_install torch==2.14.1 torchvision==0.29.1
# DeepSpeed's build isolation would pull a different torch into its build env: build against ours.
"$VENV/bin/python" -c "import deepspeed" 2>/dev/null || {
  pip_install -c constraints.txt setuptools wheel
  DS_BUILD_OPS=0 pip_install -c constraints.txt --no-build-isolation deepspeed
}
extras=all
if ! pkg-config --exists opencv4 2>/dev/null; then
  echo "[setup] WARNING: OpenCV (libopencv-dev) not found: installing without FFCV." >&2
  extras=dali,tracking,export,test
elif ! "$VENV/bin/python" -c "import ffcv" 2>/dev/null; then
  # FFCV's setup.py imports numpy and pkgconfig at build time.
  pip_install -c constraints.txt numpy pkgconfig cython
  pip_install -c constraints.txt --no-build-isolation ffcv
fi
pip_install -c constraints.txt -e ".[$extras]"
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.split("+")[0] == "2.14.1", f"torch was replaced: {torch.__version__}"
import timm, torchvision  # noqa: E401,F401  (fails here, not in a test, if they do not match)
PY
# DeepSpeed JIT-compiles its shared-memory collective op (~30 s) at the first multi-process start on a CPU:
# compile it now, into the venv's torch_extensions where the Makefile and slurm/launch.sh point, not in a
# user's first run (or a test's). GPU hosts use NCCL and skip it.
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(cd "$VENV" && pwd)/torch_extensions} "$VENV/bin/python" - <<'PY'
import torch
if not torch.cuda.is_available():
    from trainer import distributed  # noqa: F401  (names DeepSpeed's accelerator before it is imported)
    from deepspeed.accelerator import get_accelerator
    get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
    print("[setup] DeepSpeed's shm op compiled")
PY
stamp_value > "$STAMP"
echo "[setup] done: $VENV (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
