# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs torch==2.13.0 explicitly (an unpinned torch would pull a
# multi-GB CUDA build), then the project with its test extra.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shardlm-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shardlm demo

# Two workers, one test file each at a time (module fixtures stay shared, the namespace tests apart):
# the suite takes ~60% of its one-worker time on the 2-core machines it is budgeted for.
test: $(STAMP)
	$(PY) -m pytest -q -ra -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) build *.egg-info
