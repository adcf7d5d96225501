# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n auto --dist loadfile --no-loadscope-reorder
LINT_PATHS := kdjax configs tests experiments
SPHINX_ARGS ?= -W --keep-going -q

.PHONY: demo showcase test test-fast pytest lint format docs docs-check install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamps re-run the install whenever the package metadata changes.
# --no-compile: Python writes bytecode for the modules it imports when it first
# imports them; compiling every installed file up front (torch, transformers)
# is most of a fresh install's time.
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-compile -e .
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-compile -e '.[test,torch,docs,dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

# The embedded distillation demo: tiny teacher SFT, four students, one table.
demo: $(VENV)/.installed
	$(BIN)/python -m experiments.demo

# Every divergence on one teacher/student pair (seconds).
showcase: $(VENV)/.installed
	$(BIN)/python experiments/divergence_showcase.py

# What CI runs (.ci/run): style, the documentation (warnings are errors), tests.
test: lint docs-check pytest

pytest: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The edit loop: the library's unit tests (divergences, config, data, models,
# objective, the docs and import-direction checks), no end-to-end runs.
FAST_TESTS := tests/divergences tests/config tests/data tests/models \
	tests/objective tests/project/test_docs.py tests/project/test_layers.py
test-fast: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n auto -m "not slow" $(FAST_TESTS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/pyink --check $(LINT_PATHS)

# Rewrites the files: import order and unused imports, then the layout.
format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/pyink $(LINT_PATHS)

# The Sphinx site in docs/_build/html; notebooks render without executing
# (tests/project/test_notebooks.py executes them).
docs: $(VENV)/.installed-test
	PYTHONPATH=$(CURDIR) $(BIN)/sphinx-build $(SPHINX_ARGS) -b html docs docs/_build/html

# Every page read and every reference resolved (warnings are errors), no HTML
# written: the check of `make docs` in under half its time.
docs-check: $(VENV)/.installed-test
	PYTHONPATH=$(CURDIR) $(BIN)/sphinx-build $(SPHINX_ARGS) -b dummy docs docs/_build/check

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis docs/_build
