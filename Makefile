# seadragon-proxy — every target builds .venv first and is safe to run again.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser node redis run fake-ollama test lint bench soak clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "seadragon-proxy needs Python 3.11+; run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,lint]'
	@touch $(STAMP)

install: $(STAMP)

browser:  ## Debian's chromium, which the dashboard's browser test drives through Playwright
	./scripts/ensure-chromium

node:  ## Node 20+ and tests/node's npm packages (ollama-js, openai) for the client tests
	./scripts/ensure-node

redis:  ## Debian's redis-server, which the Redis backend's tests start on free ports
	./scripts/ensure-redis

run: install  ## the proxy on 127.0.0.1:11435 in front of http://127.0.0.1:11434
	$(BIN)/seadragon-proxy serve --config config/seadragon.yaml

fake-ollama: install  ## a fake Ollama on 127.0.0.1:11434, to try the proxy without a GPU
	$(BIN)/python -m seadragon_proxy.fake_ollama --port 11434

test: install browser node redis
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install  ## HAProxy and nginx (Debian's) for the C reference and round-robin columns, if they can be had
	-./scripts/ensure-haproxy
	-./scripts/ensure-nginx
	$(BIN)/python -m bench

soak: install  ## the heavy tests at full size (10 000 queued requests), printing the figures
	$(BIN)/python -m pytest -m heavy --soak -s -q

clean:
	rm -rf $(VENV) tests/node/node_modules build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
