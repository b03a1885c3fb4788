# Makefile - every set-up step on a fresh machine: OpenBLAS (apt-get), the .venv, the editable
# install with its dependency groups, the in-place build of hvae._core; then the jobs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CSRC   := $(wildcard csrc/*.c csrc/*.h)

.PHONY: build test demo blas clean

build: $(VENV)/.installed hvae/_core.stamp

# OpenBLAS and pkg-config from Debian's packages, when pkg-config cannot find them
blas:
	@pkg-config --exists openblas 2>/dev/null || { \
	  echo "installing libopenblas-dev and pkg-config with apt-get"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq libopenblas-dev pkg-config; }

$(VENV)/.installed: pyproject.toml setup.py | blas
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

hvae/_core.stamp: $(CSRC) setup.py $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace
	touch $@

test: build
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info hvae/*.so hvae/_core.stamp
