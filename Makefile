# `make run` serves (installing what running needs); `make test` runs lint, types and the whole suite
# (installing the test tools too). Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per set of requirements: running needs requirements.txt, testing requirements-dev.txt too.
RUN_STAMP := $(VENV)/.run-$(shell cat requirements.txt constraints.txt | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt constraints.txt | cksum | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-$(shell cat requirements-bench.txt constraints.txt | cksum | cut -d' ' -f1)

.PHONY: run test bench screenshots lint typecheck format lock clean

$(RUN_STAMP): requirements.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	rm -f $(VENV)/.run-* && touch $@

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	rm -f $(VENV)/.installed-* && touch $@

run: $(RUN_STAMP)
	$(BIN)/python -m server

# The benchmark (about half an hour; needs Node, and Redis for its cluster rows): writes docs/performance.md
# and docs/capacity-vs-load.png.
bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python bench/run.py --write

# The playground's pictures in docs/ (README, docs/clients.md), taken in Debian's Chromium from the real page (a scripted answer).
screenshots: $(STAMP)
	$(BIN)/python -m tests.playground_screenshots

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt -c constraints.txt
	rm -f $(VENV)/.bench-* && touch $@

lint: $(STAMP)
	$(BIN)/ruff check server tests client_examples bench
	$(BIN)/ruff format --check server tests client_examples bench

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

format: $(STAMP)
	$(BIN)/ruff format server tests client_examples bench
	$(BIN)/ruff check --fix server tests client_examples bench

# Re-pin the whole dependency tree from the requirements files, in a scratch venv.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -r requirements-bench.txt
	{ echo "# Every package the venv holds, pinned: make installs requirements-dev.txt under these constraints."; \
	  echo "# Regenerate after changing a requirements file: make lock"; \
	  .lock-venv/bin/python -m pip freeze; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bench/node/node_modules
