# Everyday commands. CI runs .ci/run, which makes sure a Redis answers and runs lint; then
# it runs the same `make test`. Every target installs what it needs first: .venv with the
# package and all its extras, and for `test` the system programs (scripts/system-packages.sh).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install system-packages lint test test-fast demo bench eval suite

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install metarec with every extra and the dev tools (editable)

system-packages: ## install redis-server, redis-tools (and kcat) with apt-get where missing
	scripts/system-packages.sh

lint: $(STAMP) ## ruff (lint and format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) system-packages ## the test suite (starts its own Tansu broker; uses or starts Redis on 127.0.0.1:6379)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) ## the tests not marked slow (no processes, brokers or training): under a minute
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP) ## the whole loop on the local broker and Redis, on a bundled synthetic stream
	$(BIN)/metarec demo

eval: $(STAMP) ## the ml-100k prequential comparison (about 12 minutes on 2 cores)
	$(BIN)/metarec eval --data ../shared/data/movielens/ml-100k --seeds 3 --json eval-out/ml100k.json

suite: $(STAMP) ## the robustness suite: ml-100k, its variants, ml-latest-small and the synthetic stream (about 70 minutes on 2 cores)
	$(BIN)/metarec eval --suite ../shared/data/movielens --seeds 3 --json eval-out/suite.json

bench: $(STAMP) ## the consumer against this machine's bounds, quick mode (under 3 minutes; metarec bench for all)
	$(BIN)/metarec bench --quick --json eval-out/bench-quick.json
