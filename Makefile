# Everything sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench up down status clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: the embedded stack; the kill switch, a rollback and a deployment through Temporal
demo: $(STAMP)
	$(BIN)/python -m worker.demo

## test: lint, type-check and the whole test suite (what CI runs)
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q --durations=25

## bench: the K1 kill-switch and R1 rollback benchmarks (each prints ratios; last line is machine-readable)
bench: $(STAMP)
	$(BIN)/python -m bench.kill_switch
	$(BIN)/python -m bench.rollback

up: $(STAMP)
	$(BIN)/breakglass dev up
down: $(STAMP)
	$(BIN)/breakglass dev down
status: $(STAMP)
	$(BIN)/breakglass dev status

clean: down
	rm -rf .breakglass
