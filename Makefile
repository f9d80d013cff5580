# Quick start: `make demo` (set-up + demo cohort + full study) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO := data/demo
DEMO_SUBJECTS ?= 64
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-cluster lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch first, pinned, CPU build: a wheel already on disk (pip's find-links, no index asked), else
# PyTorch's CPU index; from PyPI (or an open-ended requirement) it would be the multi-GB CUDA build.
TORCH_INDEX ?= --index-url https://download.pytorch.org/whl/cpu
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install --quiet --upgrade pip
	if $(BIN)/pip install --quiet --dry-run --no-index --no-deps torch==2.13.0 2>/dev/null; \
	then $(BIN)/pip install --quiet torch==2.13.0; \
	else $(BIN)/pip install --quiet torch==2.13.0 $(TORCH_INDEX); fi
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

$(DEMO)/participants.tsv: | $(VENV)/.installed
	$(BIN)/python -m pipeline.demo $(DEMO) --n-subjects $(DEMO_SUBJECTS) --seed 0 --overwrite

demo: $(VENV)/.installed $(DEMO)/participants.tsv
	$(BIN)/snakemake --cores all --configfile config/config.yaml
	@echo "Report: $(abspath results/report.html)"

# Everything but the SLURM cluster test, which needs a running cluster (test-cluster, .ci/run).
test: $(VENV)/.installed
	$(BIN)/python -m pytest -v -m "not cluster" --durations=20

# As root on Debian: tests/cluster/slurm.sh up first (installs and starts a one-node SLURM).
test-cluster: $(VENV)/.installed
	PIPELINE_REQUIRE_SLURM=1 $(BIN)/python -m pytest -v -rs -s -m cluster tests/cluster

lint: $(VENV)/.installed
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
