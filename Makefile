# Two commands set up everything on a fresh machine:
#   make replicate   creates .venv on first use, then runs the main job (studies/replicate.py)
#   make test        creates .venv on first use, then runs the fast test suite (CI runs this, then test-slow)
# The environment is made once and reused; it is remade when pyproject.toml changes.
# Without an NVIDIA GPU (no nvidia-smi) the `cpu` extra pins the CPU build of torch, so no CUDA wheels are
# pulled; with one, torch is left open and pip takes the CUDA build. Pass VENV_FLAGS=--system-site-packages
# to reuse a torch that is already installed system-wide.
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
TORCH_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo cpu,)
EXTRAS := $(TORCH_EXTRA)test,lora,dist
ARGS ?=

.PHONY: setup replicate test test-slow smoke-7b

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.installed

replicate: setup
	$(PY) studies/replicate.py $(ARGS)

test: setup
	$(PY) -m pytest -n 2 -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -n 2 -q -m slow $(ARGS)

smoke-7b: setup
	$(PY) studies/smoke_7b.py $(ARGS)
