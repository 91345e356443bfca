# Everything sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck unit bench bench-quick up down status clean

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

## test-fast: the tests that need no server, sandbox, database or process (under a minute)
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not servers"

## bench: K1 kill switch (first cancel, RTT-bound and direct floors, 100 concurrent kills), then R1
## rollback; each prints ratios and ends with machine-readable lines; R1 runs even if K1 failed
bench: $(STAMP)
	rc=0; $(BIN)/python -m bench.kill_switch || rc=1; $(BIN)/python -m bench.rollback || rc=1; exit $$rc

## bench-quick: the same as a smoke run (fewer repetitions, 20 kills, a 100k-row database)
bench-quick: $(STAMP)
	rc=0; $(BIN)/python -m bench.kill_switch --quick || rc=1; \
	$(BIN)/python -m bench.rollback --quick || rc=1; exit $$rc

up: $(STAMP)
	$(BIN)/breakglass dev up
down: $(STAMP)
	$(BIN)/breakglass dev down
status: $(STAMP)
	$(BIN)/breakglass dev status

clean: down
	rm -rf .breakglass
