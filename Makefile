# The project's two commands: `make test` and `make train`. Both set up .venv from nothing on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every install is held to the exact versions in constraints.txt (what CI tested); `make lock` rewrites it.
LOCK ?= constraints.txt
PIP := $(PY) -m pip install -q -c $(LOCK)
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0

.PHONY: test train install clean lock

# torch first, alone: later packages must not pull a CUDA build (it is pinned again on every install).
$(VENV)/.torch: $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -U pip setuptools wheel $(TORCH)   # a current pip: the old one runs the legacy develop path, which skips the extension
	touch $@

$(VENV)/.train: $(VENV)/.torch requirements-train.txt
	$(PIP) -r requirements-train.txt $(TORCH)
	touch $@

$(VENV)/.dev: $(VENV)/.train requirements-dev.txt
	$(PIP) ninja $(TRITON) -r requirements-dev.txt $(TORCH)
	touch $@

# The package with its C++ extension (rebuilt incrementally when csrc/ or setup.py change).
install: $(VENV)/.dev
	$(PIP) --no-build-isolation -e .
	touch $(VENV)/.package

test: install
	$(PY) -m pytest -q tests
	$(PY) -m fastpref.kernels.report

# The main job needs neither Triton nor the test tools nor the C++ extension (the model is tiny); it installs
# only what it uses (the package too: the `fastpref` command works afterwards), so a fresh clone trains within
# minutes. A second run refuses to replace runs/demo: make train TRAIN_ARGS=--overwrite (or --resume auto).
$(VENV)/.package: $(VENV)/.train setup.py
	FASTPREF_NO_NATIVE=1 $(PIP) --no-build-isolation -e .
	touch $@

train: $(VENV)/.package
	$(VENV)/bin/fastpref train $(TRAIN_ARGS)

# The lock: a fresh venv from nothing with the newest release of every requirement (torch and triton as pinned
# above), frozen with exact versions. Run it when you move a dependency on purpose, then run `make test`.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q -U pip setuptools wheel $(TORCH)
	.venv-lock/bin/python -m pip install -q ninja $(TRITON) -r requirements-dev.txt $(TORCH)
	{ echo "# Exact versions of every package that make train / make test install, produced by make lock."; \
	  echo "# Generated on $$(date -u +%Y-%m-%d) with Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())')."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf build *.egg-info fastpref/*.so fastpref/_native_build.json
