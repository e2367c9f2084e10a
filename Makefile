# `make demo` and `make test` each create .venv (if missing) and install detkd into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detkd-installed
DEMO ?= demo

.PHONY: install test test-slow demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(VENV)/bin/detkd bench --suite demo --out $(DEMO)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(DEMO) .pytest_cache
