# The two set-up commands: `make demo` (the main job) and `make test` (the test suite).
# Both create or reuse the virtualenv .venv in the repo and install what they need.
# `make test` and `make lint` also check the layers with import-linter (contracts in pyproject.toml).

VENV ?= .venv
PYTHON := $(VENV)/bin/python
DIFFRL := $(VENV)/bin/diffrl
STAMP := $(VENV)/.diffrl-installed
# torch 2.14.1 + torchvision 0.29.1 install from this project's build machines' local disk;
# elsewhere pip downloads them (override TORCH to pick a CPU or another CUDA build).
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	# hpsv2x pins pytest==7.2.0 and protobuf<4 at run time; its real imports are in pyproject.toml.
	$(PYTHON) -m pip install --quiet --no-deps hpsv2x==1.2.0
	touch $(STAMP)

demo: $(STAMP)
	$(DIFFRL) run shapes_quick

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PYTHON) -m pytest -m "not gpu and not weights"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy harness methods rewards/base.py benchmarks/base.py

clean-venv:
	rm -rf $(VENV)
