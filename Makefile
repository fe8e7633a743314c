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
	@# pip 26 shows the build backend's warnings: setuptools' generic one on every editable install is left out
	PYTHONWARNINGS="ignore:Editable installation" \
	    $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile -e '.[dev]'
	@# pip compiles the 20,000 modules on one core (39 s here), compileall on every core (28-50 s); a few of
	@# torch's test files are Python 3.12 and do not compile, as pip also lets pass. Without it the suite
	@# (7,200 of them imported, by many processes at once) took as long or longer (session 55)
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

# With bytecode caches written where PYTHONDONTWRITEBYTECODE is set (as on the development machine): each of
# the demo's Ray processes would otherwise compile cxr's own modules again (setup compiles the venv's only)
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
