# Two commands set everything up on a fresh machine with Python 3.11+ and make:
#   make serve   run edge on config/edge.toml (make serve CONFIG=config/my.toml: another one)
#   make test    install the programs the tests run (scripts/provision.sh), then the whole suite
# Both compile the request path with mypyc first when a C compiler and Python's
# headers are there (make compile: required; make pure: back to the sources).
PYTHON ?= python3
CONFIG ?= config/edge.toml
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
COMPILED := $(VENV)/.compiled
# What a build depends on: the compiled modules (edge.compiled.MODULES) and the
# modules whose types they use.
COMPILE_INPUTS := $(wildcard edge/*.py edge/proxy/*.py edge/h2/*.py edge/tls/*.py edge/store/*.py) scripts/compile.py

.PHONY: serve test lint check clean bench compile pure

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,compile]'
	touch $(STAMP)

# Optional: without a compiler edge runs its Python sources (edge/compiled.py
# also refuses a build older than its sources, whatever make did).
$(COMPILED): $(STAMP) $(COMPILE_INPUTS)
	$(BIN)/python scripts/compile.py --optional
	touch $(COMPILED)

compile: $(STAMP)
	$(BIN)/python scripts/compile.py
	touch $(COMPILED)

pure: $(STAMP)
	$(BIN)/python scripts/compile.py --remove
	touch $(COMPILED)

serve: $(STAMP) $(COMPILED)
	$(BIN)/edge serve --config $(CONFIG)

# Provisioning first: it installs python3-venv too when Debian's python3 lacks it,
# which the venv below needs. .ci/run calls the same script. The tests run
# nginx and haproxy from /usr/sbin, which is not in a Debian user's PATH.
test: export PATH := $(PATH):/usr/local/sbin:/usr/sbin:/sbin
# The suite runs on the compiled build (tests/conftest.py deselects the few unit
# tests that patch compiled classes), then the unit tests and the data path's
# integration tests again on the Python sources (EDGE_PURE=1): what runs where
# there is no compiler. EDGE_EXPECT_COMPILED=1 (CI sets it) fails the suite when
# the build did not happen.
PURE_TESTS := tests/unit tests/integration/test_data_path.py tests/integration/test_forwarding.py \
	tests/integration/test_hardening_proxy.py tests/integration/test_http2.py
test:
	scripts/provision.sh
	@$(MAKE) --no-print-directory $(STAMP) $(COMPILED)
	$(BIN)/ruff check edge tests benchmarks scripts
	$(BIN)/lint-imports
	EDGE_EXPECT_COMPILED=$${EDGE_EXPECT_COMPILED:-$$(test -f edge/compiled.json && echo 1)} $(BIN)/pytest $(PYTEST_ARGS)
	EDGE_PURE=1 $(BIN)/pytest -q $(PURE_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check edge tests benchmarks
	$(BIN)/lint-imports

check: $(STAMP)
	$(BIN)/edge check --config $(CONFIG)

clean:
	-$(BIN)/python scripts/compile.py --remove
	rm -rf $(VENV) var .pytest_cache build

# Benchmarks: edge side by side with nginx and HAProxy (see benchmarks/README.md).
# `make bench QUICK=1` runs every scenario briefly.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.setup
	$(BIN)/python -m benchmarks.suite $(if $(QUICK),--quick,)
