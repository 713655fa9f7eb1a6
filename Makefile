# The two commands a new user needs (see README.md); both set everything up first.
#   make demo                      train cs_mixer_tiny on the digits set, 2 processes
#   make demo CONFIG=s2mlpv2_tiny  the same for S2-MLPv2
#   make test                      the linter (ruff, pyproject.toml) and the whole test suite
#                                  (PYTEST_ARGS="-k config" to narrow it)
VENV ?= .venv
CONFIG ?= cs_mixer_tiny
NPROC ?= 2
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup demo test
setup:
	@bash scripts/setup_env.sh

demo: setup
	$(VENV)/bin/python launch/prepare_data.py digits --out data/digits
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) launch/train.py --config configs/$(CONFIG).yaml

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
