# The two jobs of the README on a fresh machine: `make bench` (the benchmark) and `make test` (the tests).
# .venv gets torch 2.13.0 (the CPU wheel here; PyPI's CUDA build on a GPU machine) and the project; the OpenRLHF
# and verl adapters are tested against the real frameworks, each in its own venv (scripts/framework_venv.sh).
PYTHON ?= python3
VENV ?= .venv
ARGS ?=
FRAMEWORKS = openrlhf verl

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e ".[test,bench,trl]"
	# DeepSpeed for the ZeRO-3 tests: its source build needs the installed torch (no build isolation), no ops prebuilt
	$(VENV)/bin/python -m pip install -q wheel setuptools ninja
	DS_BUILD_OPS=0 $(VENV)/bin/python -m pip install -q --no-build-isolation deepspeed==0.19.8
	touch $@

.PHONY: bench test test-core test-frameworks
bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/run.py $(ARGS)

test: test-core test-frameworks

test-core: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(ARGS)

framework-test-%:  # % = openrlhf | verl: its own venv, then its adapter tests
	scripts/framework_venv.sh $*
	.venv-$*/bin/python -m pytest -q -p no:cacheprovider tests/frameworks/test_$*.py

test-frameworks: $(addprefix framework-test-,$(FRAMEWORKS))
