PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# pytest-xdist workers: each test file runs whole in one worker (its shared fixtures built once).
TEST_WORKERS ?= 2

.PHONY: install test quickstart data clean

# Idempotent: re-installs only when setup.py changes. Users get the package alone; the test
# extra (reference implementations, pytest) comes with `make test`.
install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

quickstart: $(STAMP)
	$(PY) scripts/quickstart.py

# Builds TFDS tiny_shakespeare offline from ../shared/data (or downloads it); the quickstart
# and training do this too when needed.
data: $(STAMP)
	$(PY) -m moe_jax.data.prepare

clean:
	rm -rf $(VENV) *.egg-info
