# Everything a fresh Linux machine with Python 3.11 needs: `make up` runs the system,
# `make test` runs the checks. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/ucsd-covid-ct
# The development model store (`make up` and `make bench` use it) and the shipped release.
# Outside the source tree the library defaults to the per-user data folder instead.
STORE ?= var/model-store
RELEASE := models
# The release's ONNX copies, one per version: made once per checkout, never committed.
RELEASE_ONNX := $(patsubst %/SHA256SUMS,%/onnx/SHA256SUMS,$(wildcard $(RELEASE)/*/*/SHA256SUMS))

.PHONY: setup seed release-onnx test test-fast lint typecheck pytest compose-test up down train-release evaluate bench lock clean

# Installs, makes the release's ONNX copies (checked against TensorFlow on real images, so
# only when the data is there), then seeds the development store from the release.
setup: $(VENV)/.installed release-onnx
	$(BIN)/ctscan models seed --release $(RELEASE) --store $(STORE) > /dev/null

ifneq ($(wildcard $(DATA)/split.csv),)
release-onnx: $(RELEASE_ONNX)
else
release-onnx:
	@echo "no data at $(DATA): the release gets no ONNX copies and inference uses TensorFlow"
endif

$(RELEASE)/%/onnx/SHA256SUMS: | $(VENV)/.installed
	$(BIN)/ctscan models export-onnx --store $(RELEASE) --data $(DATA) \
		--model $(word 1,$(subst /, ,$*)) --version $(word 2,$(subst /, ,$*)) > /dev/null

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet --constraint requirements.lock --editable '.[all,test]'
	touch $@

# Copy the shipped release (models/) into the development store; never replaces anything.
seed: setup
	$(BIN)/ctscan models seed --release $(RELEASE) --store $(STORE)

lint: setup
	$(BIN)/ruff check ctscan services tests bench scripts

typecheck: setup
	$(BIN)/mypy ctscan services

# Both tiers, fast first, each timed (so CI's log shows the fast tier's time on its machine);
# the slow tier runs even when the fast one fails, and any failure fails the target.
pytest: setup
	@rc=0; start=$$(date +%s); $(BIN)/pytest -q -m "not slow" || rc=1; \
	echo "pytest: fast tier (-m 'not slow') took $$(( $$(date +%s) - start )) s"; \
	start=$$(date +%s); $(BIN)/pytest -q -m slow || rc=1; \
	echo "pytest: slow tier (-m slow) took $$(( $$(date +%s) - start )) s"; exit $$rc

test: lint typecheck pytest

# The fast tier: no training, no ONNX conversion, no processes started (about a minute).
test-fast: $(VENV)/.installed
	$(BIN)/pytest -q -m "not slow"

# devstack seeds the store it uses (so `setup`'s seeding is not repeated here); the data
# folder only supplies real slices for the services' smoke predictions.
up: $(VENV)/.installed release-onnx
	CTSCAN_DATA_DIR="$${CTSCAN_DATA_DIR:-$(abspath $(DATA))}" $(BIN)/python scripts/devstack.py up

# Build the images and run docker-compose.yml as a person would: docker where a Docker engine
# answers, else podman (CI sets it up: .ci/run). About 5 minutes with cached image layers,
# 10-12 when the dependency layers are rebuilt.
compose-test: setup
	$(BIN)/python scripts/compose_test.py

down:
	$(BIN)/python scripts/devstack.py down

# Reproduce the shipped release (long: background it; resumable after interruption).
train-release: setup
	RELEASE_DATA_ROOT=$(dir $(abspath $(DATA))) scripts/train_release.sh

evaluate: setup
	$(BIN)/ctscan evaluate --model all --split test --data $(DATA) --store models --json

bench: setup
	$(BIN)/python bench/run.py

# Regenerate the transitive pins after changing pyproject.toml.
lock:
	$(BIN)/pip freeze --exclude-editable | grep -v '^ctscan' > requirements.lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts
