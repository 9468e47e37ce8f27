# jaxsplit — the two commands of the README:
#   make demo   install into .venv (if needed) and run the whole pipeline on the embedded default
#   make test   install into .venv (if needed) and run the test suite
# Everything else here is a helper of those two.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch for the interop tests and the PyTorch baseline (optional; set WITH_TORCH=0 to skip).
WITH_TORCH ?= 1
TORCH_SPEC ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/datasets)
export JAXSPLIT_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: demo test test-all bench install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e ".[dev]"
	@if [ "$(WITH_TORCH)" = "1" ]; then \
	  $(PIP) install -q "$(TORCH_SPEC)" || echo "note: torch not installed; interop tests will be skipped"; \
	fi
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/jaxsplit demo --out runs/demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-all: install
	$(PY) -m pytest -q -p no:cacheprovider -m ""

bench: install
	$(PY) benchmarks/bench_evaluator.py

clean:
	rm -rf $(VENV) runs .pytest_cache
