# Two commands that work on a fresh machine: `make demo` and `make test`.
# Both bootstrap .venv: torch first (the local CPU wheel, so nothing pulls a multi-GB CUDA build),
# then this project with its extras. llama-cpp-python compiles from source the first time (~18 min
# on 2 cores); pip's wheel cache makes every later install fast.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# llama-cpp-python compiles llama.cpp for this CPU; on x86 its AMX kernels are left out, as they segfault on the
# first decode on AMX Xeons (backends/llama_cpp/lib.py), so its other repacked kernels stay usable there
LLAMA_CMAKE_ARGS := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8)

.PHONY: demo test venv clean bench-suite backend chromium qemu

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar off torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(BIN)/pip install --progress-bar off -e '.[convert,dicom,bench,dev,openvino,openvino-ep,serve]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medgemma-edge demo

test: $(STAMP) chromium qemu
	$(BIN)/python -m pytest

# the page test drives Debian's chromium through Playwright (Playwright's own browser download is unreachable)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@test -x /usr/bin/chromium || ($(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium)

# the int8 encoder test emulates an x86 CPU without VNNI with qemu's user-mode emulator (x86 hosts only)
qemu:
	@test "$$(uname -m)" != x86_64 || test -x /usr/bin/qemu-x86_64 || ($(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq qemu-user)

# the standard benchmark suite on full-size synthetic MedGemma 4B (about an hour on 2 cores; see benchmarks/)
bench-suite: $(STAMP)
	$(BIN)/python benchmarks/suite.py

# llama.cpp built for this workstation (BACKEND=cpu|cuda|vulkan|metal); see README "Build the backend"
BACKEND ?= cpu
BUILD_DIR = $(if $(filter cpu,$(BACKEND)),build/native,build/$(BACKEND))
backend: $(STAMP)
	cmake -S . -B $(BUILD_DIR) -G Ninja -DMEDGEMMA_BACKEND=$(BACKEND) -DMEDGEMMA_PYTHON=$(abspath $(BIN))/python
	cmake --build $(BUILD_DIR)
	ctest --test-dir $(BUILD_DIR) --output-on-failure

clean:
	rm -rf $(VENV) .cache .pytest_cache
