# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# Python 3.11's venv brings pip 23.2, whose resolver takes 64 s here to read the 187 packages' metadata
	@# (pip 26: 27 s) and whose whole install took 2 min 15 s (pip 26: 1 min 18 s); offline, the old one goes on
	$(BIN)/python -m pip install --quiet --disable-pip-version-check 'pip>=26' || true
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
	@# No bytecode compile ahead (--no-compile): the suite imports 7,200 of the 20,400 modules, and each is
	@# compiled once, by the first process to import it (tests/run.py); compiling all took 50 s here and
	@# left the Ray tests as long (9 min 32 s with it, 9 min 35 s without)
	touch $@

# With bytecode caches written where PYTHONDONTWRITEBYTECODE is set (as on the development machine): setup
# compiles nothing ahead, so each of the demo's Ray processes would compile what it imports again
demo: setup
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/cxr demo $(ARGS)

# Ruff first (a second); the unit tests and mypy beside the Ray tests (tests/run.py); with PYTEST_ARGS,
# one pytest.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m tests.run $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every stage beside its baseline into cxr-bench/benchmark.{md,json}; e.g. make bench ARGS="train --quick"
bench: setup
	$(BIN)/python -m jobs.benchmark $(ARGS)

clean:
	rm -rf cxr-demo cxr-bench .pytest_cache .mypy_cache .ruff_cache
