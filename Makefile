# carclassifier — every target installs what it needs into .venv first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/recipe_lite0_local.yaml
RUN_DIR ?= runs/local
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c requirements/lock.txt

.PHONY: help install install-reference test lint eda run-local bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the package with its pinned dependencies

install-reference: install  ## add torch 2.13.0 CPU + efficientnet_lite_pytorch for the Lite0 reference test
	$(PIP_INSTALL) -e '.[dev,torch-reference]'

test: install  ## run the test suite
	$(PY) -m pytest

lint: install  ## ruff
	$(VENV)/bin/ruff check src tests benchmarks components pipelines

eda: install  ## EDA report of the demo data (CONFIG=... for another dataset)
	$(VENV)/bin/carclassifier eda --config $(CONFIG)

run-local: install  ## the whole recipe on the embedded default (RUN_DIR=runs/local)
	$(VENV)/bin/carclassifier run-local --config $(CONFIG) --out $(RUN_DIR)

bench: install  ## benchmarks, results into benchmarks/results/
	$(PY) benchmarks/input_pipeline.py

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs tests/artifacts
