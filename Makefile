# Two commands for a new user: `make demo` runs a commission end to end on the embedded default,
# `make test` runs the test suite (lint included). Each sets up .venv itself.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# DS_ACCELERATOR is not forced: the CLI and the launcher set it to cpu only where CUDA is absent.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false
# A fresh Prefect home on busy cores can take more than Prefect's default 20 s to come up.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test lint lock ui-mlflow ui-prefect clean

setup:
	@./scripts/bootstrap.sh

demo: setup
	@mkdir -p .taas/prefect  # Prefect warns when its home's parent is missing
	PREFECT_HOME=$(CURDIR)/.taas/prefect $(VENV)/bin/taas demo

test: setup
	@./scripts/ensure_chromium.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

lock:
	$(VENV)/bin/uv pip compile requirements.in --find-links /opt/wheels --python-version 3.11 --no-header -o requirements.lock

ui-mlflow: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///.taas/mlflow.db --port 5000

ui-prefect: setup
	PREFECT_HOME=$(CURDIR)/.taas/prefect $(VENV)/bin/prefect server start

clean:
	rm -rf .taas .cache
