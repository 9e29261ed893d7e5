# Clearsight: the README's two commands are `make run DIR=...` and `make test`.
# Everything installs into .venv from the project's own files (pyproject.toml pins torch's CPU build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DIR ?=
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup run test lint typecheck clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, exactly as pinned, so nothing later can pull a CUDA build in its place
	$(BIN)/python -m pip install --quiet "$$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Index DIR (or run the offline demo when DIR is empty) and serve the page.
run: $(STAMP)
	@if [ -z "$(DIR)" ]; then echo "usage: make run DIR=/path/to/images"; exit 2; fi
	$(BIN)/clearsight index "$(DIR)"
	@echo "search it with: $(BIN)/clearsight search 'a dog on a beach'"

lint: $(STAMP)
	$(BIN)/ruff check retrieval explainer tests $(wildcard bench)
	$(BIN)/ruff format --check retrieval explainer tests $(wildcard bench)

typecheck: $(STAMP)
	$(BIN)/mypy retrieval explainer

# pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
