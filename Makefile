# Two commands do all the set-up on a fresh machine:
#   make run    creates .venv, installs, runs the recipe (RECIPE=seed|fast, EPOCHS=auto, DATA=auto or a path/URL)
#   make test   creates .venv, installs dev deps, runs ruff and the whole test suite (make coverage: with coverage)
#   make bench  the side-by-side benchmark of bench/ (EPOCHS, DATA as for run)
PYTHON ?= python3
VENV ?= .venv
RECIPE ?= seed
EPOCHS ?= auto
DATA ?= auto
EXPERIMENT ?= cifar10-cnn
BIN := $(abspath $(VENV))/bin

.PHONY: install run test coverage test-fast test-browser lint bench ui clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# --env-manager local runs the steps with the `python` first on PATH: put the venv's first.
# MLflow's own INFO lines (directories, commands) are left out; its warnings and errors still show.
run: install
	PATH="$(BIN):$$PATH" MLFLOW_LOGGING_LEVEL=$${MLFLOW_LOGGING_LEVEL:-WARNING} $(BIN)/mlflow run . --env-manager local \
		--experiment-name $(EXPERIMENT) -P recipe=$(RECIPE) -P epochs=$(EPOCHS) -P data=$(DATA)

lint: install
	$(BIN)/ruff check .

# two workers (pytest-xdist), each test file on one of them: most slow tests wait on subprocesses
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

# the same with a coverage report (tracing slows the in-process tests: docs/performance.md)
coverage: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --cov --cov-report=term-missing:skip-covered -q

# the quick loop while developing: no end-to-end `mlflow run` tests
test-fast: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -m "not slow"

# the MLflow UI in headless Chromium (installs Debian's chromium when missing; needs root or sudo)
test-browser: install
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/python -m pytest -q -m browser tests/test_end_to_end.py

# seed recipe vs ours, the whole mlflow run, inference: prints a table (DATA as for run)
bench: install
	$(BIN)/python -m bench.bench --data $(DATA) --epochs $(if $(filter auto,$(EPOCHS)),5,$(EPOCHS))

ui: install
	$(BIN)/mlflow ui --app-name cifar10-cnn --backend-store-uri sqlite:///mlflow.db

clean:
	rm -rf mlruns mlflow.db data models .pytest_cache .ruff_cache .coverage htmlcov
