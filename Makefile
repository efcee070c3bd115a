# tumorsynth: `make demo` and `make test` each set themselves up on a fresh Debian machine (venv, pip, apt when root).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= demo-out
APT_PKGS := openmpi-bin libopenmpi-dev hdf5-tools

.PHONY: all setup system-deps extras horovod demo demo-slurm test lint bench gpu-check clean

all: test

# System packages: OpenMPI (runtime library and mpirun for mpi4py), HDF5's tools (h5dump reads a gzip store in a test).
system-deps:
	@if ! command -v mpirun >/dev/null 2>&1 || ! command -v h5dump >/dev/null 2>&1 || ! ldconfig -p | grep -q libmpi.so; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(APT_PKGS) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	  else \
	    echo "OpenMPI or h5dump is missing and this is not root: run 'sudo apt-get install $(APT_PKGS)', then make again" >&2; \
	    exit 1; \
	  fi; \
	fi

# pip compiles every installed module to bytecode, ~20 s for torch alone on 2 cores, most of it never imported; the venv
# skips that and instead writes the bytecode of what the toolkit imports, once (WARM). Without it, a shell that sets
# PYTHONDONTWRITEBYTECODE (as our 2-core machines do) recompiles torch in every process: `import torch` took ~6 s
# instead of 1.7 s, torch._dynamo (which torch.optim imports) ~13 s instead of 2.8 s, and the demo starts ~20
# processes, the tests hundreds.
PIP_FAST := --no-compile
define WARM
import importlib, pkgutil, torch._dynamo, toolkit
for m in pkgutil.walk_packages(toolkit.__path__, 'toolkit.'):
    try: importlib.import_module(m.name)
    except ImportError: pass  # a module of an optional extra that is not installed (yet)
endef
export WARM
warm = env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c "$$WARM"

# The venv. torch==2.13.0 is installed first when absent (the local CPU wheel), so pip never pulls a CUDA build;
# on a GPU cluster install your CUDA build of torch into the venv before `make setup`.
$(STAMP): setup.py | system-deps
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "Python >= 3.10 needed ($(PY))" >&2; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIP_FAST) --upgrade pip setuptools wheel
	@$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q $(PIP_FAST) torch==2.13.0
	$(BIN)/python -m pip install -q $(PIP_FAST) -e '.[dev]'
	@$(warm)
	@touch $(STAMP)

setup: $(STAMP)

# The optional stacks `make test` covers too: TensorFlow/Keras (extra `keras`), ONNX (extra `onnx`) and Horovod.
EXTRAS_STAMP := $(VENV)/.extras
$(EXTRAS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q $(PIP_FAST) -e '.[dev,keras,onnx]'
	@$(warm)
	@touch $(EXTRAS_STAMP)

extras: $(EXTRAS_STAMP)

# Horovod 0.28.1 for PyTorch (MPI + Gloo; no TensorFlow/MXNet ops), built from its sdist. Its CMake files ask for C++14,
# which torch >= 2.1's headers reject, so both are raised to C++17. Python <= 3.11 (its build uses distutils). The wheel
# is cached per torch version in $(WHEELHOUSE), so a later venv installs it in seconds. If the build fails, the reason
# lands in $(HOROVOD_STATUS), which the Horovod tests print when they skip.
HOROVOD_VERSION := 0.28.1
WHEELHOUSE ?= $(HOME)/.cache/tumorsynth/wheels
HOROVOD_STATUS := $(VENV)/.horovod-unavailable
define build_horovod
set -e; \
py=$(BIN)/python; \
if $$py -c 'import horovod.torch' 2>/dev/null; then rm -f $(HOROVOD_STATUS); exit 0; fi; \
fail() { echo "$$1" > $(HOROVOD_STATUS); echo "make horovod: $$1" >&2; exit 1; }; \
$$py -c 'import sys; sys.exit(sys.version_info >= (3, 12))' || fail "Horovod $(HOROVOD_VERSION) builds on Python <= 3.11 only"; \
torch=$$($$py -c 'import torch; print(torch.__version__)'); \
house=$(WHEELHOUSE)/torch-$$torch; mkdir -p $$house; \
wheel=$$(ls $$house/horovod-$(HOROVOD_VERSION)-*.whl 2>/dev/null | head -n 1); \
if [ -z "$$wheel" ]; then \
  command -v cmake >/dev/null || $$py -m pip install -q cmake || fail "no cmake and pip could not install it"; \
  command -v mpicxx >/dev/null || fail "no MPI compiler wrapper (mpicxx): install libopenmpi-dev"; \
  $$py -m pip install -q cloudpickle psutil pyyaml packaging || fail "pip could not install Horovod's build deps"; \
  src=$$(mktemp -d); trap 'rm -rf $$src' EXIT; \
  $$py -m pip download -q --no-deps --no-binary :all: -d $$src horovod==$(HOROVOD_VERSION) \
    || fail "pip could not download the horovod==$(HOROVOD_VERSION) sdist"; \
  tar -xzf $$src/horovod-$(HOROVOD_VERSION).tar.gz -C $$src; \
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' $$src/horovod-$(HOROVOD_VERSION)/CMakeLists.txt \
    $$src/horovod-$(HOROVOD_VERSION)/horovod/torch/CMakeLists.txt; \
  echo "building Horovod $(HOROVOD_VERSION) against torch $$torch (a few minutes; log: $$house/build.log)"; \
  start=$$(date +%s); \
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_MPI=1 \
    HOROVOD_WITH_GLOO=1 MAKEFLAGS=-j$$(nproc) \
    $$py -m pip wheel --no-deps --no-build-isolation -w $$house $$src/horovod-$(HOROVOD_VERSION) > $$house/build.log 2>&1 \
    || fail "the Horovod build failed: see $$house/build.log"; \
  echo "built Horovod in $$(( $$(date +%s) - start )) s"; \
  wheel=$$(ls $$house/horovod-$(HOROVOD_VERSION)-*.whl | head -n 1); \
fi; \
$$py -m pip install -q $$wheel || fail "pip could not install $$wheel"; \
$$py -c 'import horovod.torch as h; assert h.mpi_built() and h.gloo_built()' || fail "Horovod imports without MPI or Gloo"; \
rm -f $(HOROVOD_STATUS)
endef

horovod: setup
	@$(build_horovod)

demo: setup
	$(BIN)/tumorsynth demo --out $(DEMO)

# The same demo as SLURM jobs on the local single-node cluster (root; slurm/local/start.sh installs and starts it).
demo-slurm: setup
	slurm/local/start.sh
	SLURM_CONF=$${TUMORSYNTH_SLURM_DIR:-/tmp/tumorsynth-slurm}/slurm.conf \
	  $(BIN)/tumorsynth demo --out $(DEMO)-slurm --cluster slurm --profile local

# The Horovod build may fail on a machine without a compiler or MPI headers: its tests then skip, saying why.
test: setup extras
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory horovod || true; \
	$(BIN)/python -m pytest; status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$status

# Every GPU path for real (~8 min; needs a CUDA build of torch in the venv): one OK/FAILED table, figures vs targets.
gpu-check: setup
	$(BIN)/tumorsynth check gpu $(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT))

lint: setup
	$(BIN)/ruff check toolkit jobs tests

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info .pytest_cache .ruff_cache
