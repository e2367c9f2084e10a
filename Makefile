# `make demo` and `make test` each create .venv (if missing) and install detkd into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.detkd-installed
DEMO ?= demo
# The oldest torch/torchvision pair pyproject.toml allows; `make test-floor` runs the fast suite on it in its own venv.
FLOOR_VENV ?= .venv-floor
FLOOR_PAIR ?= torch==2.6.0 torchvision==0.21.0

.PHONY: install test test-slow test-floor demo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install $(FLOOR_PAIR) -e ".[dev]"
	$(FLOOR_VENV)/bin/python -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/detkd bench --suite demo --out $(DEMO)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(DEMO) .pytest_cache
