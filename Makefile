# Everything a fresh machine needs, in two commands (see README.md):
#   make train   installs, then runs the main job
#   make test    installs, then runs the test suite (what .ci/run calls)
#   make lint    installs, then runs ruff (lint and format check) and mypy (.ci/run calls it too)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint train gpu-wheels

setup: $(VENV)/.installed

# Re-install whenever the dependencies or their pinned versions change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test,lint]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# Style held by tools: their configuration is in pyproject.toml ([tool.ruff], [tool.mypy]).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The main job: lmloss train on its built-in default (a small Qwen2 on built-in chats, CPU, ~2 min).
train: setup
	$(BIN)/lmloss train --overwrite --output-dir runs/train

# The wheels benchmarks/gpu_check.py installs on a GPU machine that has no package registry
# (README.md, "GPU check"): lmloss itself and the two peers it is timed against, pinned.
# About 1 MB in all; the device tool carries at most 64 MiB with the working tree.
LIGER_VERSION := 0.8.5
CCE_VERSION := 25.1.1
gpu-wheels:
	rm -rf gpu-wheels build && mkdir -p gpu-wheels  # build/: setuptools would reuse stale modules
	$(PYTHON) -m pip wheel --quiet --no-deps --wheel-dir gpu-wheels .
	$(PYTHON) -m pip download --quiet --no-deps --dest gpu-wheels \
		liger-kernel==$(LIGER_VERSION) cut-cross-entropy==$(CCE_VERSION)
	du -sh gpu-wheels && ls gpu-wheels
