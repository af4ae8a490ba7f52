# The two commands of the README's quick start are `make demo` and `make test`;
# each sets up whatever is missing first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint typecheck unit bench bench-intermediary clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/tigress-signal demo

lint: setup
	@echo "[test] ruff"
	@$(VENV)/bin/ruff check src tests benchmarks
	@$(VENV)/bin/ruff format --check src tests benchmarks

typecheck: setup
	@echo "[test] mypy --strict (package and benchmarks; tests may leave functions unannotated)"
	@$(VENV)/bin/mypy
	@$(VENV)/bin/mypy --allow-untyped-defs --allow-incomplete-defs --allow-untyped-calls tests

unit: setup
	@echo "[test] pytest"
	@$(PY) -m pytest

test: lint typecheck unit

bench: setup
	@$(PY) -m benchmarks

# Intermediary deliveries/s against an ASGI echo endpoint, SQLite and PostgreSQL (a few minutes).
bench-intermediary: setup
	@$(PY) -m benchmarks.intermediary

clean:
	rm -rf $(VENV) bridge/node_modules .mypy_cache .ruff_cache .pytest_cache
