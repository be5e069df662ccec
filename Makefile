# The README's two commands: `make quickstart` and `make test`.
# Both create .venv and install mllm-cl into it first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: setup quickstart lint test test-slow bench compare compare-full help

help:
	@echo "make quickstart  set up .venv and run the quickstart (lora_ft vs cmoe on the synthetic sequence)"
	@echo "make lint        ruff check (the rules in pyproject.toml)"
	@echo "make test        set up .venv, lint, and run the test suite (slow and GPU tests excluded)"
	@echo "make test-slow   run the slow tests too"
	@echo "make bench       run the benchmarks in benchmarks/"
	@echo "make compare     every method on both canonical sequences (shapes, coin), one sweep each, oracle rows"
	@echo "make compare-full  the same with 3 sweeps per sequence (seeds 0 and 1, the reversed order)"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

quickstart: setup
	$(VENV)/bin/mllm-cl quickstart

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m "slow or not slow"

bench: setup
	$(PY) benchmarks/expert_layer.py

compare: setup
	$(PY) examples/compare_methods/run.py --quick --results docs/results.md

compare-full: setup
	$(PY) examples/compare_methods/run.py --reproduce --results docs/results.md
