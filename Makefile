# colintern: `make demo` and `make test` each set everything up from nothing through `make install`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch first, pinned to a pair that runs on CPU-only and CUDA machines and that colpali-engine accepts.
# `===` is exact string equality: it picks the registry's build of 2.13.0, not a local `2.13.0+cpu` wheel
# (whose torchvision partner does not exist). Override for another CUDA toolkit, e.g.
#   make install TORCH_SPEC="torch==2.13.0 torchvision==0.28.0" PIP_ARGS="--index-url https://download.pytorch.org/whl/cu126"
# or reuse a preinstalled torch: make install VENV_ARGS=--system-site-packages TORCH_SPEC=
TORCH_SPEC ?= torch===2.13.0 torchvision===0.28.0
EXTRAS ?= dev
VENV_ARGS ?=
PIP_ARGS ?=
STAMP := $(VENV)/.colintern-installed
DEMO_DIR ?= experiments/demo

.PHONY: install demo test check-full-size clean help

help:
	@echo "make install   build .venv/ (torch, transformers, peft, colpali-engine, mteb, ...)"
	@echo "make demo      install, then run the whole loop on the embedded default (CPU, minutes)"
	@echo "make test      install, then run the test suite"
	@echo "make check-full-size  the real InternVL3.5-1B architecture end to end on this machine (~10 min on 2 CPU cores)"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	@if [ -n "$(strip $(TORCH_SPEC))" ]; then $(PIP) install -q $(PIP_ARGS) $(TORCH_SPEC); fi
	$(PIP) install -q $(PIP_ARGS) -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m colintern.env_check
	@touch $(STAMP)

demo: install
	$(PY) scripts/demo.py --output-dir $(DEMO_DIR)

test: install
	$(VENV)/bin/lint-imports  # the layering in pyproject.toml ([tool.importlinter])
	$(PY) -m pytest tests -q

# Not part of `make test` (minutes, ~6 GB of memory): the full-size architecture written by transformers, loaded and
# compared tensor by tensor, one LoRA step on two A4 pages, one page and one query through the mteb wrapper.
check-full-size: install
	$(PY) scripts/check_full_size.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
