# The README's two commands: `make demo` (main job) and `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint test-gpu bench

setup:
	bash scripts/bootstrap.sh $(VENV)

demo: setup
	$(PY) -m services.grpo

lint: setup  # ruff on everything; mypy --strict on the files pyproject.toml's [tool.mypy] names
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup lint  # lint and the docs first (seconds): a broken link or a stale API reference fails it
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site
	$(PY) -m pytest -m "not gpu" tests

test-gpu:  # on the lent GPU machine, wheels staged per ../shared/gpu/README.md
	bash scripts/gpu_run.sh --install

bench: setup
	$(PY) -m benchmarks.run
