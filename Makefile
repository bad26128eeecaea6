# The README's two commands: `make demo` and `make test`. Both need only python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing envpipe[dev] into $(VENV) (first run only, about a minute)"
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/envpipe demo

lint: $(STAMP)
	$(BIN)/ruff check pipeline workers tests benchmarks
	$(BIN)/ruff format --check pipeline workers tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict pipeline workers

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/envpipe bench --out bench-results

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
