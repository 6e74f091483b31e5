# The project's two commands: `make test` and `make train`. Both set up .venv from nothing on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0

.PHONY: test train venv install clean

venv: $(VENV)/.ready

$(VENV)/.ready: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel ninja
	$(PY) -m pip install -q $(TORCH) $(TRITON)   # torch first: later packages must not pull a CUDA build
	$(PY) -m pip install -q -r requirements-dev.txt $(TORCH)   # pinned again so nothing swaps it
	touch $@

install: venv
	$(PY) -m pip install -q --no-build-isolation -e .

test: install
	$(PY) -m pytest -q tests
	$(PY) -m fastpref.kernels.report

train: install
	$(PY) -m fastpref.train

clean:
	rm -rf build *.egg-info fastpref/*.so
