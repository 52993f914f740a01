# make run   - the service on this machine (creates .venv from requirements.txt, and .env
#              with generated secrets if there is none); RUN_ARGS="--host 0.0.0.0 --port 8080";
#              FLOWER=1 starts Flower too (with Redis) on port 5555
# make env   - only write .env (for docker compose); an existing .env is never touched
# make test  - lint, type-check and the whole test suite (creates .venv with dev tools)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run env test pytest lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime
	$(BIN)/python -m backend.cli run $(if $(FLOWER),--flower) $(RUN_ARGS)

# Standard library only: works before any dependency is installed.
env:
	$(PYTHON) -m backend.envfile .env

test: lint pytest

pytest: $(VENV)/.dev
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy backend tests bench alembic

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
