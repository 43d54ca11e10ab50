# The README's commands. Each one works on a fresh clone: it creates .venv and installs into it.
#   make quickstart   train + evaluate the offline quickstart recipes on CPU, print a before/after table
#   make test         lint + the whole test suite, offline
#   make mutants      break each core invariant in a copy of hftoolkit/ and require its tests to fail (CI runs it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 resolves to the CPU wheel on the dev/CI machines and to the default (CUDA) wheel elsewhere.
TORCH_SPEC ?= torch==2.13.0
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

.PHONY: install quickstart test mutants lint format clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

quickstart: install
	$(OFFLINE) $(BIN)/hftoolkit quickstart --output-root runs/quickstart

lint: install
	$(BIN)/ruff check hftoolkit tests benchmarks
	$(BIN)/ruff format --check hftoolkit tests benchmarks

format: install
	$(BIN)/ruff format hftoolkit tests benchmarks
	$(BIN)/ruff check --fix hftoolkit tests benchmarks

test: install lint
	$(OFFLINE) $(BIN)/python -m pytest

mutants: install
	$(OFFLINE) $(BIN)/python tests/mutants.py

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache .ruff_cache
