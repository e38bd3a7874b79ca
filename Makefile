# The two jobs of the README on a fresh machine: `make bench` (the benchmark) and `make test` (the tests).
# Both build .venv once: torch 2.13.0 (the CPU wheel here; PyPI's CUDA build on a GPU machine) and the project.
PYTHON ?= python3
VENV ?= .venv
ARGS ?=

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e ".[test,bench,trl]"
	touch $@

.PHONY: bench test
bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/run.py $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(ARGS)
