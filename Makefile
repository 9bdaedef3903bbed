# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    := .demo

LATEST  := .venv-latest

.PHONY: demo test test-latest lint format venv bench clean

venv: $(STAMP)

# torch is pinned explicitly: an open range would pull a multi-GB CUDA build. Every other package comes at the
# version constraints.txt pins (the suite last ran green with them); pyproject.toml keeps users' ranges.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The newest releases the ranges allow, in a venv of their own: the family sweep, and what changed against the
# pins and the sweep's record (docs/families.json). Not part of CI.
test-latest:
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet torch==2.13.0
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/python -m tests.sweep
	$(LATEST)/bin/python -m pytest -q tests/test_families.py tests/test_family_check.py

lint: $(STAMP)
	$(BIN)/ruff check expertflow tests
	$(BIN)/ruff format --check expertflow tests
	$(BIN)/mypy expertflow/__init__.py expertflow/config.py expertflow/errors.py expertflow/core.py expertflow/aio.py expertflow/assemble.py expertflow/pipeline \
		expertflow/wire expertflow/services/server.py expertflow/services/frontend.py expertflow/services/curve.py \
		expertflow/services/monitoring.py expertflow/tiers/remote.py \
		expertflow/tiers/fingerprint.py expertflow/services/process.py expertflow/quant expertflow/model/quantized_experts.py expertflow/model/quantize_pack.py expertflow/model/hf_quantized.py expertflow/model/batch.py expertflow/model/vision.py expertflow/model/routing.py expertflow/model/verify.py expertflow/model/tiny.py expertflow/lab/accuracy.py expertflow/lab/grid.py \
		expertflow/model/decoding.py expertflow/model/locking.py expertflow/devices.py expertflow/model/generate.py expertflow/serving

format: $(STAMP)
	$(BIN)/ruff format expertflow tests
	$(BIN)/ruff check --fix expertflow tests

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m expertflow.demo --workdir $(DEMO)

clean:
	rm -rf $(VENV) $(LATEST) $(DEMO) .pytest_cache .ruff_cache .mypy_cache
