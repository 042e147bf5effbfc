# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export TRITON_CACHE_DIR ?= $(CURDIR)/.cache/triton
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: venv data demo test test-fast bench clean

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

clean:
	rm -rf .cache runs
