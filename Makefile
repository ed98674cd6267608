# Everyday commands. CI runs .ci/run, which does what `install lint test` do here plus the
# system packages and a Redis.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.DEFAULT_GOAL := help
.PHONY: help install lint test demo bench

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-8s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python ## create .venv and install metarec with its dev tools (editable)
	$(BIN)/python -m pip install -e '.[dev]'

lint: ## ruff and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/mypy

test: ## the test suite (starts its own Tansu broker; uses or starts Redis on 127.0.0.1:6379)
	$(BIN)/python -m pytest -q

demo: ## end-to-end demo on the local broker and Redis
	$(BIN)/metarec demo

bench: ## consumer throughput benchmark
	$(BIN)/python benchmarks/consumer_bench.py
