# `make test` and `make demo` work from a fresh clone: they build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint format typecheck bench bench-smoke demo clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins torch to the local CPU wheel, so no CUDA wheels are downloaded.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,dev,bench,demo]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Rewrites files: formats them, then applies ruff's safe fixes. `make lint` checks the result.
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# mypy --strict on the package, with [tool.mypy] in pyproject.toml. Its cache (.mypy_cache) also
# makes tests/test_typing.py's two mypy runs take about a second each.
typecheck: $(STAMP)
	$(BIN)/mypy

# Pass 1: everything, with the jaxtyping + beartype runtime check on (see conftest.py).
# Pass 2: the compile tests, which need it off because its wrapper breaks fullgraph tracing.
test: lint typecheck
	$(BIN)/python -m pytest -m "not compile"
	$(BIN)/python -m pytest -m compile --no-typecheck tests sae_losses

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache

# Trains a toy SAE eagerly, compiled, and on 2 processes with torchrun; writes out/demo_losses.png.
demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The full benchmark tables (about 15 minutes on 2 quiet CPU cores); see benchmarks/README.md.
# BEFORE is the commit bench_versions.py times this checkout against (default: 0.2.0).
BEFORE ?= f9ff003
BENCHES = bench bench_family bench_eval bench_auxk bench_matryoshka bench_logits bench_downstream
bench: $(STAMP)
	for b in $(BENCHES); do $(BIN)/python benchmarks/$$b.py || exit 1; done
	$(BIN)/python benchmarks/bench_versions.py --before $(BEFORE)

# The same scripts at tiny sizes and 2 rounds (--quick), to check that they run; the figures mean
# nothing. tests/test_examples.py runs the same smoke test inside `make test`.
bench-smoke: $(STAMP)
	for b in $(BENCHES); do $(BIN)/python benchmarks/$$b.py --quick || exit 1; done
	$(BIN)/python benchmarks/bench_versions.py --quick

# `make test-peers`: the real-peer conformance suite, one venv per peer (see peers/).
-include peers/peers.mk
