# Set-up and the two README commands. On a CPU-only machine the constraints file pins
# torch==2.13.0 (the local CPU wheel) so nothing pulls CUDA wheels; on a GPU machine use
# `make setup CONSTRAINTS=` to take the registry's CUDA build.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PIP = $(VENV)/bin/python -m pip
CFLAGS_PIP = $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup run test lint
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install $(CFLAGS_PIP) torch
	$(PIP) install $(CFLAGS_PIP) -e ".[all]"
	touch $@

run: setup
	$(VENV)/bin/distrain run recipe=har $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
