# Every install step lives here: a fresh clone needs only python3.11 and the package registries.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Stage commands in dvc.yaml say `python`: make it the project's.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-fast lint ui repro bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch first: a bare requirement would pull the multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## run the whole pipeline on the embedded default (Prefect ephemeral API, MLflow on SQLite, DVC local cache)
run: install
	$(BIN)/python -m flows.training

## the whole test suite (unit, integration with real servers on loopback, e2e), on TEST_WORKERS
## pytest-xdist workers (each module stays on one worker, so its fixtures are made once)
TEST_WORKERS ?= 2
test: install lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

test-fast: install lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope -m "not slow"

## the layering contracts of pyproject.toml [tool.importlinter]
lint: install
	$(BIN)/lint-imports

## MLflow UI on the same store, Prefect server, the deployments and a worker
ui: install
	$(BIN)/mlops up

repro: install
	$(BIN)/dvc repro

clean:
	rm -rf data/raw data/processed models reports checkpoints mlflow.db mlartifacts
