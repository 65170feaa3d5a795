# Everything a fresh machine needs, in two commands (see README.md):
#   make train   installs, then runs the main job
#   make test    installs, then runs the test suite (what .ci/run calls)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test train

setup: $(VENV)/.installed

# Re-install whenever the dependencies or their pinned versions change.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# The main job: lmloss train on its built-in default (a small Qwen2 on built-in chats, CPU, ~2 min).
train: setup
	$(BIN)/lmloss train --overwrite --output-dir runs/train
