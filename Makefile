# Every target sets up its own virtual environment on first use (CPU build of torch first,
# so that nothing pulls a multi-GB CUDA build), then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-all demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[runtime,dev,plot,cluster]'
	touch $(STAMP)

# The fast suite (what CI runs): GPU tests skip without CUDA, slow ones are deselected.
test: $(STAMP)
	$(PY) -m pytest -m "not slow"

# The whole chain on the shipped tiny pair: profile (committed) -> acceptance -> plan -> simulate -> run.
demo: $(STAMP)
	$(PY) tools/demo.py

# Everything, slow tests included.
test-all: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
