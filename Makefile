# The README's commands. Each sets up .venv on first use (CPU build of torch), so a fresh clone needs only Python.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CONFIG ?= configs/demo.yaml

.PHONY: setup demo test lint tensorboard clean

$(BIN)/qlit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# torch first, pinned: otherwise a plain `torch` requirement pulls the multi-GB CUDA build.
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

setup: $(BIN)/qlit

demo: setup
	$(BIN)/qlit fit --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q -n auto --dist loadscope

lint: setup
	$(BIN)/ruff check qlit tests tools
	$(BIN)/ruff format --check qlit tests tools

tensorboard: setup
	$(BIN)/qlit board logs

clean:
	rm -rf logs/*/ .pytest_cache .ruff_cache
