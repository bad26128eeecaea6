# The README's two commands: `make demo` and `make test`. Both need only python3 and make
# (and, for the PKCS#11 tests, Debian's softhsm2, which `make test` installs when it runs as
# root and it is missing). `make test-kafka` runs the broker-facing tests against Apache Kafka
# 4 (KRaft, from Maven Central): it needs Java 17+ and Maven, and says so if they are missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-kafka lint typecheck unit softhsm bench clean

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
	$(BIN)/mypy --strict pipeline workers benchmarks

unit: $(STAMP) softhsm
	$(BIN)/pytest -q

test: lint typecheck unit

# The broker-facing tests (marked `broker`) again, and the Apache-Kafka-only ones (`kafka`).
test-kafka: $(STAMP)
	ENVPIPE_TEST_BROKER=kafka $(BIN)/pytest -q -m "broker or kafka"

softhsm:
	@command -v softhsm2-util >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's softhsm2 for the PKCS#11 tests"; \
	    apt-get install -y -qq softhsm2 >/dev/null || \
	      { apt-get update -qq && apt-get install -y -qq softhsm2 >/dev/null; }; \
	  else \
	    echo "the PKCS#11 tests need SoftHSM2: install Debian's softhsm2 (apt-get install softhsm2)"; \
	    exit 1; \
	  fi; }

bench: $(STAMP)
	$(BIN)/envpipe bench --out bench-results

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
