# Quick start: `make bench` and `make test`. Both create .venv with pinned dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv system-deps bench test lint format clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Debian packages the tests need beyond Python (Chromium for the report test; the Docker
# packages come with `scripts/ci-docker.sh start`). Idempotent.
system-deps:
	bash scripts/install-system-deps.sh

bench: $(STAMP)
	$(PY) run_bench.py $(ARGS)

# A Docker engine for the compose tests is started if none answers, and stopped again
# afterwards (only the one started here), so `make test` leaves no daemon behind.
test: $(STAMP) system-deps
	bash scripts/ci-docker.sh start
	trap 'bash scripts/ci-docker.sh stop' EXIT; $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
