# Set-up, test and demo commands for a fresh machine. Each target is idempotent: it creates the
# virtual environment .venv once, installs torch 2.13.0 first (an unpinned torch pulls several GB of
# CUDA packages), then this package with its dev extra.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test test-slow test-gpu demo lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test-gpu: setup
	$(PY) -m pytest -m gpu

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(VENV)/bin/grpo-suite sudoku pipeline
