# One entry point for people and CI. `make run` and `make test` each work on a fresh
# Debian machine: both depend on the idempotent `make setup`.
SHELL := /bin/bash
PY_SYSTEM ?= /usr/bin/python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dicomsync-installed

.PHONY: setup run test check lint typecheck bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

run: setup
	bash scripts/run.sh

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check shared cli plugin tests bench examples
	$(VENV)/bin/ruff format --check shared cli plugin tests bench examples

typecheck: setup
	bash scripts/typecheck.sh

check: lint typecheck test

bench: setup
	$(PY) -m bench

# the README's option tables, generated from the option declarations (dicomsync.options)
docs: setup
	$(PY) -m dicomsync.options --write README.md

clean:
	rm -rf $(VENV) var
