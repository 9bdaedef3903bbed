# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    := .demo

.PHONY: demo test lint format venv bench clean

venv: $(STAMP)

# torch is pinned explicitly: an open range would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check expertflow tests
	$(BIN)/ruff format --check expertflow tests
	$(BIN)/mypy expertflow/__init__.py expertflow/config.py expertflow/errors.py expertflow/core.py expertflow/aio.py expertflow/assemble.py expertflow/pipeline \
		expertflow/services/protocol.py expertflow/services/server.py expertflow/services/frontend.py expertflow/services/curve.py expertflow/services/client.py \
		expertflow/services/keys.py expertflow/services/monitoring.py expertflow/services/remote.py \
		expertflow/tiers/fingerprint.py expertflow/services/process.py expertflow/quant expertflow/model/quantized.py expertflow/model/quantize.py expertflow/model/prequantized.py expertflow/model/batch.py expertflow/model/vision.py expertflow/model/routing.py expertflow/bench/accuracy.py expertflow/bench/grid.py

format: $(STAMP)
	$(BIN)/ruff format expertflow tests
	$(BIN)/ruff check --fix expertflow tests

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m expertflow.demo --workdir $(DEMO)

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache .mypy_cache
