# Two commands set everything up on a fresh machine with Python 3.11+ and make:
#   make serve   run edge on config/edge.toml (make serve CONFIG=config/my.toml: another one)
#   make test    install the programs the tests run (scripts/provision.sh), then the whole suite
PYTHON ?= python3
CONFIG ?= config/edge.toml
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint check clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/edge serve --config $(CONFIG)

# Provisioning first: it installs python3-venv too when Debian's python3 lacks it,
# which the venv below needs. .ci/run calls the same script. The tests run
# nginx and haproxy from /usr/sbin, which is not in a Debian user's PATH.
test: export PATH := $(PATH):/usr/local/sbin:/usr/sbin:/sbin
test:
	scripts/provision.sh
	@$(MAKE) --no-print-directory $(STAMP)
	$(BIN)/ruff check edge tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check edge tests benchmarks
	$(BIN)/lint-imports

check: $(STAMP)
	$(BIN)/edge check --config $(CONFIG)

clean:
	rm -rf $(VENV) var .pytest_cache

# Benchmarks: edge side by side with nginx and HAProxy (see benchmarks/README.md).
# `make bench QUICK=1` runs every scenario briefly.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.setup
	$(BIN)/python -m benchmarks.suite $(if $(QUICK),--quick,)
