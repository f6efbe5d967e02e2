# The two commands of the README: `make test` and `make bench`. Both create .venv, install the
# pinned dependencies and build cnnops when (and only when) something they depend on changed.

VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.cnnops-built
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: test bench install gpu-check clean

test: $(BUILT)
	$(PY) -m pytest tests

bench: $(BUILT)
	$(PY) -m bench

install: $(BUILT)

# The GPU lane: the machine's own python3 (torch, triton, pytest preinstalled, no network), or
# .venv's where one exists (a machine without a GPU, where it builds and collects the tests).
gpu-check:
	PYTHON=$${PYTHON:-$$( [ -x $(PY) ] && echo $(PY) || echo python3 )} OUT=$(OUT) bench/gpu_check.sh

$(PY):
	python3 -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(PY)
	$(PY) -m pip install --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build cnnops/_C*.so *.egg-info $(BUILT)
