# The two commands: `make demo` and `make test`. Everything else is set-up they call.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench lint clean

# Re-runs only when pyproject.toml or this file changes. torch is pinned in every pip call so
# nothing can swap the CPU wheel for a CUDA build; torchrec goes in with --no-deps (see pyproject).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/recray demo

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray"

bench: $(STAMP)
	$(BIN)/python benchmarks/data_pipeline.py --out benchmarks/results/data_pipeline.json
	RAY_AUTH_MODE=disabled $(BIN)/python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json
	$(BIN)/python benchmarks/simulators.py --out benchmarks/results/simulators.json

lint: $(STAMP)
	$(BIN)/ruff check recray tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
