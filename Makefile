# tumorsynth: `make demo` and `make test` each set themselves up on a fresh Debian machine (venv, pip, apt when root).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= demo-out
APT_PKGS := openmpi-bin libopenmpi-dev

.PHONY: all setup system-deps demo demo-slurm test lint bench clean

all: test

# System packages the Python stack needs: OpenMPI (runtime library and mpirun for mpi4py).
system-deps:
	@if ! command -v mpirun >/dev/null 2>&1 || ! ldconfig -p | grep -q libmpi.so; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(APT_PKGS) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	  else \
	    echo "OpenMPI is missing and this is not root: run 'sudo apt-get install $(APT_PKGS)', then make again" >&2; \
	    exit 1; \
	  fi; \
	fi

# The venv. torch==2.13.0 is installed first when absent (the local CPU wheel), so pip never pulls a CUDA build;
# on a GPU cluster install your CUDA build of torch into the venv before `make setup`.
$(STAMP): setup.py | system-deps
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 needed ($(PY))" >&2; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	@$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/tumorsynth demo --out $(DEMO)

# The same demo as SLURM jobs on the local single-node cluster (root; slurm/local/start.sh installs and starts it).
demo-slurm: setup
	slurm/local/start.sh
	SLURM_CONF=$${TUMORSYNTH_SLURM_DIR:-/tmp/tumorsynth-slurm}/slurm.conf \
	  $(BIN)/tumorsynth demo --out $(DEMO)-slurm --cluster slurm --profile local

test: setup
	@start=$$(date +%s); \
	$(BIN)/python -m pytest; status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$status

lint: setup
	$(BIN)/ruff check toolkit jobs tests

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info .pytest_cache .ruff_cache
