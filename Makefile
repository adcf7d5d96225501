# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n auto

.PHONY: demo showcase test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps re-run the install whenever the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,torch]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

# The embedded distillation demo: tiny teacher SFT, four students, one table.
demo: $(VENV)/.installed
	$(BIN)/python -m experiments.demo

# Every divergence on one teacher/student pair (seconds).
showcase: $(VENV)/.installed
	$(BIN)/python experiments/divergence_showcase.py

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
