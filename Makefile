# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export TRITON_CACHE_DIR ?= $(CURDIR)/.cache/triton
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

# GPU hosts bring their own PyTorch: these targets use $(PYTHON) as it is and install nothing.
PYTHON  ?= python3
OUT     ?= runs/gpu-check

.PHONY: venv data demo test test-fast test-gpu gpu-check bench clean

venv: $(STAMP)
$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package (real data, installs offline from the registry).
data: $(FMNIST)
$(FMNIST):
	@if [ "$$(id -u)" = "0" ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) ; \
	else \
	  sudo apt-get install -y -q dataset-fashion-mnist ; \
	fi
	@test -f $(FMNIST) || { echo "Fashion-MNIST missing: run 'apt-get install dataset-fashion-mnist' as root" >&2; exit 2; }

demo: venv data
	$(PY) -m engine.cli demo

test: venv data
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: venv
	$(PY) -m pytest -q -p no:cacheprovider tests -m "not slow"

# The CUDA tier, in its own process, on the GPU, without the Triton interpreter.
test-gpu:
	IJEPA_TEST_TIER=cuda $(PYTHON) -m pytest -q -p no:cacheprovider -rs -m cuda tests/cuda

# Validate and measure on one GPU in at most 10 minutes: $(OUT)/gpu-report.md (+ .json).
# DRY=1: the same script on the CPU under the interpreter with tiny shapes (make test runs it).
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --out $(OUT) $(if $(DRY),--dry-run) $(if $(REFERENCE),--reference $(REFERENCE))

clean:
	rm -rf .cache runs
