# moekit: `make demo` and `make test` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of torch is pinned: a bare `torch` pulls several GB of CUDA packages.
TORCH  ?= torch==2.13.0
EXTRAS ?= hf,data,analyze,llmroute,compress,adapt,infer,dev

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/moekit demo --threads 2
	$(BIN)/moekit quickstart --threads 2

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
