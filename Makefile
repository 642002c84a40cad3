# hetretrieval: `make evaluate` runs the main job offline; `make test` runs the tests (both install first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to a matching pair (override for another CUDA/CPU build: make TORCH="torch torchvision")
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install evaluate test test-all lint format benchmark clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

evaluate: install  ## the main job: default evaluation (offline EfficientNet-Lite0 + GeM on the built-in benchmark)
	$(BIN)/hetretrieval-eval $(ARGS)

test: install  ## the test suite without @pytest.mark.slow tests
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks

benchmark: install  ## throughput figures (see benchmarks/README.md)
	$(BIN)/python benchmarks/extraction_throughput.py

clean:
	rm -rf logs .cache .pytest_cache .ruff_cache
