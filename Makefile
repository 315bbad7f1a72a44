# Two commands do all set-up on a fresh machine: `make demo` and `make test` (each creates .venv first if needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/installed: requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $@

.PHONY: demo test
demo: $(VENV)/installed
	PY=$(PY) bash scripts/demo.sh

test: $(VENV)/installed
	$(PY) -m pytest -q
