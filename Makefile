# jaxsplit — the two commands of the README:
#   make demo   install into .venv (if needed, without torch) and run the whole pipeline on the embedded default
#   make test   install into .venv (if needed, with torch from PyPI) and run the test suite
# Everything else here is a helper of those two.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch, only for `make test` (interop tests, PyTorch baseline) and `make bench`; `make demo`
# never installs it. From PyPI, pinned (set WITH_TORCH=0 to skip; those tests are then skipped).
WITH_TORCH ?= 1
TORCH_SPEC ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/datasets)
export JAXSPLIT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: demo test test-all bench install install-torch clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e ".[dev]"
	touch $@

$(VENV)/.torch: | $(VENV)/.installed
	@if [ "$(WITH_TORCH)" = "1" ]; then \
	  $(PIP) install -q "$(TORCH_SPEC)" || echo "note: torch not installed; interop tests will be skipped"; \
	fi
	touch $@

install: $(VENV)/.installed

install-torch: $(VENV)/.torch

demo: install
	$(VENV)/bin/jaxsplit demo --out runs/demo

test: install install-torch
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

test-all: install install-torch
	$(PY) -m pytest -q -p no:cacheprovider -m ""

bench: install install-torch
	$(PY) benchmarks/bench_evaluator.py

clean:
	rm -rf $(VENV) runs .pytest_cache
