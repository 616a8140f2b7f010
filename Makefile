# Two commands do everything on a fresh machine: `make book` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

VENV   := .venv
PY     := $(VENV)/bin/python
UV     := python3 -m uv
export UV_PYTHON_DOWNLOADS := never
# Timings and results are reproducible for a fixed thread count.
export SENSITIVITY_THREADS ?= 2

.PHONY: help setup book test lab bench lint unit notebooks nbval html browser lock launch repository clean

help:
	@echo "make book   set up, execute every chapter (PROFILE=book) and render _build/html"
	@echo "make test   set up, then lint, unit tests, chapters (quick), nbval, HTML build, browser checks"
	@echo "make lab    open the chapters in JupyterLab"
	@echo "make bench  run the benchmarks (ratios against baselines measured in the same run)"
	@echo "make repository URL=https://github.com/OWNER/NAME [BRANCH=main]"
	@echo "            say where the book is hosted (_config.yml), then make launch"
	@echo "make launch write what follows from it: every chapter's Colab install cell, binder/requirements.txt"

## Set-up: a .venv made by uv from the pinned lock, the library in editable mode.
## --compile-bytecode: uv, unlike pip, writes no .pyc files, and where $PYTHONDONTWRITEBYTECODE is set nothing
## ever does: every kernel then recompiled torch from source (about 5 s per chapter for torch._dynamo alone).
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) venv $(VENV) --python 3.11 --allow-existing --quiet
	$(UV) pip sync --quiet --compile-bytecode --python $(PY) requirements.txt
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	$(PY) tools/check_env.py
	@touch $@

lock:
	$(UV) pip compile requirements.in -o requirements.txt --python-version 3.11
	$(MAKE) launch  # binder/requirements.txt follows the lock

## Where the book lives: the `repository:` block of _config.yml (url, branch) and nothing else. Jupyter Book's
## launch buttons read it; tools/launch.py writes what follows from it (and from the lock): the Colab install
## cell of every chapter and binder/requirements.txt. `make test` fails while they are out of date.
launch: setup
	$(PY) tools/launch.py --write

repository: setup
	@if [ -z "$(URL)" ]; then echo "usage: make repository URL=https://github.com/OWNER/NAME [BRANCH=main]"; exit 2; fi
	$(PY) tools/launch.py --set-url "$(URL)" $(if $(BRANCH),--branch "$(BRANCH)")

## The book: executes through jupyter-cache (a rebuild with nothing changed executes nothing).
## jupyter-cache keys on a notebook's code cells only, so a change to the library (or the lock) would
## leave every cached output stale: the build drops the cache when their hash differs from the last one.
## Training progress bars would be rendered as hundreds of lines of text: the build turns them off.
LIB_HASH = $(shell { cat requirements.txt; find sensitivity_lib -name '*.py' | LC_ALL=C sort | xargs cat; } | sha256sum | cut -c1-16)

book: setup
	$(PY) tools/launch.py --check  # a published chapter's Colab cell installs from where _config.yml says
	@mkdir -p _build
	@if [ -d _build/.jupyter_cache ] && [ "$$(cat _build/.library-hash 2>/dev/null)" != "$(LIB_HASH)" ]; then \
	    echo "sensitivity_lib or requirements.txt changed since the last build: re-executing every chapter"; \
	    rm -rf _build/.jupyter_cache; \
	fi
	@echo "$(LIB_HASH)" > _build/.library-hash  # what every cached output from here on comes from
	TQDM_DISABLE=1 $(VENV)/bin/jupyter-book build . --builder html -W -n --keep-going
	@echo "open _build/html/index.html"

lab: setup
	$(VENV)/bin/jupyter lab chapters/

bench: setup
	@status=0; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || status=1; done; exit $$status

## The tests, in order; each step stops the run when it fails.
test: setup lint unit notebooks nbval html browser

lint: setup
	$(PY) -m ruff check sensitivity_lib tests benchmarks tools

unit: setup
	$(PY) -m pytest tests sensitivity_lib --doctest-modules -m "not notebooks"

notebooks: setup
	$(PY) -m pytest tests/test_notebooks.py -m notebooks

nbval: setup
	TQDM_DISABLE=1 $(PY) -m pytest --nbval -p no:cacheprovider --nbval-sanitize-with tests/nbval_sanitize.cfg \
	    --nbval-cell-timeout 900 -o testpaths= -o addopts= _build/quick/executed

html: setup
	$(PY) tools/build_quick_html.py

browser: setup
	bash tools/ensure_chromium.sh
	$(PY) -m pytest tests/test_html.py -m notebooks

clean:
	rm -rf _build
