PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test quickstart data clean

# Idempotent: re-installs only when setup.py changes.
install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

quickstart: $(STAMP)
	$(PY) scripts/quickstart.py

# Builds TFDS tiny_shakespeare offline from ../shared/data (or downloads it); the quickstart
# and training do this too when needed.
data: $(STAMP)
	$(PY) -m moe_jax.data.prepare

clean:
	rm -rf $(VENV) *.egg-info
