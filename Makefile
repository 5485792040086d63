PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

# torch==2.13.0 goes in first: any other torch request would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/lmforge quickstart

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python benchmarks/shakespeare_char.py
	$(BIN)/python benchmarks/mlm_throughput.py

clean:
	rm -rf runs .pytest_cache
