# Makefile - every set-up step on a fresh machine: the .venv, the editable install with its
# dependency groups (test, docs and mpi; OpenBLAS comes from PyPI's scipy-openblas32 wheel), the
# in-place build of hvae._core; then the jobs. HVAE_BLAS_PKG=openblas builds against Debian's
# libopenblas-dev instead (installed with apt-get when pkg-config cannot find it).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CSRC   := $(wildcard csrc/*.c csrc/*.h)

.PHONY: build test docs demo blas blas-system clean bench-speed bench-mnist bench-mnist2 \
        notebooks lab sanitize valgrind FORCE

build: $(VENV)/.installed hvae/_core.stamp

# with HVAE_BLAS_PKG=openblas: OpenBLAS and pkg-config from Debian's packages, when pkg-config
# cannot find them (the default BLAS is the scipy-openblas32 wheel: nothing to install here)
blas:
	@[ "$(HVAE_BLAS_PKG)" != openblas ] || pkg-config --exists openblas 2>/dev/null || { \
	  echo "installing libopenblas-dev and pkg-config with apt-get"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq libopenblas-dev pkg-config; }

$(VENV)/.installed: pyproject.toml setup.py | blas
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,docs,mpi]"
	touch $@

# the old library is unlinked first: a running process keeps its copy instead of seeing it change;
# --force: setuptools would reuse objects and a library built with other flags (another BLAS)
hvae/_core.stamp: $(CSRC) setup.py $(VENV)/.installed build/blas-choice
	rm -f hvae/_core*.so
	$(PY) setup.py -q build_ext --inplace --force
	touch $@

# the BLAS settings of the last build: rewritten (so the extension is rebuilt) when they change
BLAS_CHOICE := $(HVAE_BLAS_PKG)|$(HVAE_BLAS_CFLAGS)|$(HVAE_BLAS_LIBS)
build/blas-choice: FORCE
	@mkdir -p build
	@[ "$$(cat $@ 2>/dev/null)" = '$(BLAS_CHOICE)' ] || echo '$(BLAS_CHOICE)' > $@

FORCE:

test: build
	$(PY) -m pytest -q tests

# the documentation (Sphinx: numpydoc, the notebooks from their saved outputs), warnings as
# errors, into docs/_build/html; SPHINXOPTS adds options, e.g. -D mathjax_path=... for a local
# MathJax when the pages are viewed offline
docs: build
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html $(SPHINXOPTS)

# the main job: train a two-level HVAE on MNIST (digits when MNIST is absent), pictures in demo/
demo: build
	$(PY) -m hvae.demo --out demo

# AddressSanitizer + UndefinedBehaviorSanitizer build (in a temporary copy), the suite under it
sanitize: build
	.ci/sanitize.sh

# the core built against Debian's OpenBLAS (in a temporary copy; libopenblas-dev installed with
# apt-get when missing), its tests: the BLAS other than the default still builds and passes
blas-system: build
	@pkg-config --exists openblas 2>/dev/null || { \
	  echo "installing libopenblas-dev and pkg-config with apt-get"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq libopenblas-dev pkg-config; }
	.ci/blas_system.sh

# valgrind memcheck on a tour of the core (installs valgrind with apt-get when missing)
valgrind: build
	@command -v valgrind >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq valgrind; }
	.ci/valgrind.sh

# the tutorial notebooks: re-execute all in full (a minute or two each), saving outputs in place
notebooks: build
	$(PY) -m pip install -q -e ".[notebooks]"
	cd notebooks && HVAE_NOTEBOOK_FAST=0 ../$(VENV)/bin/jupyter nbconvert --to notebook --execute \
	  --inplace --ExecutePreprocessor.timeout=1200 --ExecutePreprocessor.kernel_name=python3 *.ipynb

# JupyterLab on the notebooks
lab: build
	$(PY) -m pip install -q -e ".[notebooks]"
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

# speed table against PyTorch and the NumPy reference (installs torch==2.13.0, CPU build)
bench-speed: build
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/speed.py

# the published MNIST log-likelihoods (about 3 hours on 2 cores; see README)
bench-mnist: build
	$(PY) benchmarks/mnist.py --hvae2-mc --budget-minutes 100 --threads 1 & \
	$(PY) benchmarks/mnist.py --hvae2-analytic --budget-minutes 100 --threads 1; wait
	$(PY) benchmarks/mnist.py --vae1 --budget-minutes 55 --threads 2

# the second table (top-down inference, the IWAE objective): runs side by side (the last alone),
# one core and 95 CPU minutes each, early stopping after 100 epochs without a better validation
# bound; the two-level IWAE models validate and keep an average of their last epochs' parameters
MNIST2 := --threads 1 --budget-minutes 95 --patience 100
AVERAGED := --lr-final 3e-5 --average 0.9
bench-mnist2: build
	$(PY) benchmarks/mnist.py --vae1-iwae5 $(MNIST2) & \
	$(PY) benchmarks/mnist.py --hvae2-topdown-iwae --seed 2 $(AVERAGED) $(MNIST2); wait
	$(PY) benchmarks/mnist.py --hvae2-topdown $(MNIST2) & \
	$(PY) benchmarks/mnist.py --hvae5-topdown $(MNIST2); wait
	$(PY) benchmarks/mnist.py --hvae2-iwae $(AVERAGED) $(MNIST2)

clean:
	rm -rf build *.egg-info hvae/*.so hvae/_core.stamp docs/_build docs/jupyter_execute
