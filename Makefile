PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Development machines and CI have no GPU: they take the CPU build of torch. Deployments
# install config.yaml's pins instead.
DEV_TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
PORT ?= 8080

.PHONY: install serve test test-fast fuzz lint clean

install: $(STAMP)

$(STAMP): pyproject.toml config.yaml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(DEV_TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m tests.truss_server --install-only
	touch $@

## The real Truss server on 127.0.0.1:$(PORT) with the embedded tiny model.
serve: $(STAMP)
	$(BIN)/python -m tests.truss_server --port $(PORT)

## The whole CPU suite, one module per worker: most of its time is compiling in fresh processes, which
## two cores share better than one process waiting on each in turn.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope

## Everything but the tests that start servers or compile in fresh processes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

## The property-based fuzz of the real server with 600 generated bodies (make test runs 60).
fuzz: $(STAMP)
	FUZZ_EXAMPLES=600 $(BIN)/python -m pytest tests/test_reliability.py -k fuzz -s

lint: $(STAMP)
	$(BIN)/ruff check model tests bench
	$(BIN)/ruff format --check model tests bench

clean:
	rm -rf .build .pytest_cache
