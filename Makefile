# Two entry points for a fresh machine: `make demo` (install + offline benchmark)
# and `make test` (install + the whole test suite). Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cl_merge-installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_offline_data.sh
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: where a CPU wheel of 2.13.0 is configured for pip it
	# is taken, and the project's own range (<2.14) then adds no CUDA torch
	$(BIN)/pip install "torch==2.13.0"
	$(BIN)/pip install -e ".[dev]"
	# animal-mnist declares tensorflow as a dependency it does not need for its data
	$(BIN)/pip install --no-deps "animal-mnist==0.4"
	bash scripts/install_offline_data.sh
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cl-merge run

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python scripts/bench_merge.py
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache
