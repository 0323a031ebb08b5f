# The two set-up commands: `make demo` (the main job) and `make test` (the test suite).
# Both create or reuse the virtualenv .venv in the repo: `make demo` installs the runtime dependencies,
# `make test` adds the extra `test` (test and lint tools, the OCR engine). Every install is constrained to
# the lock, requirements/lock.txt; `make lock` refreshes it (docs/install.md).
# `make test` and `make lint` also check the layers with import-linter (contracts in pyproject.toml).

VENV ?= .venv
PYTHON := $(VENV)/bin/python
DIFFRL := $(VENV)/bin/diffrl
# torch 2.14.1 + torchvision 0.29.1 install from this project's build machines' local disk;
# elsewhere pip downloads them. Override TORCH to pick a CPU or another CUDA build: the lock pins
# torch==2.14.1, which a local build such as 2.14.1+cpu satisfies; for another release, `make lock TORCH=...`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# The pinned set, one file for CPU and CUDA builds and Python 3.11-3.13 (uv's universal resolution).
# `make LOCK= demo` installs from the floors in pyproject.toml alone.
LOCK_FILE := requirements/lock.txt
LOCK ?= $(LOCK_FILE)
PIP_INSTALL := $(PYTHON) -m pip install --quiet $(if $(LOCK),--constraint $(LOCK))
RUNTIME := $(VENV)/.diffrl-installed
TESTING := $(VENV)/.diffrl-test-installed
# Upgrade every pin with `make lock UPGRADE=1`; plain `make lock` keeps the pins that still fit pyproject.toml.
UPGRADE ?=

.PHONY: demo test lint install mmdet test-mmdet lock clean-venv

install: $(RUNTIME)

# A venv made before the lock may hold hpsv2x (installed with --no-deps; it pins pytest==7.2.0 and protobuf<4):
# it goes, so that pip check passes.
$(RUNTIME): pyproject.toml $(LOCK)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip uninstall --quiet --yes hpsv2x 2>/dev/null || true
	$(PIP_INSTALL) $(TORCH) -e .
	touch $@

$(TESTING): $(RUNTIME)
	$(PIP_INSTALL) -e '.[test]'
	touch $@

demo: $(RUNTIME)
	$(DIFFRL) run shapes_quick

test: $(TESTING)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PYTHON) -m pytest -m "not gpu and not weights"

lint: $(TESTING)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy harness methods rewards/base.py benchmarks/base.py

# GenEval's official detector (extra mmdet) in this venv. mmcv 1.7.2 is a source distribution whose setup.py
# imports pkg_resources: it builds in the venv itself (no build isolation), whose setuptools the lock keeps
# below 81 (requirements/lock.in). Without the lock: pip install 'setuptools<81' first.
mmdet: $(TESTING)
	$(PIP_INSTALL) --no-build-isolation -e '.[mmdet]'

# What CI runs after `make test`: the mmdet backend on the real mmdet 2.x, and pip check with mmdet installed.
test-mmdet: mmdet
	$(PYTHON) -m pip check
	$(PYTHON) -m pytest tests/rewards/test_geneval_detect.py -k mmdet

# Re-resolve the lock with uv (from PyPI) for Python 3.11-3.13 on every platform: pyproject.toml with the extras
# test and mmdet, TORCH's pins (a local label such as +cpu dropped) and requirements/lock.in.
lock:
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet 'uv>=0.9'
	printf '%s\n' $(filter torch%,$(subst +, ,$(TORCH))) | $(VENV)/bin/uv pip compile - pyproject.toml \
		--extra test --extra mmdet --universal --python-version 3.11 $(if $(UPGRADE),--upgrade) \
		--constraint requirements/lock.in --build-constraints requirements/lock.in \
		--custom-compile-command 'make lock' --quiet --output-file $(LOCK_FILE)

clean-venv:
	rm -rf $(VENV)
