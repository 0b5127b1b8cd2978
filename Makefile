# Everything a fresh Linux machine with Python 3.11 needs: `make up` runs the system,
# `make test` runs the checks. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/ucsd-covid-ct

.PHONY: setup seed test lint typecheck pytest compose-test up down train-release evaluate bench lock clean

# Installs, then seeds the local model store from the shipped release (no download).
setup: $(VENV)/.installed
	$(BIN)/ctscan models seed > /dev/null

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet --constraint requirements.lock --editable '.[all,test]'
	touch $@

# Copy the shipped release (models/) into the configured model store; never replaces anything.
seed: setup
	$(BIN)/ctscan models seed

lint: setup
	$(BIN)/ruff check ctscan services tests bench scripts

typecheck: setup
	$(BIN)/mypy ctscan services

pytest: setup
	$(BIN)/pytest -q

test: lint typecheck pytest

# Build the images and run docker-compose.yml as a person would: docker where a Docker engine
# answers, else podman (CI sets it up: .ci/run). About 5 minutes with cached image layers,
# 10-12 when the dependency layers are rebuilt.
compose-test: setup
	$(BIN)/python scripts/compose_test.py

up: setup
	$(BIN)/python scripts/devstack.py up

down:
	$(BIN)/python scripts/devstack.py down

# Reproduce the shipped release (long: background it; resumable after interruption).
train-release: setup
	CTSCAN_DATA_DIR=$(DATA) scripts/train_release.sh

evaluate: setup
	$(BIN)/ctscan evaluate --model all --split test --data $(DATA) --store models --json

bench: setup
	$(BIN)/python bench/run.py

# Regenerate the transitive pins after changing pyproject.toml.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^ctscan' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
