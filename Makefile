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
# GPU=1: use the machine's own torch (a CUDA build, preinstalled or installed by you) instead of the CPU pin
GPU ?=
TORCH_CPU := 2.13.0

.PHONY: setup browser run test lint typecheck clean

$(STAMP): pyproject.toml
ifeq ($(GPU),1)
	# the machine's packages stay visible (its CUDA torch, its transformers); PyPI's default torch for
	# Linux (a CUDA build) only where the machine has none
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch
	$(BIN)/python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"
else
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, exactly as pinned (a CPU build here), so nothing later pulls a CUDA build in its place
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_CPU)"
endif
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@$(MAKE) --no-print-directory browser
	touch $(STAMP)

# Debian's chromium for the browser tests (Playwright drives it; no browser download from the web).
# Installed when apt-get can run as root; elsewhere those tests skip and say why.
browser:
	@if command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the browser tests will be skipped"; \
	else echo "note: chromium not installed and apt-get not usable here; the browser tests will be skipped"; fi

setup: $(STAMP)

# Index DIR and serve the page on HOST:PORT. Without DIR, or without the default encoder's weights,
# the offline demo (synthetic scenes, a tiny model trained on them) is built and served instead.
run: $(STAMP)
	$(BIN)/clearsight run $(if $(DIR),"$(DIR)") --host "$(HOST)" --port "$(PORT)"

lint: $(STAMP)
	$(BIN)/ruff check retrieval explainer tests $(wildcard bench)
	$(BIN)/ruff format --check retrieval explainer tests $(wildcard bench)
	$(BIN)/deptry .

typecheck: $(STAMP)
	$(BIN)/mypy retrieval explainer bench

# pytest exits 5 when it collects no test: that is a failure here, never a silent pass.
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
