# Two entry points: `make demo` (offline demo on SQLite) and `make test` (the whole suite + ruff + mypy).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck chart clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenledger demo

lint: $(STAMP)
	$(BIN)/ruff check langchain_tokenledger tests benchmarks notebooks
	$(BIN)/ruff format --check langchain_tokenledger tests benchmarks notebooks

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

chart: $(STAMP)
	$(BIN)/python docs/make_chart.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
