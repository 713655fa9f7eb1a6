#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on the lent GPU machine (Python 3.12, torch preinstalled there):
# DeepSpeed built here as a pure-Python wheel (DS_BUILD_OPS=0: its ops compile at first use) plus its
# needs (psutil: `import deepspeed` fails without it; a manylinux wheel, not pure Python), its
# pure-Python needs, safetensors and the ONNX exporter (onnx, onnxscript), into .whl/ (ignored by git; the
# device tool carries it).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$("$PY" -c 'import deepspeed; print(deepspeed.__version__)')"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  hjson msgpack ninja psutil py-cpuinfo pydantic pydantic-core annotated-types typing-inspection safetensors einops \
  onnx onnxscript onnx-ir ml_dtypes protobuf
ls -la .whl
