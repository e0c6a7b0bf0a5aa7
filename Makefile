# custsync: `make demo` and `make test` are the whole quick start on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint types unit integration bench clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"

# Reinstall whenever pyproject.toml changes (the stamp carries its checksum).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[all]" --group dev
	$(BIN)/python -m compileall -q src  # as a wheel's install does (an editable one does not)
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	@$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

types: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

integration: $(STAMP)
	$(BIN)/pytest tests/integration -q

test: lint types
	$(BIN)/pytest -q

BENCH_VENV := bench/.venv-dlt
BENCH_ARGS ?=

# dlt lives only in the benchmark's own environment: never a dependency of custsync.
$(BENCH_VENV)/.installed: bench/requirements-dlt.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -r bench/requirements-dlt.txt
	touch $@

# Side-by-side benchmarks (issue 4), never part of `make test`; BENCH_ARGS=--quick for a smoke pass.
bench: $(STAMP) $(BENCH_VENV)/.installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) demo/demo.db* demo/.custsync .pytest_cache .mypy_cache .ruff_cache
