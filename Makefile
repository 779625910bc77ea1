# `make demo` installs kosmos and transcribes an example page; `make test` installs and runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first: 2.13.0 is the release kosmos is tested with; `make install TORCH=torch` takes the newest instead.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,ray

.PHONY: install demo test lint typecheck unit bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(BIN)/kosmos md examples/prose.png

lint: install
	$(BIN)/ruff check kosmos_cli tests benchmarks examples
	$(BIN)/ruff format --check kosmos_cli tests benchmarks examples

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest

test: lint typecheck unit

bench: install
	$(BIN)/python benchmarks/throughput.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
